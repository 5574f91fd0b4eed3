"""Where a catalog's photos may come from, and fetching seller URLs as the untrusted input they are.

Catalogs are written partly by sellers, who choose photo URLs. A photo location is one of:

- `s3://bucket/catalogs/<name>/images/...`: a catalog photo in the store. Nothing else in the store is a
  photo (a model file, an index, another catalog's JSONL): `PhotoRefused`, and the transformer signs only
  such keys (`is_photo_key`).
- `http(s)://host/...`: fetched by `fetch_url` only from public addresses: the host is resolved first,
  and every address must be globally routable (no loopback, link-local such as the cloud metadata
  endpoint 169.254.169.254, private, shared, multicast or reserved ranges), the connection goes to the
  address that was checked (no second lookup to rebind), redirects are followed by hand (at most
  MAX_REDIRECTS) with the same checks, the body is capped at the photo size limit and the whole fetch at
  a deadline. Hosts in `$LOOKALIKE_PHOTO_HOSTS` (comma-separated, the marketplace's own CDNs; `.cdn.example`
  allows its subdomains) may resolve to private addresses.
- a local path: only inside the folder of a catalog that is itself a local file (a catalog in the store
  names none), unless the operator sets `LOOKALIKE_ALLOW_LOCAL_PHOTOS=1`.

Every refusal is a `PhotoRefused` (an InputError) whose message is the one line the validation report
shows; the listing is skipped, not the run.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import time
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from lookalike.core.errors import InputError

MAX_REDIRECTS = 3
CONNECT_TIMEOUT_S = 5.0
FETCH_DEADLINE_S = 20.0
PHOTO_PREFIX = "catalogs/"
PHOTO_FOLDER = "/images/"


class PhotoRefused(InputError):
    """A catalog names a photo Lookalike will not read: the message says which rule it breaks."""


def is_photo_key(key: str) -> bool:
    """Whether a store key is a catalog photo (`catalogs/<name>/images/...`), the only keys ever signed."""
    if not key.startswith(PHOTO_PREFIX) or ".." in key.split("/"):
        return False
    rest = key[len(PHOTO_PREFIX):]
    name, sep, tail = rest.partition("/")
    return bool(name) and sep == "/" and tail.startswith("images/") and len(tail) > len("images/")


def allowed_hosts() -> tuple[str, ...]:
    return tuple(h.strip().lower() for h in os.environ.get("LOOKALIKE_PHOTO_HOSTS", "").split(",") if h.strip())


def local_photos_allowed() -> bool:
    return os.environ.get("LOOKALIKE_ALLOW_LOCAL_PHOTOS", "") in ("1", "true", "yes")


def check_location(location: str, local_base: Path | None) -> None:
    """Refuse a photo location the rules above do not allow (before anything is read). `local_base` is the
    folder of a catalog that is a local file, None for a catalog in the store."""
    if location.startswith("s3://"):
        key = location[len("s3://"):].partition("/")[2]
        if not is_photo_key(key):
            raise PhotoRefused(f"{location} is not a catalog photo (only s3://…/catalogs/<name>/images/… are): "
                               f"refused")
        return
    parts = urlsplit(location)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        try:  # an address written in the URL is checked now; a host name when it is resolved, at fetch time
            literal = ipaddress.ip_address((parts.hostname or "").strip("[]"))
        except ValueError:
            return
        if not _host_allowed(str(literal)) and (not literal.is_global or literal.is_multicast):
            raise PhotoRefused(f"{_short(location)} names {literal}, which is not a public address (loopback, "
                               f"link-local, private or reserved): refused")
        return
    if scheme and len(scheme) > 1:  # file:, ftp:, gopher:, data:, … (a Windows drive letter is one character)
        raise PhotoRefused(f"{_short(location)}: only s3://, http(s):// and catalog-relative paths are photos")
    if local_photos_allowed():
        return
    path = Path(location)
    if local_base is None:
        raise PhotoRefused(f"{_short(location)} is a local path, which a catalog in the store may not name "
                           f"(set LOOKALIKE_ALLOW_LOCAL_PHOTOS=1 where local photos are meant)")
    resolved = (local_base / path).resolve()
    if not resolved.is_relative_to(local_base.resolve()):
        raise PhotoRefused(f"{_short(location)} is outside the catalog's folder {local_base}: refused (set "
                           f"LOOKALIKE_ALLOW_LOCAL_PHOTOS=1 where such photos are meant)")


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _host_allowed(host: str) -> bool:
    host = host.lower().rstrip(".")
    return any(host == h or (h.startswith(".") and host.endswith(h)) for h in allowed_hosts())


def public_address(host: str, port: int) -> str:
    """An address of `host` to connect to, checked: every address it resolves to must be public unless the
    host is allowed (PhotoRefused otherwise, naming the address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise PhotoRefused(f"{host} does not resolve ({exc.strerror})") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not _host_allowed(host):
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%")[0])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if not ip.is_global or ip.is_multicast:
                raise PhotoRefused(f"{host} resolves to {address}, which is not a public address (loopback, "
                                   f"link-local, private or reserved): refused (allow the marketplace's own "
                                   f"hosts with LOOKALIKE_PHOTO_HOSTS)")
    return addresses[0]


def fetch_url(url: str, max_bytes: int, deadline_s: float = FETCH_DEADLINE_S) -> bytes:
    """The body of a seller's photo URL, fetched under the rules above; FileNotFoundError for a 404,
    OSError for another failure, PhotoRefused for a refusal."""
    import urllib3

    deadline = time.monotonic() + deadline_s
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PhotoRefused(f"{_short(url)}: only http(s) URLs are fetched")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = public_address(parts.hostname, port)
        remaining = max(0.5, deadline - time.monotonic())
        timeout = urllib3.Timeout(connect=min(CONNECT_TIMEOUT_S, remaining), read=remaining)
        kwargs = {"timeout": timeout, "retries": False}
        if parts.scheme == "https":
            pool = urllib3.HTTPSConnectionPool(address, port, server_hostname=parts.hostname,
                                               assert_hostname=parts.hostname, **kwargs)
        else:
            pool = urllib3.HTTPConnectionPool(address, port, **kwargs)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        try:
            response = pool.urlopen("GET", path, headers={"Host": parts.netloc, "User-Agent": "lookalike"},
                                    redirect=False, preload_content=False)
        except urllib3.exceptions.HTTPError as exc:
            raise OSError(f"cannot fetch {_short(url)}: {exc}") from None
        try:
            if response.status in (301, 302, 303, 307, 308) and response.headers.get("Location"):
                url = urljoin(url, response.headers["Location"])
                continue
            if response.status == 404:
                raise FileNotFoundError(url)
            if response.status >= 400:
                raise OSError(f"fetching {_short(url)} answered {response.status}")
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise PhotoRefused(f"{_short(url)} is {int(declared):,} bytes; the photo limit is {max_bytes:,}")
            body = bytearray()
            for chunk in response.stream(64 * 1024):
                body += chunk
                if len(body) > max_bytes:
                    raise PhotoRefused(f"{_short(url)} is larger than the photo limit of {max_bytes:,} bytes")
                if time.monotonic() > deadline:
                    raise OSError(f"fetching {_short(url)} took longer than {deadline_s:g} s")
            return bytes(body)
        finally:
            response.release_conn()
            pool.close()
    raise PhotoRefused(f"{_short(url)} redirects more than {MAX_REDIRECTS} times: refused")
