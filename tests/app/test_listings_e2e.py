"""Listings with several photos, end to end and for real: a Fashion-MNIST catalog of 60 listings × 3 photos
(the product, its mirror image, a close-up) with titles and metadata, imported from a folder and a CSV,
indexed by the `index` pipeline (kfp.local), served by the two KServe servers, and searched: the answer
holds listings (each once, top_k of them), the photo that matched, the title, metadata, every label and
photo URLs an app can fetch. Then an `update` run adds, replaces and delists listings, and the servers,
following the production alias, answer with the new ones, titles and all. Bad updates fail at the right
step with one clear line and publish nothing.

The model is tf_efficientnet_lite0 with its packaged ImageNet weights at 64 px, untrained, as in
tests/test_serving.py: a catalog photo finds itself at cosine 1 whatever the weights.
"""
from __future__ import annotations

import base64
import io
import json
import os
import time

import httpx
import numpy as np
import pytest
from conftest import fresh_bucket
from PIL import Image, ImageOps

from lookalike.pipelines.local import PipelineFailed, run_local
from lookalike.core.artifacts import index_repo
from lookalike.core.preprocessing import PreprocessSpec

pytestmark = pytest.mark.slow

LISTINGS, VIEWS = 60, ("front", "mirror", "detail")
INDEX_PARAMS = {"phone_queries": 20, "min_recall_at_10": 0.0, "min_index_recall": 0.5, "check_images": False}


def _views(pixels: np.ndarray) -> dict[str, bytes]:
    """A product's three photos: as it is, mirrored, and a close-up (cropped and enlarged back to 28 px)."""
    img = Image.fromarray(pixels)
    views = {"front": img, "mirror": ImageOps.mirror(img), "detail": img.crop((3, 3, 25, 25)).resize((28, 28))}
    out = {}
    for name, view in views.items():
        buf = io.BytesIO()
        view.save(buf, format="PNG")
        out[name] = buf.getvalue()
    return out


def _write_folder(directory, picks, images, labels, prefix: str, title=lambda i, fine: f"{fine} no. {i}",
                  views=VIEWS) -> dict[str, dict[str, bytes]]:
    """Photos and a listings CSV (one row per photo) for Fashion-MNIST images `picks`; returns the photos."""
    from lookalike.catalogs.importers import BROAD_CATEGORY, FASHION_MNIST_CLASSES

    directory.mkdir(parents=True, exist_ok=True)
    lines = ["listing_id,filename,photo_id,title,category,fine_category,url,price"]
    photos = {}
    for n, i in enumerate(picks):
        lid = f"{prefix}-{n:03d}"
        fine = FASHION_MNIST_CLASSES[int(labels[i])]
        photos[lid] = {v: b for v, b in _views(images[i]).items() if v in views}
        for k, (view, data) in enumerate(photos[lid].items()):
            (directory / f"{lid}-{view}.png").write_bytes(data)
            fields = [title(n, fine), BROAD_CATEGORY[fine], fine, f"https://shop.example/{lid}", f"{10 + n}.50"]
            lines.append(",".join([lid, f"{lid}-{view}.png", view] + (fields if k == 0 else [""] * len(fields))))
    (directory / "listings.csv").write_text("\n".join(lines) + "\n")
    return photos


