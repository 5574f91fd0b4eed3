"""Catalogs: the validator on every kind of broken row, the Fashion-MNIST and folder importers against a
real S3 server, and the `lookalike catalog` verbs on good and bad input."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.cli import main
from storage.s3 import ObjectStore, StoreError
from storage.server import free_port
from training.catalog import Catalog, CatalogError, validate_catalog
from training.importers import (BROAD_CATEGORY, FASHION_MNIST_CLASSES, import_fashion_mnist, import_folder,
                                read_idx, resolve_catalog_uri, shade_of)


def _image_bytes(fmt: str = "PNG", color=(200, 30, 30), size=(24, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


# ---- the validator ---------------------------------------------------------------------------------

def test_validator_reports_every_broken_row_with_its_line(store, capsys):
    store.put_bytes("imgs/good.png", _image_bytes())
    store.put_bytes("imgs/other.png", _image_bytes(color=(0, 0, 200)))
    store.put_bytes("imgs/garbage.png", b"this is not a png at all")
    good, other = store.uri("imgs/good.png"), store.uri("imgs/other.png")
    lines = [
        json.dumps({"listing_id": "a", "image": good, "labels": {"category": "tops"}}),             # 1 ok
        json.dumps({"listing_id": "b", "image": store.uri("imgs/gone.png"), "labels": {}}),           # 2 missing
        json.dumps({"listing_id": "c", "image": store.uri("imgs/garbage.png")}),                      # 3 unreadable
        json.dumps({"listing_id": "d", "image": good, "labels": {"category": 3.5}}),                  # 4 label type
        json.dumps({"listing_id": "a", "image": other, "labels": {"category": "bags"}}),              # 5 duplicate
        '{"listing_id": "e", "image": ',                                                               # 6 bad JSON
        json.dumps({"listing_id": "f", "image": other, "labels": {"category": "bags"}}),              # 7 ok
    ]
    store.put_bytes("catalogs/broken/catalog.jsonl", ("\n".join(lines) + "\n").encode())
    uri = store.uri("catalogs/broken/catalog.jsonl")

    report = validate_catalog(uri, store)
    by_line = {p.line: str(p) for p in report.problems}
    assert sorted(by_line) == [2, 3, 4, 5, 6], report.summary()
    assert "does not exist" in by_line[2]
    assert "unreadable" in by_line[3]
    assert "'category' has a value of type float" in by_line[4]
    assert "duplicate listing_id (first on line 1)" in by_line[5]
    assert "not valid JSON" in by_line[6]
    assert not report.ok and report.rows == 7

    # The command lists every one of them and fails.
    assert main(["catalog", "validate", uri]) == 1
    out = capsys.readouterr().out
    for line in (2, 3, 4, 5, 6):
        assert f"line {line}" in out
    # Rows alone (no image reads) still catch the row-level problems.
    assert main(["catalog", "validate", uri, "--no-images"]) == 1
    out = capsys.readouterr().out
    assert "line 4" in out and "line 2" not in out
    assert main(["catalog", "show", uri]) == 1  # counts the good rows, and says the rest need a look
    out = capsys.readouterr().out
    assert "4 rows" in out and "3 problems" in out and "lookalike catalog validate" in out


def test_validating_a_missing_catalog_is_one_line(store, capsys):
    assert main(["catalog", "validate", "no-such-catalog"]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "lookalike catalog import" in err and "Traceback" not in err


# ---- Fashion-MNIST ---------------------------------------------------------------------------------

def test_idx_reader_and_shade_thresholds(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path.write_bytes(bytes([0, 0, 8, 3]) + np.array(arr.shape, dtype=">i4").tobytes() + arr.tobytes())
    assert np.array_equal(read_idx(path), arr)
    images = np.zeros((3, 28, 28), np.uint8)
    images[0, 5:20, 5:20], images[1, 5:20, 5:20], images[2, 5:20, 5:20] = 100, 160, 230
    assert list(shade_of(images)) == ["light", "medium", "dark"]  # stored intensities are negated


def test_import_fashion_mnist_slice_and_validate(store, capsys):
    uris = import_fashion_mnist(store, limit=100, progress=False)
    assert set(uris) == {"train", "test"}
    assert uris["train"] == store.uri("catalogs/fashion-mnist-train/catalog.jsonl")
    train, test = Catalog.open(uris["train"], store), Catalog.open(uris["test"], store)
    assert len(train) == len(test) == 100

    # The test split is its own catalog, with its own ids and images.
    assert all(r.listing_id.startswith("fmnist-train-") for r in train.rows)
    assert all(r.listing_id.startswith("fmnist-test-") for r in test.rows)
    assert all("/fashion-mnist-test/images/" in r.image for r in test.rows)
    assert len(store.list("catalogs/fashion-mnist-train/images/")) == 100

    for catalog in (train, test):
        tasks = catalog.tasks()
        assert tasks["fine_category"] == sorted(FASHION_MNIST_CLASSES)
        assert tasks["category"] == sorted(set(BROAD_CATEGORY.values()))
        assert set(tasks.get("shade", [])) <= {"light", "medium", "dark"}
        for row in catalog.rows:
            assert row.labels["category"] == BROAD_CATEGORY[row.labels["fine_category"]]
            assert row.title.startswith(row.labels["fine_category"] + " #")
        # stratified: every class equally represented
        counts = {c: len([r for r in catalog.rows if r.labels["fine_category"] == c]) for c in FASHION_MNIST_CLASSES}
        assert set(counts.values()) == {10}
    shaded = sum("shade" in r.labels for r in train.rows + test.rows)
    assert 10 <= shaded <= 55  # a sparse task: ~15% of 200 rows

    image = train.load_image(train.rows[0])
    assert image.size == (28, 28) and image.mode == "RGB"
    for uri in uris.values():
        report = validate_catalog(uri, store)
        assert report.ok, report.summary()

    # The same slice again gives the same rows (seeded).
    assert [r.listing_id for r in Catalog.open(uris["train"], store).rows] == [r.listing_id for r in train.rows]

    assert main(["catalog", "show", "fashion-mnist-train"]) == 0
    out = capsys.readouterr().out
    assert "100 rows" in out and "task fine_category: 100 labelled rows" in out and "  Sneaker: 10" in out
    assert main(["catalog", "validate", "fashion-mnist-test"]) == 0
    assert "ok" in capsys.readouterr().out


def test_missing_dataset_and_bad_limit_are_clear(store, tmp_path):
    with pytest.raises(CatalogError, match="apt-get install dataset-fashion-mnist"):
        import_fashion_mnist(store, directory=tmp_path, progress=False)
    with pytest.raises(CatalogError, match="must be positive"):
        import_fashion_mnist(store, limit=0, progress=False)
    assert store.list("catalogs/") == []


class _StoreThatDies(ObjectStore):
    """A real store whose connection 'drops' after a few uploads. A fault injected in-process: a real
    server cannot be stopped at an exact point of an import from a test."""

    def __init__(self, settings, uploads_before_failure: int):
        super().__init__(settings)
        self.left = uploads_before_failure

    def put_bytes(self, key, data, content_type="application/octet-stream"):
        self.left -= 1
        if self.left < 0:
            raise StoreError("cannot upload: the S3 server does not answer")
        super().put_bytes(key, data, content_type)


def test_interrupted_import_publishes_no_catalog(store):
    dying = _StoreThatDies(store.settings, uploads_before_failure=15)
    with pytest.raises(StoreError):
        import_fashion_mnist(dying, split_names=("test",), limit=40, workers=2, progress=False)
    assert not store.exists("catalogs/fashion-mnist-test/catalog.jsonl")
    uploaded = len(store.list("catalogs/fashion-mnist-test/images/"))
    assert 0 < uploaded < 40
    # Running it again finishes the job, uploading only what is missing.
    uri = import_fashion_mnist(store, split_names=("test",), limit=40, workers=2, progress=False)["test"]
    assert len(store.list("catalogs/fashion-mnist-test/images/")) == 40
    assert validate_catalog(uri, store).ok


# ---- a user's folder -------------------------------------------------------------------------------

def test_import_folder_with_sub_folders(store, tmp_path):
    (tmp_path / "shoes").mkdir()
    (tmp_path / "bags").mkdir()
    (tmp_path / "shoes" / "boot1.jpg").write_bytes(_image_bytes("JPEG"))
    (tmp_path / "shoes" / "boot2.png").write_bytes(_image_bytes("PNG"))
    (tmp_path / "bags" / "tote.webp").write_bytes(_image_bytes("WEBP"))
    (tmp_path / "bags" / "broken.jpg").write_bytes(_image_bytes("JPEG")[:60])  # truncated
    (tmp_path / "notes.txt").write_text("not an image")

    result = import_folder(store, tmp_path, "mine", progress=False)
    assert result.rows == 3
    skipped = dict(result.skipped)
    assert set(skipped) == {"bags/broken.jpg", "notes.txt"}
    assert "corrupt or truncated" in skipped["bags/broken.jpg"]
    catalog = Catalog.open(result.uri, store)
    assert {r.listing_id: r.labels for r in catalog.rows} == {
        "boot1": {"category": "shoes"}, "boot2": {"category": "shoes"}, "tote": {"category": "bags"}}
    assert {r.image.rsplit(".", 1)[1] for r in catalog.rows} == {"jpg", "png", "webp"}
    assert validate_catalog(result.uri, store).ok


def test_import_folder_with_a_labels_csv(store, tmp_path, caplog):
    for name, color in (("a.jpg", (255, 0, 0)), ("b.png", (0, 255, 0)), ("c.png", (0, 0, 255))):
        (tmp_path / name).write_bytes(_image_bytes("JPEG" if name.endswith("jpg") else "PNG", color))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("filename,category,color\n"
                        "a.jpg,tops,red\n"
                        "b.png,bottoms,\n"        # missing color
                        "c.png,,blue\n"           # missing category
                        "bad.png,tops,black\n"    # unreadable image
                        "gone.jpg,tops,white\n")  # no such file
    with caplog.at_level("WARNING"):
        result = import_folder(store, tmp_path, "csv-labelled", labels_csv=csv_path, progress=False)
    assert result.rows == 3
    assert {f for f, _ in result.skipped} == {"bad.png", "gone.jpg"}
    assert "bad.png" in caplog.text and "gone.jpg" in caplog.text
    catalog = Catalog.open(result.uri, store)
    assert {r.listing_id: r.labels for r in catalog.rows} == {
        "a": {"category": "tops", "color": "red"}, "b": {"category": "bottoms"}, "c": {"color": "blue"}}

    # listing_id as the key column, through the command line
    by_id = tmp_path / "by_id.csv"
    by_id.write_text("listing_id,category\na,tops\nb,bottoms\n")
    assert main(["catalog", "import", "folder", str(tmp_path), "--name", "by-id", "--labels-csv", str(by_id)]) == 0
    assert {r.listing_id: r.labels["category"] for r in Catalog.open(resolve_catalog_uri("by-id"), store).rows} == {
        "a": "tops", "b": "bottoms"}


def test_import_folder_bad_input_is_one_line(store, tmp_path, capsys):
    assert main(["catalog", "import", "folder", str(tmp_path / "nowhere"), "--name", "x"]) == 1
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "junk.jpg").write_bytes(b"nope")
    assert main(["catalog", "import", "folder", str(tmp_path), "--name", "x"]) == 1
    err = capsys.readouterr().err
    assert "no readable images" in err and "Traceback" not in err
    assert store.list("catalogs/") == []


# ---- the store's failures reach the user as one line -----------------------------------------------

def test_import_with_the_store_down_fails_cleanly(store, tmp_path):
    env = {**store.settings.to_env(), "LOOKALIKE_S3_ENDPOINT": f"127.0.0.1:{free_port()}",
           "PATH": "/usr/bin:/bin", "LOOKALIKE_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "catalog", "import", "fashion-mnist",
                           "--limit", "10"], env=env, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 1
    assert "does not answer" in proc.stderr and "lookalike store up" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("change, expected", [
    ({"LOOKALIKE_S3_SECRET_KEY": "wrong"}, "refused the credentials"),
    ({"LOOKALIKE_S3_BUCKET": "no-such-bucket"}, "does not exist"),
])
def test_import_with_bad_store_settings_publishes_nothing(store, tmp_path, monkeypatch, capsys, change, expected):
    (tmp_path / "tops").mkdir()
    (tmp_path / "tops" / "a.png").write_bytes(_image_bytes())
    for key, value in change.items():
        monkeypatch.setenv(key, value)
    assert main(["catalog", "import", "folder", str(tmp_path), "--name", "mine"]) == 1
    assert main(["catalog", "import", "fashion-mnist", "--limit", "10"]) == 1
    err = capsys.readouterr().err
    assert err.count(expected) == 2 and "Traceback" not in err
    assert store.list("catalogs/") == []
