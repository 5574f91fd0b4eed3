"""Where a catalog lives in the store: every key of a catalog is made here, and nowhere else.

    catalogs/<name>/catalog.jsonl                          the listings, one per line (written last)
    catalogs/<name>/images/<listing_id>.<ext>              a listing's only photo
    catalogs/<name>/images/<listing_id>/<photo_id>.<ext>   each of several photos
    catalogs/<name>/ATTRIBUTION.md                         where the photos come from, their licences

Listing and photo ids are written by sellers: any character outside [A-Za-z0-9._-] becomes `_` in a key.
"""
from __future__ import annotations

import re

PREFIX = "catalogs/"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def catalog_key(name: str) -> str:
    return f"{PREFIX}{name}/catalog.jsonl"


def images_prefix(name: str) -> str:
    return f"{PREFIX}{name}/images/"


def attribution_key(name: str) -> str:
    return f"{PREFIX}{name}/ATTRIBUTION.md"


def image_key(name: str, listing_id: str, photo_id: str | None, suffix: str) -> str:
    """The key of a listing's photo: `<listing>.<ext>` for its only photo (photo_id None), else
    `<listing>/<photo>.<ext>`."""
    listing = _UNSAFE.sub("_", listing_id)
    if photo_id is None:
        return f"{images_prefix(name)}{listing}{suffix}"
    return f"{images_prefix(name)}{listing}/{_UNSAFE.sub('_', photo_id)}{suffix}"