@pytest.fixture(scope="module")
def served(s3_server, tmp_path_factory):
    """A published model, a multi-photo catalog indexed by the index pipeline, and the two servers serving them."""
    from lookalike.app.serving_stack import ServingStack
    from lookalike.core.artifacts import model_repo, new_version
    from lookalike.training.export import export_model, publish_model
    from lookalike.catalogs.importers import import_folder, load_fashion_mnist
    from lookalike.training.model import ModelConfig, create_model

    home = tmp_path_factory.mktemp("home")
    dirs = {"LOOKALIKE_CACHE": str(home / "cache"), "LOOKALIKE_HOME": str(home)}
    with fresh_bucket(s3_server, "listings", **dirs) as store:
        env = {**store.settings.to_env(), **dirs}
        images, labels = load_fashion_mnist("train")
        picks = np.random.default_rng(13).choice(len(labels), LISTINGS + 10, replace=False)
        folder = tmp_path_factory.mktemp("catalog")
        photos = _write_folder(folder, picks[:LISTINGS], images, labels, "m")
        result = import_folder(store, folder, "multi", labels_csv=folder / "listings.csv",
                               metadata_columns=["url", "price"], progress=False)
        assert (result.listings, result.rows) == (LISTINGS, LISTINGS * len(VIEWS)), str(result)

        config = ModelConfig(embedding_dim=32, heads={"category": sorted({"tops", "bottoms", "dresses", "outerwear",
                                                                            "footwear", "bags"})},
                             preprocessing=PreprocessSpec(size=64, resize=72, interpolation="bilinear"))
        out = tmp_path_factory.mktemp("model")
        export_model(create_model(config), config, out, model_version=new_version(), lineage={"catalog": result.uri})
        model_version = publish_model(store, out, alias="production")
        # Embedded in 3 shards (the pipeline's fan-out: one task per shard, collected into one index).
        run = run_local("index", {"catalog_uri": "multi", "model_ref": "production", "embed_shards": 3,
                                  **INDEX_PARAMS},
                        root=home / "runs", out=io.StringIO())
        stack = ServingStack({**os.environ, **env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
                             model_version="production", index_version="production", log_dir=home / "logs",
                             predictor_args=["--refresh_seconds", "1"])
        try:
            stack.start()
            yield {"store": store, "home": home, "stack": stack, "photos": photos, "catalog_uri": result.uri,
                   "model_version": model_version, "index_version": run.outputs["Output"], "images": images,
                   "labels": labels, "spare": picks[LISTINGS:], "model_repo": model_repo(store)}
        finally:
            stack.stop()


def _search(served, photo: bytes, top_k: int = 10) -> tuple[list[dict], dict, str]:
    """One photo through the transformer's REST endpoint as plain JSON: (matches, all outputs, index version)."""
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                        "data": [base64.b64encode(photo).decode()]}], "parameters": {"top_k": top_k}}
    response = httpx.post(f"{served['stack'].endpoints['transformer_rest']}/v2/models/lookalike/infer", json=body,
                          timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert "s3://" not in response.text  # photos are fetchable URLs, never bare store URIs
    outputs = {o["name"]: o for o in answer["outputs"]}
    return json.loads(outputs["matches"]["data"][0])["matches"], outputs, answer["parameters"]["index_version"]


def _check_listing(match: dict, served, lid: str) -> None:
    """The match carries what an app shows, and its photo URLs fetch the catalog's photos."""
    photos = served["photos"][lid]
    assert match["title"].endswith(f"no. {int(lid.split('-')[1])}") and match["metadata"] == {
        "url": f"https://shop.example/{lid}", "price": f"{10 + int(lid.split('-')[1])}.50"}
    assert set(match["labels"]) == {"category", "fine_category"} and match["category"] == match["labels"]["category"]
    got = httpx.get(match["image_url"], timeout=10)
    assert got.status_code == 200 and got.content == photos[match["photo_id"]]
    assert len(match["image_urls"]) == len(photos)
    assert sorted(httpx.get(u, timeout=10).content for u in match["image_urls"]) == sorted(photos.values())


def test_search_returns_listings_with_the_matched_photo_title_metadata_and_fetchable_urls(served):
    card = index_repo(served["store"], served["model_version"]).read_json(served["index_version"], "index.json")
    assert card["count"] == LISTINGS * 3 and card["listing_count"] == LISTINGS
    assert card["catalogs"] == [served["catalog_uri"]]
    for lid, view in (("m-007", "detail"), ("m-021", "mirror"), ("m-042", "front")):
        matches, outputs, version = _search(served, served["photos"][lid][view])
        assert version == served["index_version"]
        ids = [m["listing_id"] for m in matches]
        assert len(ids) == 10 == len(set(ids))  # top_k listings, never one twice
        best = matches[0]
        assert best["listing_id"] == lid and best["photo_id"] == view and best["score"] > 0.999
        _check_listing(best, served, lid)
        # the tensors older clients read: the same listings, the matched photo, fetchable
        assert outputs["listing_ids"]["data"][:10] == ids
        assert outputs["photo_ids"]["data"][0] == view
        assert outputs["titles"]["data"][0] == best["title"]
        assert outputs["image_uris"]["data"][0] == best["image_url"]


def test_shards_embed_what_one_pass_embeds(served, tmp_path):
    """The fan-out's shards, collected, hold exactly the photos and vectors of one unsharded pass, and a
    listing's photos never straddle two shards."""
    from lookalike.pipelines.steps.prepare import prepare_catalog
    from lookalike.pipelines.steps.embed import embed_catalog, load_embeddings
    from lookalike.core.artifacts import model_repo

    class Artifact:
        def __init__(self, path, metadata=None):
            self.path, self.metadata = str(path), dict(metadata or {})

    model = Artifact(model_repo(served["store"]).fetch("production"))
    parts = {part: Artifact(tmp_path / f"{part}.jsonl") for part in ("catalog", "train_set", "eval_set")}
    prepare_catalog(served["catalog_uri"], 0.0, 0, False, for_training=False, **parts)
    catalog = parts["catalog"]

    def run(shards: int) -> list[Artifact]:
        outs = [Artifact(tmp_path / f"{shards}-{k}") for k in range(shards)]
        for k, out in enumerate(outs):
            embed_catalog(model, catalog, batch_size=16, device="cpu", embeddings=out, shard=k, shards=shards)
        return outs

    one = load_embeddings([a.path for a in run(1)])
    three_parts = run(3)
    three = load_embeddings([a.path for a in three_parts])
    key = lambda ids, info: list(zip(ids, info["photo_ids"]))  # noqa: E731
    assert sorted(key(one[1], one[3])) == sorted(key(three[1], three[3])) and len(one[1]) == LISTINGS * len(VIEWS)
    order = {k: i for i, k in enumerate(key(three[1], three[3]))}
    rows = [order[k] for k in key(one[1], one[3])]
    assert np.allclose(one[0], three[0][rows], atol=1e-5)
    owners = [set(load_embeddings(a.path)[1]) for a in three_parts]
    assert not (owners[0] & owners[1]) and not (owners[1] & owners[2]) and min(map(len, owners)) == LISTINGS // 3


def test_an_update_adds_replaces_and_delists_listings_and_search_follows(served):
    store, home = served["store"], served["home"]
    images, labels, spare = served["images"], served["labels"], served["spare"]
    folder = home / "new-listings"
    fresh = _write_folder(folder, spare[:4], images, labels, "n", views=("front", "detail"))
    # m-003 again, with new photos, labels and title: the update replaces the whole listing
    changed = _views(images[spare[4]])
    for view in ("front", "mirror"):
        (folder / f"changed-{view}.png").write_bytes(changed[view])
    with open(folder / "listings.csv", "a") as csv_file:
        csv_file.write("m-003,changed-front.png,front,Replaced coat,outerwear,Coat,https://shop.example/m-003,99.00\n"
                       "m-003,changed-mirror.png,mirror,,,,,\n")
    from lookalike.catalogs.importers import import_folder

    new = import_folder(store, folder, "multi-new", labels_csv=folder / "listings.csv",
                        metadata_columns=["url", "price"], progress=False)
    assert new.listings == 5, str(new)
    store.put_bytes("delisted/today.txt", b"m-000\nm-001\nnever-there\n")
    log = io.StringIO()
    result = run_local("update", {"new_listings_uri": "multi-new", "delisted_uri": store.uri("delisted/today.txt"),
                                  **INDEX_PARAMS}, root=home / "runs", out=log)
    after = result.outputs["Output"]
    printed = log.getvalue()
    assert "delisted ids not in index" in printed and "never-there" in printed, printed[-3000:]

    indexes = index_repo(store, served["model_version"])
    assert indexes.aliases() == {"production": after}
    card = indexes.read_json(after, "index.json")
    assert card["catalogs"] == [served["catalog_uri"], new.uri]  # the build's catalog and the update's
    assert card["listing_count"] == LISTINGS - 2 + 4 and card["parent_version"] == served["index_version"]

    # the predictor follows the alias; the transformer loads the new catalog from the new index's card
    query = fresh["n-002"]["detail"]
    deadline = time.monotonic() + 120
    while True:
        matches, _, version = _search(served, query)
        if version == after or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert version == after, "the servers did not move to the updated index"
    best = matches[0]
    assert best["listing_id"] == "n-002" and best["photo_id"] == "detail" and best["title"].endswith("no. 2")
    assert best["metadata"]["url"] == "https://shop.example/n-002" and len(best["image_urls"]) == 2
    assert httpx.get(best["image_url"], timeout=10).content == query

    replaced, _, _ = _search(served, changed["mirror"])
    assert replaced[0]["listing_id"] == "m-003" and replaced[0]["title"] == "Replaced coat"
    assert replaced[0]["photo_id"] == "mirror" and len(replaced[0]["image_urls"]) == 2
    assert replaced[0]["labels"] == {"category": "outerwear", "fine_category": "Coat"}
    gone, _, _ = _search(served, served["photos"]["m-000"]["front"], top_k=20)
    ids = [m["listing_id"] for m in gone]
    assert "m-000" not in ids and "m-001" not in ids and len(ids) == 20 == len(set(ids))
    kept, _, _ = _search(served, served["photos"]["m-042"]["mirror"])
    assert kept[0]["listing_id"] == "m-042" and kept[0]["title"].endswith("no. 42")  # the build's catalog still joins


def _put_catalog(store, name: str, lines: list[dict]) -> str:
    store.put_bytes(f"catalogs/{name}/catalog.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode())
    return store.uri(f"catalogs/{name}/catalog.jsonl")


def _update_fails(served, uri: str) -> PipelineFailed:
    """Run the update pipeline on new listings that must fail it; nothing may be published or re-aliased."""
    indexes = index_repo(served["store"], served["model_version"])
    before = indexes.versions(), indexes.aliases()
    with pytest.raises(PipelineFailed) as failed:
        run_local("update", {"new_listings_uri": uri, **INDEX_PARAMS}, root=served["home"] / "runs",
                  out=io.StringIO())
    assert (indexes.versions(), indexes.aliases()) == before
    return failed.value


def test_an_update_whose_listings_all_fail_to_decode_publishes_nothing(served):
    store = served["store"]
    store.put_bytes("catalogs/broken/images/a.png", b"\x89PNG\r\n\x1a\n not a png")
    store.put_bytes("catalogs/broken/images/b.jpg", b"\xff\xd8\xff\xe0 not a jpeg")
    uri = _put_catalog(store, "broken", [
        {"listing_id": "b-1", "title": "Broken", "labels": {"category": "bags"},
         "images": [store.uri("catalogs/broken/images/a.png"), store.uri("catalogs/broken/images/b.jpg")]},
        {"listing_id": "b-2", "labels": {"category": "bags"},
         "images": [store.uri("catalogs/broken/images/gone.png")]}])
    failed = _update_fails(served, uri)
    assert failed.step == "embed-catalog"
    message = str(failed)
    assert "none of the 2 listings" in message and "has a photo that can be read" in message
    assert "Nothing was published" in message


def test_an_update_with_duplicate_photos_or_bad_metadata_fails_at_prepare(served):
    store = served["store"]
    photo = served["catalog_uri"].rsplit("/", 1)[0] + "/images/m-010/front.png"
    uri = _put_catalog(store, "sloppy", [
        {"listing_id": "s-1", "labels": {"category": "bags"}, "images": [photo, photo]},
        {"listing_id": "s-2", "labels": {"category": "tops"}, "metadata": {"sizes": ["S", "M"]}, "images": [photo]}])
    failed = _update_fails(served, uri)
    assert failed.step == "prepare-catalog"
    message = str(failed)
    assert f"line 1 (s-1): photo {photo} is listed twice" in message
    assert "line 2 (s-2): metadata field 'sizes' is a list" in message
