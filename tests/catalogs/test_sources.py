"""Seller-written catalogs: photo locations are refused before anything is read unless they are catalog
photos in the store, public http(s) URLs, or files beside a local catalog; each refusal is one line and
the listing is skipped, not the run. A real HTTP server on loopback counts what reaches it."""
from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from lookalike.catalogs.rows import validate_catalog
from lookalike.catalogs.sources import PhotoRefused, check_location, fetch_url, is_photo_key


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), "red").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def web():
    """A loopback server: /photo.png, /big (2 MB), /hop (redirects to the metadata address); counts hits."""
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            hits.append(self.path)
            if self.path == "/hop":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data/iam/credentials")
                self.end_headers()
                return
            body = b"x" * 2_000_000 if self.path == "/big" else _png()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


def test_only_catalog_photos_are_photo_keys():
    assert is_photo_key("catalogs/fruit/images/L1/front.webp")
    for key in ("models/v1/model.safetensors", "catalogs/fruit/catalog.jsonl", "catalogs/fruit/images/",
                "indexes/m/v/index.faiss", "catalogs/../models/v1/images/a.png", "catalogsx/a/images/b.png"):
        assert not is_photo_key(key), key


@pytest.mark.parametrize("location, words", [
    ("s3://lookalike/models/20261124T0102/model.safetensors", "not a catalog photo"),
    ("http://169.254.169.254/latest/meta-data/iam/credentials", "169.254.169.254, which is not a public"),
    ("http://[::1]:8080/a.jpg", "not a public address"),
    ("file:///etc/hostname", "only s3://, http(s):// and catalog-relative paths"),
    ("/etc/hostname", "a local path, which a catalog in the store may not name"),
])
def test_locations_refused_before_anything_is_read(location, words):
    with pytest.raises(PhotoRefused, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        check_location(location, None)


def test_local_paths_stay_inside_a_local_catalogs_folder(tmp_path, monkeypatch):
    check_location(str(tmp_path / "images" / "a.png"), tmp_path)  # beside the catalog: fine
    with pytest.raises(PhotoRefused, match="outside the catalog's folder"):
        check_location("/etc/hostname", tmp_path)
    with pytest.raises(PhotoRefused, match="outside the catalog's folder"):
        check_location(str(tmp_path / ".." / "elsewhere.png"), tmp_path)
    monkeypatch.setenv("LOOKALIKE_ALLOW_LOCAL_PHOTOS", "1")  # the operator says so
    check_location("/etc/hostname", None)


def test_urls_are_fetched_from_public_addresses_only(web, monkeypatch):
    base, hits = web
    with pytest.raises(PhotoRefused, match="127.0.0.1, which is not a public address"):
        fetch_url(f"{base}/photo.png", 1_000_000)
    assert hits == []  # refused before connecting
    monkeypatch.setenv("LOOKALIKE_PHOTO_HOSTS", "127.0.0.1")  # the marketplace's own CDN, say
    assert fetch_url(f"{base}/photo.png", 1_000_000) == _png()
    with pytest.raises(PhotoRefused, match="169.254.169.254, which is not a public address"):
        fetch_url(f"{base}/hop", 1_000_000)  # every redirect is checked again
    with pytest.raises(PhotoRefused, match="the photo limit is 1,000,000"):
        fetch_url(f"{base}/big", 1_000_000)
    assert hits == ["/photo.png", "/hop", "/big"]


def test_validation_refuses_each_with_one_line_and_skips_only_those_listings(tmp_path, web):
    base, hits = web
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "good.png").write_bytes(_png())
    rows = [{"listing_id": "good", "images": ["images/good.png"], "labels": {"category": "a"}},
            {"listing_id": "also-good", "images": ["images/good.png"], "labels": {"category": "b"}},
            {"listing_id": "model-file", "images": ["s3://lookalike/models/v1/model.safetensors"]},
            {"listing_id": "metadata", "images": ["http://169.254.169.254/latest/meta-data/iam/credentials"]},
            {"listing_id": "loopback", "images": [f"{base}/latest/meta-data/iam/credentials"]},
            {"listing_id": "hostname", "images": ["/etc/hostname"]}]
    path = tmp_path / "catalog.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = validate_catalog(path, check_images=True)
    refusals = [p for p in report.problems if "refused" in p.message]
    assert sorted(p.listing_id for p in refusals) == ["hostname", "loopback", "metadata", "model-file"]
    assert all(p.skip_listing for p in refusals) and len(refusals) == 4
    assert report.ok and report.skipped_listings == {"hostname", "loopback", "metadata", "model-file"}
    assert hits == []  # nothing was fetched


def test_the_transformer_signs_catalog_photos_only(store):
    from lookalike.transformer.metadata import PhotoUrls

    store.put_bytes("catalogs/c/images/a.png", _png())
    store.put_bytes("models/v1/model.safetensors", b"weights")
    urls = PhotoUrls(store)
    assert "X-Amz-Signature=" in urls.url(store.uri("catalogs/c/images/a.png"))
    assert urls.url(store.uri("models/v1/model.safetensors")) == ""
    assert urls.url(store.uri("catalogs/c/catalog.jsonl")) == ""
