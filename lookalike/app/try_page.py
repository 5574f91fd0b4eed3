"""The try page: a small web server on a loopback port that serves the static page in `lookalike/app/web/`
(drop a photo, see the listings) and keeps it same-origin with the transformer, which sends no CORS headers.

It adds nothing to the public inference surface. It forwards exactly three routes to the transformer, as
they are (body, `Content-Type` and `Inference-Header-Content-Length` in; status, body and content type
out, v2 errors `{"error": "..."}` included):

    POST /v2/models/<name>/infer     GET /v2/models/<name>     GET /v2/models/<name>/ready

Nothing else reaches the transformer (no repository routes) and nothing reaches the predictor. The page
shows each matched listing's photo from the answer's `image_url` (a catalog URL, or a short-lived presigned
URL of the store). For answers of older transformers, which named photos by `s3://` URI, one route of its
own, `GET /photo?uri=s3://BUCKET/catalogs/...`, streams a catalog photo from the store: only the configured
bucket, only keys under `catalogs/`, only bytes that are an image (PNG, JPEG, GIF, WebP, AVIF); anything else
is a 404. It binds to loopback only.
"""
from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from lookalike.core.errors import InputError

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"
MAX_BODY_BYTES = 20 * 1024 * 1024  # a phone photo is a few MB; the transformer has its own, lower limit
MAX_PHOTO_BYTES = 20 * 1024 * 1024
PHOTO_PREFIX = "catalogs/"
_DRAIN_LIMIT = 64 * 1024 * 1024  # read a too-large body this far, so the browser sees the 413 (not a reset)
_CHUNK = 64 * 1024

_NAME = r"[A-Za-z0-9_-][A-Za-z0-9_.-]*"  # a model name; never "." or "..", so no path can climb out
_FORWARDED = [("POST", re.compile(rf"/v2/models/{_NAME}/infer")),
              ("GET", re.compile(rf"/v2/models/{_NAME}")),
              ("GET", re.compile(rf"/v2/models/{_NAME}/ready"))]
_REQUEST_HEADERS = ("Content-Type", "Inference-Header-Content-Length", "X-Request-Id")
_RESPONSE_HEADERS = ("Content-Type", "Inference-Header-Content-Length", "X-Request-Id")
_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml",
                 ".ico": "image/x-icon"}
