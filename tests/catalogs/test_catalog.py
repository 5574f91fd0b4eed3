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

from lookalike.cli.main import main
from lookalike.core.s3 import ObjectStore, StoreError
from lookalike.core.store_server import free_port
from lookalike.catalogs.rows import Catalog, CatalogError, validate_catalog
from lookalike.catalogs.importers import (BROAD_CATEGORY, FASHION_MNIST_CLASSES, import_fashion_mnist, import_folder,
                                          read_idx, resolve_catalog_uri, shade_of)


def _image_bytes(fmt: str = "PNG", color=(200, 30, 30), size=(24, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


# ---- the validator ---------------------------------------------------------------------------------

def test_validator_reports_every_broken_row_with_its_line(store, capsys):
    store.put_bytes("catalogs/t/images/good.png", _image_bytes())
    store.put_bytes("catalogs/t/images/other.png", _image_bytes(color=(0, 0, 200)))
    store.put_bytes("catalogs/t/images/garbage.png", b"this is not a png at all")
    good, other = store.uri("catalogs/t/images/good.png"), store.uri("catalogs/t/images/other.png")
    lines = [
        json.dumps({"listing_id": "a", "image": good, "labels": {"category": "tops"}}),             # 1 ok
        json.dumps({"listing_id": "b", "image": store.uri("catalogs/t/images/gone.png"), "labels": {}}),  # 2 missing
        json.dumps({"listing_id": "c", "image": store.uri("catalogs/t/images/garbage.png")}),  # 3 unreadable
        json.dumps({"listing_id": "d", "image": good, "labels": {"category": 3.5}}),                  # 4 label type
        json.dumps({"listing_id": "a", "image": other, "labels": {"category": "bags"}}),              # 5 conflict
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
    # an old one-photo row may repeat its listing (it adds a photo) but not change its labels
    assert "label 'category' is 'bags' here but 'tops' on line 1" in by_line[5]
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
    assert "4 listings, 4 photos" in out and "3 problems" in out and "lookalike catalog validate" in out


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
    assert "100 listings, 100 photos" in out and "task fine_category: 100 labelled photos" in out
    assert "  Sneaker: 10" in out
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


def test_reimporting_a_catalog_never_overwrites_a_photo_an_index_may_name(store, tmp_path):
    (tmp_path / "shoes").mkdir()
    (tmp_path / "bags").mkdir()
    (tmp_path / "shoes" / "boot.png").write_bytes(_image_bytes("PNG"))
    (tmp_path / "bags" / "tote.png").write_bytes(_image_bytes("PNG", color=(0, 200, 0)))
    first = {r.listing_id: r.image for r in Catalog.open(import_folder(store, tmp_path, "mine", progress=False).uri,
                                                           store).rows}
    (tmp_path / "shoes" / "boot.png").write_bytes(_image_bytes("PNG", color=(0, 0, 200)))  # the seller's new photo
    second = {r.listing_id: r.image for r in Catalog.open(import_folder(store, tmp_path, "mine", progress=False).uri,
                                                            store).rows}
    assert second["tote"] == first["tote"]  # unchanged: the same key
    assert second["boot"] != first["boot"]  # changed: a key of its own, the old photo still there, unchanged
    old_key, new_key = (uri.split("/", 3)[3] for uri in (first["boot"], second["boot"]))
    assert store.get_bytes(old_key) == _image_bytes("PNG") and store.get_bytes(new_key) != store.get_bytes(old_key)


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
    proc = subprocess.run([sys.executable, "-m", "lookalike.cli.main", "catalog", "import", "fashion-mnist",
                           "--limit", "10"], env=env, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
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


# ---- listings with several photos ------------------------------------------------------------------

def test_a_listing_line_holds_its_photos_title_labels_and_metadata(store, tmp_path, monkeypatch):
    from lookalike.catalogs.rows import write_catalog

    monkeypatch.setenv("LOOKALIKE_PHOTO_HOSTS", "127.0.0.1")  # the loopback store stands in for a seller's CDN
    store.put_bytes("catalogs/t/images/front.png", _image_bytes(color=(200, 0, 0)))
    store.put_bytes("catalogs/t/images/back.png", _image_bytes(color=(0, 200, 0)))
    (tmp_path / "side.png").write_bytes(_image_bytes(color=(0, 0, 200)))
    # an http(s) photo: a presigned URL of the store stands in for a seller's CDN
    cdn = store.presigned_url("catalogs/t/images/back.png", 600)
    lines = [
        {"listing_id": "L1", "title": "Red apple", "labels": {"category": "fruit", "color": "red"},
         "metadata": {"url": "https://shop.example/l1", "price": "3.20", "stock": 4, "organic": True},
         "source": "catalog",
         "images": [{"uri": store.uri("catalogs/t/images/front.png"), "photo_id": "front"},
                    {"uri": cdn, "photo_id": "cdn", "source": "user_photo"}, "side.png"]},
        # old one-photo rows of one listing merge into it
        {"listing_id": "L2", "image": store.uri("catalogs/t/images/back.png"), "labels": {"category": "veg"}},
        {"listing_id": "L2", "image": "side.png", "labels": {"category": "veg", "color": "blue"}, "title": "Leek"},
    ]
    path = tmp_path / "catalog.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    catalog = Catalog.open(path, store)
    assert len(catalog) == 5 and list(catalog.listings()) == ["L1", "L2"]
    l1 = catalog.listings()["L1"]
    assert [(r.photo_id, r.source) for r in l1] == [("front", "catalog"), ("cdn", "user_photo"), ("2", "catalog")]
    assert all(r.title == "Red apple" and r.labels == {"category": "fruit", "color": "red"} for r in l1)
    assert l1[0].metadata == {"url": "https://shop.example/l1", "price": "3.20", "stock": 4, "organic": True}
    l2 = catalog.listings()["L2"]
    assert [r.photo_id for r in l2] == ["0", "1"] and l2[0].title == "Leek"
    assert l2[1].labels == {"category": "veg", "color": "blue"}
    assert catalog.load_image(l1[1]).size == (24, 20)  # read over http
    report = validate_catalog(path, store)
    assert report.ok and (report.rows, report.listings, report.photos) == (3, 2, 5), report.summary()

    # written back: one line per listing, the fields once, the photos in `images`
    out = tmp_path / "out" / "catalog.jsonl"
    write_catalog(catalog.rows, out)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["listing_id"] for w in written] == ["L1", "L2"]
    assert written[0]["metadata"]["price"] == "3.20" and written[0]["title"] == "Red apple"
    assert [i["photo_id"] for i in written[0]["images"]] == ["front", "cdn", "2"]
    again = Catalog.open(out)
    assert [(r.listing_id, r.photo_id, r.image, r.labels, r.metadata, r.title, r.source) for r in again.rows] == [
        (r.listing_id, r.photo_id, r.image, r.labels, r.metadata, r.title, r.source) for r in catalog.rows]


def test_the_validator_reports_per_photo_and_per_listing(store, tmp_path, capsys):
    good, other = store.uri("catalogs/t/images/good.png"), store.uri("catalogs/t/images/other.png")
    store.put_bytes("catalogs/t/images/good.png", _image_bytes())
    store.put_bytes("catalogs/t/images/other.png", _image_bytes(color=(0, 0, 200)))
    store.put_bytes("catalogs/t/images/garbage.png", b"not a png")
    lines = [
        {"listing_id": "ok", "labels": {"category": "a"}, "images": [good, other]},                         # 1
        {"listing_id": "same-uri", "labels": {"category": "b"}, "images": [good, good]},                    # 2
        {"listing_id": "same-id", "images": [{"uri": good, "photo_id": "x"}, {"uri": other, "photo_id": "x"}]},
        {"listing_id": "ok", "images": [other]},                                                            # 4
        {"listing_id": "meta", "metadata": {"sizes": ["S", "M"], "price": {"eur": 3}, "url": "u"},
         "images": [good]},                                                                                  # 5
        {"listing_id": "broken",  # 6
         "images": [store.uri("catalogs/t/images/garbage.png"), store.uri("catalogs/t/images/gone.png")]},
        {"listing_id": "half", "labels": {"category": "b"},  # 7
         "images": [good, store.uri("catalogs/t/images/gone.png")]},
        {"listing_id": "empty", "images": []},                                                              # 8
    ]
    store.put_bytes("catalogs/multi/catalog.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode())
    uri = store.uri("catalogs/multi/catalog.jsonl")
    report = validate_catalog(uri, store)
    text = [str(p) for p in report.problems]
    by_line: dict[int, list[str]] = {}
    for p in report.problems:
        by_line.setdefault(p.line, []).append(p.message)
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8], report.summary()
    assert by_line[2] == [f"photo {good} is listed twice (photo ids '0' and '1'): list each photo once"]
    assert "photo id 'x' names two photos" in by_line[3][0]
    assert by_line[4] == ["listing id 'ok' is on two lines (first on line 1): give a listing's photos as one "
                          "line's images list"]
    assert len(by_line[5]) == 2 and all("metadata values must be strings, numbers or booleans" in m
                                        for m in by_line[5])  # one line per bad field
    assert "'sizes' is a list" in by_line[5][0] and "'price' is a dict" in by_line[5][1]
    assert len(by_line[6]) == 3 and "unreadable" in by_line[6][0] and "does not exist" in by_line[6][1]
    assert "the listing has no readable photo (all 2 photos above fail)" in by_line[6][2]
    # one bad photo of two
    assert by_line[7] == [f"photo '1' ({store.uri('catalogs/t/images/gone.png')}) does not exist"]
    assert "images must be a non-empty list" in by_line[8][0]
    assert all(line.startswith("line ") for line in text)
    assert main(["catalog", "validate", uri]) == 1
    out = capsys.readouterr().out
    assert "8 lines: 3 listings with 6 photos" in out and "line 6 (broken)" in out


def test_import_folder_csv_with_several_photos_labels_and_metadata(store, tmp_path, capsys):
    for name, color in (("l1/front.jpg", (255, 0, 0)), ("l1/back.jpg", (250, 10, 10)), ("pear.png", (0, 255, 0)),
                        ("kiwi-a.png", (0, 120, 0)), ("kiwi-b.png", (0, 110, 0))):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(_image_bytes("JPEG" if name.endswith("jpg") else "PNG", color))
    (tmp_path / "bad-1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "bad-2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    csv_path = tmp_path / "listings.csv"
    csv_path.write_text("listing_id,filename,title,category,color,url,price,notes\n"
                        "L1,l1/front.jpg,Red apple,fruit,red,https://shop.example/l1,3.20,x\n"
                        "L1,l1/back.jpg,,,,,,\n"                       # its second photo: the fields said once
                        "L2,pear.png,Pear,pome,green,https://shop.example/l2,1.10,\n"
                        "L3,bad-1.png,Broken,fruit,red,,,\n"
                        "L3,bad-2.png,,,,,,\n")                        # no readable photo: L3 is left out
    code = main(["catalog", "import", "folder", str(tmp_path), "--name", "fruit", "--labels-csv", str(csv_path),
                 "--label-columns", "category,color", "--metadata-columns", "url,price"])
    out = capsys.readouterr().out
    assert code == 0
    assert "imported 2 listings with 3 photos" in out and "columns not imported (neither labels nor metadata): " \
                                                          "notes" in out
    assert "L3: no readable photo among its 2: the listing was not imported" in out
    catalog = Catalog.open(resolve_catalog_uri("fruit"), store)
    listings = catalog.listings()
    assert list(listings) == ["L1", "L2"] and [r.photo_id for r in listings["L1"]] == ["0", "1"]
    first = listings["L1"][0]
    assert first.title == "Red apple" and first.labels == {"category": "fruit", "color": "red"}
    assert first.metadata == {"url": "https://shop.example/l1", "price": "3.20"}  # text, untouched
    assert set(catalog.tasks()) == {"category", "color"}  # metadata is not a training task
    assert sorted(store.list("catalogs/fruit/images/")) == [
        "catalogs/fruit/images/L1/0.jpg", "catalogs/fruit/images/L1/1.jpg", "catalogs/fruit/images/L2.png"]
    assert validate_catalog(catalog.uri, store).ok

    # every photo of a listing in one `filenames` cell; default columns: the rest are labels, title the title
    cell = tmp_path / "cell.csv"
    cell.write_text("listing_id,filenames,title,category\nK,kiwi-a.png;kiwi-b.png,Kiwi,fruit\nP,pear.png,,fruit\n")
    assert main(["catalog", "import", "folder", str(tmp_path), "--name", "kiwi", "--labels-csv", str(cell)]) == 0
    kiwi = Catalog.open(resolve_catalog_uri("kiwi"), store).listings()
    assert [r.photo_id for r in kiwi["K"]] == ["0", "1"] and kiwi["K"][0].title == "Kiwi"
    assert kiwi["P"][0].title is None and kiwi["P"][0].labels == {"category": "fruit"}  # a file name is no title
    capsys.readouterr()


@pytest.mark.parametrize("csv_text, args, message", [
    ("listing_id,filename,color\nL1,a.png,red\nL1,b.png,blue\n", [],
     "listing L1 has label 'color' = 'blue' here but 'red' on line 2"),
    ("listing_id,filename,color\nL1,a.png,red\nL2,a.png,red\n", [], "a.png is named again (first on line 2)"),
    ("listing_id,filename,color\nL1,a.png,red\n", ["--label-columns", "colour"],
     "--label-columns names 'colour', which the CSV does not have; its columns are listing_id, filename, color"),
    ("listing_id,filename,color\nL1,a.png,red\n", ["--label-columns", "color", "--metadata-columns", "color"],
     "'color' is named as a label and as metadata"),
    ("name,color\na.png,red\n", [], "the first line must be a header naming the files"),
])
def test_a_bad_listing_csv_is_one_line_and_imports_nothing(store, tmp_path, capsys, csv_text, args, message):
    (tmp_path / "a.png").write_bytes(_image_bytes())
    (tmp_path / "b.png").write_bytes(_image_bytes(color=(0, 0, 9)))
    (tmp_path / "listings.csv").write_text(csv_text)
    assert main(["catalog", "import", "folder", str(tmp_path), "--name", "x", "--labels-csv",
                 str(tmp_path / "listings.csv"), *args]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert store.list("catalogs/") == []
