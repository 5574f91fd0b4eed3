"""The transformer's pieces without a server: photos sent as base64, listing metadata joined to an
answer, store photos answered as presigned URLs, the FP16 tensor it sends the predictor."""
from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from lookalike.core.preprocessing import PreprocessSpec, preprocess_batch


def test_base64_photos_are_recognised_and_raw_photos_left_alone():
    from lookalike.serving.protocol import maybe_base64

    png = _png_bytes(Image.new("RGB", (4, 4), "red"))
    assert maybe_base64(png) == png
    assert maybe_base64(base64.b64encode(png)) == png
    assert maybe_base64(b"not base64 at all!") == b"not base64 at all!"


def test_listing_metadata_reads_catalog_rows_and_skips_bad_ones(tmp_path):
    from lookalike.transformer.metadata import ListingMetadata, catalogs_named_in

    path = tmp_path / "catalog.jsonl"
    path.write_text(json.dumps({"listing_id": "a", "image": "img/a.png", "title": "Red bag",
                                "labels": {"category": "bags"}}) + "\n{not json\n" +
                    json.dumps({"listing_id": "b", "image": "s3://x/b.png"}) + "\n")
    meta = ListingMetadata(None, [str(path)])
    assert len(meta) == 2
    assert meta.get("a").title == "Red bag" and meta.get("a").category == "bags"
    assert meta.get("a").image == str(tmp_path.resolve() / "img" / "a.png")
    assert meta.get("b").title == "b"  # no title: the id stands in
    assert meta.get("zzz").title == "zzz"
    assert catalogs_named_in({"lineage": {"catalog": "s3://c/1"}, "catalogs": ["s3://c/2"]}) == ["s3://c/2", "s3://c/1"]


def test_listing_metadata_of_multi_photo_listings_and_the_answer_an_app_displays(tmp_path):
    from lookalike.transformer.answers import join
    from lookalike.transformer.metadata import ListingMetadata, PhotoUrls

    build, update = tmp_path / "build.jsonl", tmp_path / "update.jsonl"
    build.write_text(json.dumps({"listing_id": "a", "title": "Red bag", "labels": {"category": "bags", "color": "red"},
                                 "metadata": {"url": "https://shop.example/a", "price": "9.50", "stock": 3},
                                 "images": [{"uri": "https://cdn.example/a-front.jpg", "photo_id": "front"},
                                            {"uri": "https://cdn.example/a-back.jpg", "photo_id": "back"},
                                            "img/a-side.png"]}) + "\n" +
                     json.dumps({"listing_id": "b", "image": "https://cdn.example/b.jpg", "title": "Old"}) + "\n")
    update.write_text(json.dumps({"listing_id": "b", "title": "New", "images": ["https://cdn.example/b2.jpg"]}) + "\n")
    meta = ListingMetadata(None, [str(build), str(update)])  # an update's catalog after the build's: it wins
    a = meta.get("a")
    assert a.title == "Red bag" and a.labels == {"category": "bags", "color": "red"} and a.metadata["stock"] == 3
    assert [p for p, _ in a.photos] == ["front", "back", "2"] and a.photo("back") == "https://cdn.example/a-back.jpg"
    assert a.photo("2") == str(tmp_path.resolve() / "img" / "a-side.png") and a.photo(None) == a.image
    assert meta.get("b").title == "New"

    ids = np.array([[b"a", b"b", b""]], dtype=object)
    photos = np.array([[b"back", b"0", b""]], dtype=object)
    joined = join(ids, photos, np.array([[0.9, 0.5, 0.0]], np.float32), {"category": ["bags"]},
                  {"category": np.array([0.8], np.float32)}, meta, PhotoUrls(None))
    doc = json.loads(joined.documents[0])
    first, second = doc["matches"]
    assert len(doc["matches"]) == 2 and doc["labels"] == {"category": {"label": "bags", "probability": 0.8}}
    assert first == {"listing_id": "a", "title": "Red bag", "score": 0.9,
                     "labels": {"category": "bags", "color": "red"},
                     "metadata": {"url": "https://shop.example/a", "price": "9.50", "stock": 3}, "photo_id": "back",
                     "image_url": "https://cdn.example/a-back.jpg",
                     # a photo on the server's disk is no URL an app can fetch: left out
                     "image_urls": ["https://cdn.example/a-front.jpg", "https://cdn.example/a-back.jpg"],
                     "category": "bags", "image": "https://cdn.example/a-back.jpg"}
    assert second["image_url"] == "https://cdn.example/b2.jpg" and second["title"] == "New"
    assert joined.image_uris.tolist() == [[b"https://cdn.example/a-back.jpg", b"https://cdn.example/b2.jpg", b""]]
    assert joined.photo_ids.tolist() == [[b"back", b"0", b""]] and joined.titles[0, 0] == b"Red bag"


def test_store_photos_are_answered_as_presigned_urls_never_s3_uris(store):
    from lookalike.transformer.metadata import PhotoUrls

    store.put_bytes("catalogs/c/images/a.png", b"\x89PNG not really")
    urls = PhotoUrls(store, lifetime_s=120)
    url = urls.url(store.uri("catalogs/c/images/a.png"))
    assert url.startswith("http") and "X-Amz-Signature=" in url and "X-Amz-Expires=120" in url
    assert urls.url(store.uri("catalogs/c/images/a.png")) == url  # signed once, reused while young
    assert httpx.get(url, timeout=10).content == b"\x89PNG not really"
    assert httpx.get(url.split("?")[0], timeout=10).status_code in (400, 403)  # the bare object is not public
    assert urls.url("/srv/photos/a.png") == "" and urls.url("https://cdn.example/a.jpg") == "https://cdn.example/a.jpg"


def test_fp16_tensor_for_the_predictor_keeps_every_pixel_level():
    """The transformer sends FP16: every value must still name its exact 8-bit pixel level."""
    from lookalike.core.preprocessing import resize_and_crop
    from lookalike.transformer.server import predictor_tensor

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8))
    for spec in (PreprocessSpec(size=64, resize=72),  # lite0's 0.5/0.5
                 PreprocessSpec(size=64, resize=72, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))):
        batch = preprocess_batch([photo], spec)
        tensor = predictor_tensor(batch, "FP16")
        assert tensor.datatype == "FP16" and len(tensor._raw_data) == batch.size * 2
        wire = tensor.as_numpy().astype(np.float32)
        levels = (wire[0].transpose(1, 2, 0) * np.float32(spec.std) + np.float32(spec.mean)) * 255
        assert np.array_equal(np.rint(levels).astype(np.uint8), np.asarray(resize_and_crop(photo, spec)))
        assert np.abs(wire - batch).max() < 2e-3
    assert predictor_tensor(batch, "FP32").as_numpy().dtype == np.float32
    with pytest.raises(ValueError, match="FP16, FP32"):
        predictor_tensor(batch, "FP64")


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