# The page's own scripts and styles only; photos also from blob: (the preview) and http(s) listing images.
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data: http: https:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def image_type(head: bytes) -> str | None:
    """The content type of an encoded image from its first bytes, or None when it is not one we show."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[4:12] in (b"ftypavif", b"ftypavis"):
        return "image/avif"
    return None


def photo_key(uri: str, bucket: str) -> str:
    """The store key a /photo request may read, or InputError saying why it may not."""
    from lookalike.core.s3 import parse_s3_uri

    uri_bucket, key = parse_s3_uri(uri)
    if uri_bucket != bucket:
        raise InputError(f"photos are served from bucket {bucket!r} only")
    parts = key.split("/")
    if not key.startswith(PHOTO_PREFIX) or any(p in ("", ".", "..") for p in parts[1:]) or "\\" in key:
        raise InputError(f"photos are served from keys under {PHOTO_PREFIX!r} only")
    return key


class TryPageServer:
    """The page and its same-origin proxy, in a daemon thread: `start()`, `url`, `stop()`.

    `transformer_url` is the transformer's REST base (`http://127.0.0.1:8080`); `s3` the store settings
    whose bucket /photo reads (default: the `LOOKALIKE_S3_*` environment).
    """

    def __init__(self, transformer_url: str, port: int = 0, host: str = "127.0.0.1", *, s3: Any = None,
                 max_body_bytes: int = MAX_BODY_BYTES, timeout_s: float = 60.0, web_dir: Path = WEB_DIR):
        if host != "localhost":
            try:
                loopback = ipaddress.IPv4Address(host).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                raise InputError(f"the try page binds to a loopback address only (127.0.0.1 or localhost), not "
                                 f"{host!r}: it must not widen the public inference surface")
        target = urlsplit(transformer_url)
        if target.scheme not in ("http", "https") or not target.hostname:
            raise InputError(f"the transformer URL must be http(s)://HOST:PORT, got {transformer_url!r}")
        self.transformer_url = transformer_url.rstrip("/")
        self._target = target
        self.host, self.port = host, port
        self.max_body_bytes = max_body_bytes
        self.timeout_s = timeout_s
        self._s3 = s3
        self._store = None
        self._store_lock = threading.Lock()
        # The page's files, listed once: a request names one of them or gets a 404 (no path is ever joined).
        self.files = {f"/{p.name}": p for p in sorted(Path(web_dir).iterdir())
                      if p.is_file() and p.suffix in _STATIC_TYPES}
        self.files["/"] = Path(web_dir) / "index.html"
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> TryPageServer:
        handler = type("Handler", (_Handler,), {"page": self})
        self._httpd = ThreadingHTTPServer((self.host, self.port), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="try-page", daemon=True)
        self._thread.start()
        log.info("try page at %s (transformer %s)", self.url, self.transformer_url)
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def __enter__(self) -> TryPageServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- what the handler uses ---------------------------------------------------------------
    def forwarded(self, method: str, path: str) -> bool:
        return any(method == m and pattern.fullmatch(path) for m, pattern in _FORWARDED)

    def connection(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._target.scheme == "https" else http.client.HTTPConnection
        return cls(self._target.hostname, self._target.port, timeout=self.timeout_s)

    def store(self):
        """The ObjectStore of the configured bucket, made on first use (the page works without a store)."""
        with self._store_lock:
            if self._store is None:
                from lookalike.core.s3 import ObjectStore, S3Settings

                settings = self._s3 or S3Settings.from_env()
                self._store = ObjectStore(settings)
            return self._store

    @property
    def bucket(self) -> str:
        from lookalike.core.s3 import S3Settings

        return (self._s3 or S3Settings.from_env()).bucket


class _Handler(BaseHTTPRequestHandler):
    page: TryPageServer
    server_version = "lookalike-try-page"
    protocol_version = "HTTP/1.1"

    # ---- routing -----------------------------------------------------------------------------
    def do_GET(self) -> None:  # http.server's naming
        path = urlsplit(self.path).path
        if self.page.forwarded("GET", path):
            self._forward("GET", path, b"")
        elif path == "/photo":
            self._photo()
        elif path in self.page.files:
            self._static(self.page.files[path])
        else:
            self._error(404, f"no such page: {path} (this server offers the try page, its photos and the "
                             f"transformer's infer, metadata and ready routes)")

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if not self.page.forwarded("POST", path):
            self._drain()
            self._error(404, f"{path} is not offered here: the try page forwards only "
                             f"POST /v2/models/<name>/infer")
            return
        body = self._body()
        if body is not None:
            self._forward("POST", path, body)

    def do_PUT(self) -> None:
        self._drain()
        self._error(405, "the try page answers GET and POST only")

    do_DELETE = do_PATCH = do_PUT

    # ---- the proxy ---------------------------------------------------------------------------
    def _body(self) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            self.close_connection = True
            self._error(411, "send the request with a Content-Length header")
            return None
        length = int(length)
        if length > self.page.max_body_bytes:
            self._drain()
            self._error(413, f"the request is {length:,} bytes; the try page forwards at most "
                             f"{self.page.max_body_bytes:,} bytes - send a smaller photo")
            return None
        return self.rfile.read(length)

    def _drain(self) -> None:
        """Read (and drop) a body we will not use, so the connection stays in step and the browser sees our
        answer; past _DRAIN_LIMIT the connection is closed after the answer instead."""
        length = self.headers.get("Content-Length", "0").strip()
        length = int(length) if length.isdigit() else 0
        if length > _DRAIN_LIMIT:
            self.close_connection = True
            return
        while length > 0:
            chunk = self.rfile.read(min(length, _CHUNK))
            if not chunk:
                break
            length -= len(chunk)

    def _forward(self, method: str, path: str, body: bytes) -> None:
        """Send the request on to the transformer (the checked path only, no query) and its answer back."""
        headers = {h: self.headers[h] for h in _REQUEST_HEADERS if self.headers.get(h) is not None}
        if method == "POST":
            headers["Content-Length"] = str(len(body))
        conn = self.page.connection()
        try:
            conn.request(method, path, body=body if method == "POST" else None, headers=headers)
            reply = conn.getresponse()
            data = reply.read()
        except TimeoutError:
            self._error(504, f"the transformer at {self.page.transformer_url} did not answer within "
                             f"{self.page.timeout_s:g} s; retry later")
            return
        except OSError as exc:
            self._error(503, f"the transformer at {self.page.transformer_url} does not answer "
                             f"({type(exc).__name__}); is `lookalike serve` running?")
            return
        finally:
            conn.close()
        self.send_response(reply.status)
        for name in _RESPONSE_HEADERS:
            if reply.getheader(name) is not None:
                self.send_header(name, reply.getheader(name))
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    # ---- catalog photos ----------------------------------------------------------------------
    def _photo(self) -> None:
        from minio.error import S3Error

        uris = parse_qs(urlsplit(self.path).query).get("uri", [])
        try:
            if len(uris) != 1:
                raise InputError("name the photo: /photo?uri=s3://BUCKET/catalogs/...")
            key = photo_key(uris[0], self.page.bucket)
        except InputError as exc:
            self._error(404, str(exc))
            return
        store = self.page.store()
        try:
            reply = store.client.get_object(store.bucket, key)
        except S3Error as exc:
            self._error(404 if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound", "NoSuchBucket") else 503,
                        f"no photo at {uris[0]} ({exc.code})")
            return
        except Exception as exc:  # noqa: BLE001 - store down or refusing: the page shows "no photo"
            self._error(503, f"the store at {store.settings.url} does not answer ({type(exc).__name__})")
            return
        try:
            self._stream_photo(reply, uris[0])
        finally:
            reply.close()
            reply.release_conn()

    def _stream_photo(self, reply, uri: str) -> None:
        size = reply.headers.get("Content-Length")
        head = reply.read(_CHUNK)
        kind = image_type(head)
        if kind is None or (size is not None and int(size) > MAX_PHOTO_BYTES):
            self._error(404, f"{uri} is not a photo this page shows (PNG, JPEG, GIF, WebP or AVIF)")
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        if size is not None:
            self.send_header("Content-Length", size)
        else:
            self.close_connection = True  # the end of the stream marks the end of the photo
        self.send_header("Cache-Control", "private, max-age=300")
        self.end_headers()
        while head:
            self.wfile.write(head)
            head = reply.read(_CHUNK)

    # ---- the page and errors -----------------------------------------------------------------
    def _static(self, path: Path) -> None:
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", _STATIC_TYPES[path.suffix])
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Content-Security-Policy", _CSP)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        """An error shaped like the transformer's own v2 errors, so the page shows every one the same way."""
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def end_headers(self) -> None:
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # http.server's signature
        log.debug("try page: " + format, *args)


__all__ = ["TryPageServer", "image_type", "photo_key", "MAX_BODY_BYTES"]
