"""Listing metadata joined to search results: per listing its title (or the id), labels, free-form metadata
and every photo's location, and fetchable URLs for those photos.

Read from the catalog JSONL itself (one listing per line, or old one-photo rows: `lookalike.catalogs.format`),
from `s3://` or a path. Which catalogs: the ones given explicitly, else every one the served index names in
its `index.json` (the build's catalog and each update's), and the model's lineage - so the transformer
follows the predictor through a swap, and through updates, without configuration.

Photos are answered as URLs an app can fetch (`PhotoUrls`): an http(s) URL from the catalog as it is, an
`s3://` photo as a short-lived presigned GET URL of the store (never the bare `s3://` URI), a local path as
nothing (no app can fetch it).

A bad line is skipped (and counted in the log), never fatal: metadata is decoration, the ids are the answer.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lookalike.catalogs.sources import is_photo_key
from lookalike.core.s3 import ObjectStore, S3Settings, StoreError, parse_s3_uri
from lookalike.catalogs.format import read_listings

log = logging.getLogger(__name__)

URL_LIFETIME_S = 3600        # a presigned photo URL is good for an hour...
URL_REUSE_S = URL_LIFETIME_S // 2  # ...and handed out again for the first half of it (signing costs CPU)
MAX_CACHED_URLS = 100_000


@dataclass(frozen=True)
class Listing:
    listing_id: str
    title: str                                  # the catalog's title, else the listing id
    category: str                               # labels["category"], or ""
    image: str                                  # its first photo's location (s3:// URI, URL or absolute path)
    labels: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    photos: tuple[tuple[str, str], ...] = ()    # (photo id, location), in the catalog's order

    def photo(self, photo_id: str | None) -> str:
        """The location of photo `photo_id` (the first photo when it is unknown or not given)."""
        for pid, location in self.photos:
            if pid == photo_id:
                return location
        return self.image


def _read_text(uri: str, store: ObjectStore | None) -> tuple[str, Path | None]:
    if uri.startswith("s3://"):
        bucket, key = parse_s3_uri(uri)
        settings = store.settings if store is not None else S3Settings.from_env()
        if store is None or store.bucket != bucket:
            store = ObjectStore(settings.with_bucket(bucket))
        return store.get_bytes(key).decode("utf-8"), None
    path = Path(uri)
    return path.read_text(encoding="utf-8"), path.resolve().parent


def _located(uri: str, base: Path | None) -> str:
    if base is not None and not uri.startswith(("s3://", "http://", "https://")) and not os.path.isabs(uri):
        return str(base / uri)
    return uri


def read_catalog(uri: str, store: ObjectStore | None = None, category_task: str = "category") -> dict[str, Listing]:
    """listing_id -> Listing for every well-formed listing of one catalog JSONL."""
    text, base = _read_text(uri, store)
    listings, problems, _ = read_listings(text.splitlines())
    out: dict[str, Listing] = {}
    for item in listings:
        photos = tuple((p.photo_id, _located(p.uri, base)) for p in item.photos)
        out[item.listing_id] = Listing(item.listing_id, item.title or item.listing_id,
                                       item.labels.get(category_task, ""), photos[0][1] if photos else "",
                                       dict(item.labels), dict(item.metadata), photos)
    if problems:
        log.warning("catalog %s: skipped %d malformed lines", uri, len({p.line for p in problems}))
    return out


def catalogs_named_in(info: dict[str, Any]) -> list[str]:
    """Catalog URIs an index.json or model.json names (`catalogs`, `catalog`, or under `lineage`)."""
    found: list[str] = []
    for holder in (info, info.get("lineage") or {}):
        if not isinstance(holder, dict):
            continue
        for key in ("catalogs", "catalog"):
            value = holder.get(key)
            values = value if isinstance(value, list) else [value]
            found += [v for v in values if isinstance(v, str) and v and v not in found]
    return found


class ListingMetadata:
    """Listings of one or more catalogs, loaded once per catalog and shared by all requests."""

    def __init__(self, store: ObjectStore | None = None, catalogs: Iterable[str] = ()):
        self.store = store
        self._listings: dict[str, Listing] = {}
        self._loaded: set[str] = set()
        self._lock = threading.Lock()
        for uri in catalogs:
            self.add_catalog(uri)

    def __len__(self) -> int:
        return len(self._listings)

    @property
    def catalogs(self) -> list[str]:
        return sorted(self._loaded)

    def add_catalog(self, uri: str) -> int:
        """Load a catalog (once); return how many listings it holds. Later catalogs win on a shared id (an
        update's catalog is loaded after the build's, so a listing it changed shows as it is now)."""
        with self._lock:
            if uri in self._loaded:
                return 0
            rows = read_catalog(uri, self.store)
            merged = dict(self._listings)
            merged.update(rows)
            self._listings = merged  # readers see the old or the new dict, never a half-filled one
            self._loaded.add(uri)
        log.info("listing metadata: %d listings from %s", len(rows), uri)
        return len(rows)

    def ensure_for(self, info: dict[str, Any]) -> None:
        """Load the catalogs an index.json/model.json names, in order; a catalog that cannot be read is logged."""
        for uri in catalogs_named_in(info):
            if uri in self._loaded:
                continue
            try:
                self.add_catalog(uri)
            except (StoreError, OSError, ValueError) as exc:
                log.warning("cannot read catalog %s for listing metadata: %s", uri, exc)
                with self._lock:
                    self._loaded.add(uri)  # do not retry on every request

    def get(self, listing_id: str) -> Listing:
        found = self._listings.get(listing_id)
        return found if found is not None else Listing(listing_id, listing_id, "", "", {})


class PhotoUrls:
    """Photo locations as URLs an app can fetch: http(s) as they are, s3:// presigned (cached for half their
    lifetime) only when the key is a catalog photo (`catalogs/<name>/images/…`: never a model, an index or
    a catalog file, whatever a catalog row names), anything else (a path on the server's disk) as ""."""

    def __init__(self, store: ObjectStore | None = None, lifetime_s: int = URL_LIFETIME_S):
        self.store = store
        self.lifetime_s = int(lifetime_s)
        self._stores: dict[str, ObjectStore] = {}
        self._cache: dict[str, tuple[str, float]] = {}

    def url(self, location: str) -> str:
        if location.startswith(("http://", "https://")):
            return location
        if not location.startswith("s3://"):
            return ""
        now = time.monotonic()
        hit = self._cache.get(location)
        if hit is not None and hit[1] > now:
            return hit[0]
        try:
            bucket, key = parse_s3_uri(location)
            if not is_photo_key(key):
                log.warning("not signing %s: only catalog photos (catalogs/<name>/images/…) are", location[:200])
                return ""
            url = self._store_for(bucket).presigned_url(key, self.lifetime_s)
        except Exception as exc:  # noqa: BLE001 - a photo without a URL still leaves the listing answered
            log.warning("cannot sign a URL for %s: %s", location, exc)
            return ""
        if len(self._cache) >= MAX_CACHED_URLS:
            self._cache = {}
        self._cache[location] = (url, now + min(URL_REUSE_S, self.lifetime_s // 2))
        return url

    def _store_for(self, bucket: str) -> ObjectStore:
        found = self._stores.get(bucket)
        if found is None:
            settings = self.store.settings if self.store is not None else S3Settings.from_env()
            found = self._stores[bucket] = (self.store if self.store is not None and self.store.bucket == bucket
                                            else ObjectStore(settings.with_bucket(bucket)))
        return found
