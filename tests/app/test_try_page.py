"""The try page (`lookalike/app/try_page.py` + `lookalike/app/web/`): its proxy forwards only the inference, metadata
and ready routes and passes v2 errors through unchanged; /photo serves catalog photos and nothing else; and,
in a real headless Chromium against a real serving stack, a photo dropped on the page shows its listings,
the versions that answered, "more like this" on a result shows that listing's lookalikes, and the server's
own message when the photo is not one.

`LOOKALIKE_SCREENSHOT=1` also saves the page with real results to docs/images/try_page.png (the README's).
"""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import test_serving  # the serving tests' model/index pair and stack fixtures, reused as they are

from lookalike.app.try_page import TryPageServer, image_type, photo_key
from lookalike.core.s3 import S3Settings

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "images" / "try_page.png"
CHROMIUM = "/usr/bin/chromium"  # Debian's package; install.sh installs it. Never a downloaded browser.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
MODEL = "lookalike"

pair = test_serving.pair
stack = test_serving.stack


# ---- the proxy, against a stand-in transformer (no browser, no model) ----------------------------

class _FakeTransformer(BaseHTTPRequestHandler):
    """Records what reaches it; answers infer with a v2 error, ready and metadata with 200."""

    seen: list
    protocol_version = "HTTP/1.1"

    def _answer(self, status: int, body: bytes, content_type: str = "application/json", **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.seen.append(("GET", self.path, dict(self.headers), b""))
        self._answer(200, json.dumps({"name": MODEL, "ready": True}).encode())

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.seen.append(("POST", self.path, dict(self.headers), body))
        self._answer(400, b'{"error":"the image is not an image we can read (JPEG, PNG or WebP expected)"}',
                     x_request_id="r-42")

    def log_message(self, *args):
        pass


@pytest.fixture
def fake():
    handler = type("Handler", (_FakeTransformer,), {"seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    page = TryPageServer(f"http://127.0.0.1:{server.server_address[1]}", s3=S3Settings(bucket="shop"),
                         max_body_bytes=1000).start()
    try:
        yield page, handler.seen
    finally:
        page.stop()
        server.shutdown()
        server.server_close()


def _raw(page: TryPageServer, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """One request exactly as written (httpx would normalise a path like /../x)."""
    conn = http.client.HTTPConnection("127.0.0.1", page.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, dict(reply.getheaders()), reply.read()
    finally:
        conn.close()


def test_infer_is_forwarded_unchanged_and_a_v2_error_comes_back_as_it_was(fake):
    page, seen = fake
    body = b'{"inputs":[]}' + b"\x00\x01binary"
    status, headers, answer = _raw(page, "POST", f"/v2/models/{MODEL}/infer", body, {
        "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "13", "Cookie": "secret"})
    assert status == 400
    assert answer == b'{"error":"the image is not an image we can read (JPEG, PNG or WebP expected)"}'
    assert headers["Content-Type"] == "application/json" and headers["X-Request-Id"] == "r-42"
    [(method, path, sent, got)] = seen
    assert (method, path, got) == ("POST", f"/v2/models/{MODEL}/infer", body)
    assert sent["Content-Type"] == "application/octet-stream" and sent["Inference-Header-Content-Length"] == "13"
    assert "Cookie" not in sent  # only the v2 headers travel on

    for path in (f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/ready"):
        assert _raw(page, "GET", path)[0] == 200
    assert [s[1] for s in seen[1:]] == [f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/ready"]


def test_nothing_but_inference_metadata_and_ready_reaches_the_transformer(fake):
    page, seen = fake
    for method, path in (("POST", f"/v2/repository/models/{MODEL}/unload"),
                         ("POST", f"/v2/repository/models/{MODEL}/load"),
                         ("POST", "/v2/models/../repository/models/x/infer"), ("GET", "/v2/health/ready"),
                         ("GET", "/v2/repository/index"), ("GET", "/metrics"), ("POST", "/v1/models/x:predict"),
                         ("GET", "/../pyproject.toml"), ("GET", "/web/../try_page.py"), ("GET", "/try_page.py")):
        status, headers, answer = _raw(page, method, path, b"{}" if method == "POST" else b"")
        assert status == 404, (method, path)
        assert "error" in json.loads(answer)
    assert _raw(page, "DELETE", f"/v2/models/{MODEL}")[0] == 405
    assert seen == []


def test_a_body_over_the_cap_is_413_with_a_message_and_never_forwarded(fake):
    page, seen = fake
    status, _, answer = _raw(page, "POST", f"/v2/models/{MODEL}/infer", b"x" * 1001,
                             {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "1"})
    assert status == 413 and "at most 1,000 bytes" in json.loads(answer)["error"]
    assert seen == []


def test_the_page_itself_is_served_with_a_strict_policy(fake):
    page, _ = fake
    status, headers, html = _raw(page, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'src="app.js"' in html and b'capture="environment"' in html
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    status, headers, js = _raw(page, "GET", "/app.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert b"export async function searchPhoto(file" in js


def test_photo_refuses_other_buckets_and_keys_outside_catalogs(fake):
    page, _ = fake
    for uri in ("s3://shop/models/v1/model.safetensors", "s3://other/catalogs/x/images/a.png",
                "s3://shop/catalogs/../models/v1/model.json", "s3://shop/catalogs//a.png", "https://x/catalogs/a.png",
                "/etc/passwd"):
        status, _, answer = _raw(page, "GET", "/photo?uri=" + quote(uri, safe=""))
        assert status == 404, uri
        assert json.loads(answer)["error"]
    assert _raw(page, "GET", "/photo")[0] == 404
    assert photo_key("s3://shop/catalogs/fm/images/a.png", "shop") == "catalogs/fm/images/a.png"


def test_only_image_bytes_count_as_a_photo():
    assert image_type(b"\x89PNG\r\n\x1a\n....") == "image/png"
    assert image_type(b"\xff\xd8\xff\xe0") == "image/jpeg"
    assert image_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert image_type(b"<svg onload=alert(1)>") is None and image_type(b"<html>") is None


def test_the_page_server_binds_to_loopback_only():
    with pytest.raises(ValueError, match="loopback"):
        TryPageServer("http://127.0.0.1:8080", host="0.0.0.0")
    TryPageServer("http://127.0.0.1:8080", host="localhost")  # accepted; not started


# ---- the page in a real browser, against a real serving stack -----------------------------------

@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists() or not _has_playwright():
        reason = f"needs Debian's chromium at {CHROMIUM} and the playwright package: run ./install.sh"
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI installs both; a missing browser there is a broken install, not a skip
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _has_playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def try_page(stack, pair):
    with TryPageServer(stack.endpoints["transformer_rest"], s3=pair["settings"]) as page:
        yield page


def _transformer_error(stack, data: bytes) -> tuple[int, str]:
    """What the transformer itself answers to `data` as a photo: the text the page must show."""
    element = struct.pack("<I", len(data)) + data
    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(element)}}]}).encode()
    reply = httpx.post(f"{stack.endpoints['transformer_rest']}/v2/models/{MODEL}/infer", content=head + element,
                       headers={"Inference-Header-Content-Length": str(len(head)),
                                "Content-Type": "application/octet-stream"}, timeout=60)
    return reply.status_code, reply.json()["error"]


def _listing_answer(stack, listing_id: str, top_k: int) -> list[str]:
    """The listings the transformer answers for a search by `listing_id` (REST JSON)."""
    body = {"inputs": [{"name": "listing_id", "shape": [1], "datatype": "BYTES", "data": [listing_id]}],
            "parameters": {"top_k": top_k}}
    r = httpx.post(f"{stack.endpoints['transformer_rest']}/v2/models/{MODEL}/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    ids = next(o for o in r.json()["outputs"] if o["name"] == "listing_ids")["data"]
    return [i for i in ids if i]


def _settle(page) -> str:
    """Wait for the search under way to end; 'done' or 'error'."""
    page.wait_for_function("() => ['done', 'error'].includes(document.body.dataset.state)")  # a function: the
    # page's CSP forbids eval, which a bare expression would need
    return page.evaluate("() => document.body.dataset.state")


@pytest.mark.slow
def test_a_photo_dropped_on_the_page_shows_its_listings_and_versions(browser, try_page, stack, pair, tmp_path):
    rows = pair["catalog"].rows
    catalog_ids = {r.listing_id for r in rows}
    query = rows[7]
    photo = tmp_path / "query.png"
    photo.write_bytes(pair["photos"][query.listing_id])

    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.set_default_timeout(90_000)
    script_errors: list[str] = []
    page.on("pageerror", lambda exc: script_errors.append(str(exc)))
    try:
        page.goto(try_page.url)
        page.wait_for_selector("#status[data-state=ready]")

        # a catalog photo: its own listing first, then its lookalikes, each with its photo from the store
        page.select_option("#top-k", "10")
        page.set_input_files("#photo", str(photo))
        assert _settle(page) == "done", page.inner_text("#error")
        cards = page.locator("#matches .match")
        assert cards.count() == 10
        ids = cards.evaluate_all("cards => cards.map(c => c.dataset.listingId)")
        assert ids == page.locator("#matches .listing-id").all_inner_texts()
        assert ids[0] == query.listing_id and len(set(ids)) == 10 and set(ids) <= catalog_ids
        assert page.locator("#matches .title").first.inner_text() == query.title
        assert page.inner_text("#model-version") == pair["model_version"]
        assert page.inner_text("#index-version") == pair["index_version"]
        assert re.fullmatch(r"\d+ ms", page.inner_text("#elapsed"))
        assert sorted(page.locator("#labels .label").evaluate_all("ls => ls.map(l => l.dataset.task)")) == [
            "category", "fine_category"]
        # every listing's 28-px Fashion-MNIST photo came from its presigned image_url, shown enlarged, pixelated
        page.wait_for_function("() => document.querySelectorAll('#matches img.pixelated').length === 10")
        sizes = page.locator("#matches img").evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
        assert sizes == [28] * 10
        sources = page.locator("#matches img").evaluate_all("imgs => imgs.map(i => i.src)")
        assert all(src.startswith("http://127.0.0.1:") and "X-Amz-Signature=" in src for src in sources)
        assert not page.is_visible("#error")
        if os.environ.get("LOOKALIKE_SCREENSHOT") == "1":
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)

        # "more like this" on a result: that listing's lookalikes, without it, as the endpoint answers them
        liked = ids[1]
        expected = _listing_answer(stack, liked, 10)
        page.locator("#matches .match").nth(1).locator("button.more-like-this").click()
        page.wait_for_function(f"() => document.querySelector('#photo-name').dataset.listingId === '{liked}'")
        assert _settle(page) == "done", page.inner_text("#error")
        more = page.locator("#matches .match").evaluate_all("cards => cards.map(c => c.dataset.listingId)")
        assert more == expected and liked not in more and len(more) == 10
        assert page.locator("#matches button.more-like-this").count() == 10  # offered on every result

        # not a photo: the transformer's own 400 message, in the visible error box, and no stale listings
        notes = tmp_path / "notes.txt"
        notes.write_bytes(b"these are notes, not the pixels of a photo\n")
        status, message = _transformer_error(stack, notes.read_bytes())
        assert status == 400
        page.set_input_files("#photo", str(notes))
        assert _settle(page) == "error"
        assert page.is_visible("#error")
        assert "400" in page.inner_text("#error-title")
        assert page.inner_text("#error-message") == message
        assert page.locator("#matches .match").count() == 0

        # too large for the transformer's limit: its 413 and its message
        big = tmp_path / "big.jpg"
        big.write_bytes(b"\x00" * (test_serving.MAX_IMAGE_BYTES + 1))
        status, message = _transformer_error(stack, big.read_bytes())
        assert status == 413
        page.set_input_files("#photo", str(big))
        assert _settle(page) == "error"
        assert "413" in page.inner_text("#error-title") and page.inner_text("#error-message") == message
        assert script_errors == []
    finally:
        page.close()


@pytest.mark.slow
def test_lookalike_serve_prints_the_try_page_url_and_stops_it(pair, tmp_path):
    from conftest import free_port_block

    base = free_port_block((0, 1, 2, 5, 6))
    env = {**os.environ, **pair["settings"].to_env(), "LOOKALIKE_CACHE": str(pair["cache"]),
           "LOOKALIKE_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "lookalike"), "serve", "--port", str(base)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (lines and "Ctrl-C stops all" in lines[-1]):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        text = "".join(lines)
        url = f"http://127.0.0.1:{base + 2}/"
        assert f"try page     {url}" in text, text
        page = httpx.get(url, timeout=10)
        assert page.status_code == 200 and 'src="app.js"' in page.text
        assert httpx.get(f"{url}v2/models/{MODEL}/ready", timeout=10).status_code == 200  # through to the transformer
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=60) == 0
        assert test_serving._port_free(base + 2), "the try page still answers after Ctrl-C"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

