"""Listing metadata joined to search results: title (or the id), category and image URI per listing.

Read from the catalog JSONL rows themselves (`{"listing_id", "image", "title"?, "labels": {...}}`, see
docs/architecture.md), from `s3://` or a path. Which catalogs: the ones given explicitly, else the ones
the served index names in its `index.json` (or, failing that, the model's lineage) - so the transformer
follows the predictor through a swap without configuration.

A bad row is skipped (and counted in the log), never fatal: metadata is decoration, the ids are the answer.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from storage.s3 import ObjectStore, S3Settings, StoreError, parse_s3_uri

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Listing:
    listing_id: str
    title: str
    category: str
    image: str
    labels: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {"listing_id": self.listing_id, "title": self.title, "category": self.category, "image": self.image}


def _read_text(uri: str, store: ObjectStore | None) -> tuple[str, Path | None]:
    if uri.startswith("s3://"):
        bucket, key = parse_s3_uri(uri)
        settings = store.settings if store is not None else S3Settings.from_env()
        if store is None or store.bucket != bucket:
            store = ObjectStore(settings.with_bucket(bucket))
        return store.get_bytes(key).decode("utf-8"), None
    path = Path(uri)
    return path.read_text(encoding="utf-8"), path.resolve().parent


def read_catalog(uri: str, store: ObjectStore | None = None, category_task: str = "category") -> dict[str, Listing]:
    """listing_id -> Listing for every well-formed row of one catalog JSONL."""
    text, base = _read_text(uri, store)
    out: dict[str, Listing] = {}
    bad = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            lid = str(row["listing_id"])
            image = str(row.get("image") or "")
            labels = {str(k): str(v) for k, v in (row.get("labels") or {}).items() if v is not None}
        except (ValueError, KeyError, TypeError, AttributeError):
            bad += 1
            continue
        if image and base is not None and not image.startswith("s3://") and not os.path.isabs(image):
            image = str(base / image)
        title = row.get("title") if isinstance(row.get("title"), str) and row.get("title") else lid
        out[lid] = Listing(lid, title, labels.get(category_task, ""), image, labels)
    if bad:
        log.warning("catalog %s: skipped %d malformed rows", uri, bad)
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
        """Load a catalog (once); return how many listings it holds. Later catalogs win on a shared id."""
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
        """Load the catalogs an index.json/model.json names; a catalog that cannot be read is logged."""
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
