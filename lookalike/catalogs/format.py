"""The catalog's line format: one listing per line, each with one or more photos.

    {"listing_id": "L1", "title": "Red apple", "labels": {"category": "fruit", "color": "red"},
     "metadata": {"url": "https://shop.example/l1", "price": "3.20"},
     "source": "catalog",
     "images": [{"uri": "s3://bucket/catalogs/fruit/images/l1-front.webp", "photo_id": "front"},
                {"uri": "https://cdn.example/l1-back.jpg", "photo_id": "back", "source": "user_photo"},
                "s3://bucket/catalogs/fruit/images/l1-side.webp"]}

- `images` entries are objects (`uri`, optional `photo_id` and `source`) or plain strings (the URI). A
  photo without a `photo_id` is named by its position ("0", "1", …); the listing's `source` (default
  `catalog`) is the default of its photos. `uri` is an `s3://` URI, an http(s) URL or a path (relative
  paths are relative to the catalog file).
- `title`, `labels` ({task: label}, any may be missing) and `metadata` (free-form fields an app shows:
  strings, numbers or booleans, carried through untouched) belong to the listing, once.
- An old one-photo row, `{"listing_id", "image", "title"?, "labels"?, "source"?, "photo_id"?, "metadata"?}`,
  is a listing with one photo (photo id "0"). Old rows that repeat a listing id merge into one listing,
  their photos in order (photo ids "0", "1", … unless given); their labels, titles and metadata must agree.

`read_listings` returns the listings and every problem with its line; a line with a problem is left out
whole (a listing is never half-read). It lives in `transformer/` because both readers of catalogs use it:
training validates and trains on them (`lookalike.catalogs.rows`), the transformer joins listing metadata to
search results (`lookalike.transformer.metadata`). It does no I/O and imports nothing of the project.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

SOURCES = ("catalog", "user_photo")
METADATA_TYPES = (str, int, float, bool)


@dataclass(frozen=True)
class Photo:
    uri: str
    photo_id: str
    source: str = "catalog"
    line: int = 0  # the line it was read from (old rows of one listing sit on several lines)


@dataclass
class Listing:
    """A listing: its photos and the fields that belong to it once (title, labels, metadata)."""

    listing_id: str
    photos: list[Photo]
    title: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    line: int = 0  # its first line

    def to_json(self) -> dict[str, Any]:
        """The listing as one line of a catalog (the grouped form `lookalike.catalogs.rows.write_catalog` writes)."""
        out: dict[str, Any] = {"listing_id": self.listing_id}
        if self.title:
            out["title"] = self.title
        out["labels"] = dict(self.labels)
        if self.metadata:
            out["metadata"] = dict(self.metadata)
        out["images"] = [{"uri": p.uri, "photo_id": p.photo_id, "source": p.source} for p in self.photos]
        return out


@dataclass(frozen=True)
class LineProblem:
    line: int                 # 1-based; 0 for a problem of the whole catalog
    listing_id: str | None
    message: str
    skip_listing: bool = False  # a photo refused (lookalike.catalogs.sources): its listing is skipped, not the run

    def __str__(self) -> str:
        if self.line == 0:
            return f"catalog: {self.message}"
        who = f" ({self.listing_id})" if self.listing_id else ""
        return f"line {self.line}{who}: {self.message}"


def _text(value: Any) -> str | None:
    """A non-empty id (a string, or an integer written as one), else None."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        return None
    return str(value)


def _labels(obj: dict, errors: list[str]) -> dict[str, str]:
    labels = obj.get("labels", {})
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        errors.append(f"labels must be an object of task -> label, got {type(labels).__name__}")
        return {}
    clean = {}
    for task, value in labels.items():
        if value is None:
            continue  # an explicitly missing label
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            errors.append(f"label {task!r} has a value of type {type(value).__name__}; labels are strings")
            continue
        clean[str(task)] = str(value)
    return clean


def _metadata(obj: dict, errors: list[str]) -> dict[str, Any]:
    metadata = obj.get("metadata", {})
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        errors.append(f"metadata must be an object of field -> value, got {type(metadata).__name__}")
        return {}
    clean = {}
    for name, value in metadata.items():
        if value is None:
            continue
        if not isinstance(value, METADATA_TYPES):
            errors.append(f"metadata field {name!r} is a {type(value).__name__}: metadata values must be strings, "
                          f"numbers or booleans (write it as a string, e.g. {json.dumps(str(value))[:40]})")
            continue
        clean[str(name)] = value
    return clean


def _source(value: Any, default: str, where: str, errors: list[str]) -> str:
    if value is None:
        return default
    if value not in SOURCES:
        errors.append(f"{where}source must be one of {', '.join(SOURCES)}, got {value!r}")
        return default
    return value


def _photos(obj: dict, default_source: str, line: int, errors: list[str]) -> list[Photo]:
    images = obj.get("images")
    if not isinstance(images, list) or not images:
        errors.append("images must be a non-empty list of photos (URIs, or objects with a uri)")
        return []
    photos: list[Photo] = []
    for i, entry in enumerate(images):
        where = f"images[{i}]: "
        if isinstance(entry, str):
            entry = {"uri": entry}
        if not isinstance(entry, dict):
            errors.append(f"{where}expected a URI or an object with a uri, got {type(entry).__name__}")
            continue
        uri = entry.get("uri")
        if not isinstance(uri, str) or not uri:
            errors.append(f"{where}uri is missing (an s3:// URI, an http(s) URL or a path)")
            continue
        photo_id = _text(entry.get("photo_id", str(i)))
        if photo_id is None:
            errors.append(f"{where}photo_id must be a non-empty string")
            continue
        photos.append(Photo(uri, photo_id, _source(entry.get("source"), default_source, where, errors), line))
    return photos


def _duplicate_photos(photos: list[Photo]) -> list[str]:
    """One message per photo listed twice in a listing (the same URI, or the same photo id)."""
    problems, uris, ids = [], {}, {}
    for photo in photos:
        if photo.uri in uris:
            problems.append(f"photo {photo.uri} is listed twice (photo ids {uris[photo.uri]!r} and "
                            f"{photo.photo_id!r}): list each photo once")
        elif photo.photo_id in ids:
            problems.append(f"photo id {photo.photo_id!r} names two photos ({ids[photo.photo_id]} and {photo.uri}): "
                            f"give each photo of a listing its own photo_id")
        uris.setdefault(photo.uri, photo.photo_id)
        ids.setdefault(photo.photo_id, photo.uri)
    return problems


def parse_listing(obj: Any, line: int) -> tuple[Listing | None, list[str], bool]:
    """One decoded JSON value → (the listing or None, what is wrong with it, whether it is an old one-photo row)."""
    if not isinstance(obj, dict):
        return None, [f"expected a JSON object, got {type(obj).__name__}"], False
    errors: list[str] = []
    listing_id = _text(obj.get("listing_id"))
    if listing_id is None:
        errors.append("listing_id is missing or not a string")
    source = _source(obj.get("source"), "catalog", "", errors)
    old_style = "images" not in obj
    if old_style:
        image = obj.get("image")
        photos = []
        if not isinstance(image, str) or not image:
            errors.append("image is missing (an s3:// URI, an http(s) URL or a path), or give the listing's "
                          "photos as images: [...]")
        else:
            photo_id = _text(obj.get("photo_id", "0"))
            if photo_id is None:
                errors.append("photo_id must be a non-empty string")
            else:
                photos = [Photo(image, photo_id, source, line)]
    else:
        if "image" in obj:
            errors.append("give the photos either as image (one photo) or as images (a list), not both")
        photos = _photos(obj, source, line, errors)
        errors += _duplicate_photos(photos)
    labels = _labels(obj, errors)
    metadata = _metadata(obj, errors)
    title = obj.get("title")
    if title is not None and not isinstance(title, str):
        errors.append("title must be a string")
    if errors:
        return None, errors, old_style
    return Listing(listing_id, photos, title or None, labels, metadata, line), [], old_style


def _merge(into: Listing, row: Listing, explicit_id: bool) -> list[str]:
    """Add an old one-photo row to the listing its id names; what conflicts, if anything (then nothing is added)."""
    problems = []
    first = f"line {into.line}"
    for task in sorted(set(into.labels) & set(row.labels)):
        if into.labels[task] != row.labels[task]:
            problems.append(f"label {task!r} is {row.labels[task]!r} here but {into.labels[task]!r} on {first}: "
                            f"a listing has one label per task")
    if row.title and into.title and row.title != into.title:
        problems.append(f"title {row.title!r} differs from {into.title!r} on {first}: a listing has one title")
    for name in sorted(set(into.metadata) & set(row.metadata)):
        if into.metadata[name] != row.metadata[name]:
            problems.append(f"metadata field {name!r} is {row.metadata[name]!r} here but {into.metadata[name]!r} "
                            f"on {first}")
    photo = row.photos[0]
    if not explicit_id:
        photo = Photo(photo.uri, str(len(into.photos)), photo.source, photo.line)
    problems += _duplicate_photos(into.photos + [photo])
    if problems:
        return problems
    into.photos.append(photo)
    into.labels = {**into.labels, **row.labels}
    into.metadata = {**into.metadata, **row.metadata}
    into.title = into.title or row.title
    return []


def read_listings(lines: Iterable[str]) -> tuple[list[Listing], list[LineProblem], int]:
    """(listings in the order of their first line, every problem with its line, how many non-empty lines)."""
    listings: dict[str, Listing] = {}
    old_rows: set[str] = set()  # listings made of old one-photo rows (more may follow and merge)
    problems: list[LineProblem] = []
    count = 0
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        count += 1
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(LineProblem(number, None, f"not valid JSON: {exc.msg}"))
            continue
        listing, errors, old_style = parse_listing(obj, number)
        if errors:
            lid = obj.get("listing_id") if isinstance(obj, dict) else None
            problems.extend(LineProblem(number, str(lid) if lid is not None else None, e) for e in errors)
            continue
        known = listings.get(listing.listing_id)
        if known is None:
            listings[listing.listing_id] = listing
            if old_style:
                old_rows.add(listing.listing_id)
            continue
        if not (old_style and listing.listing_id in old_rows):
            problems.append(LineProblem(number, listing.listing_id,
                                        f"listing id {listing.listing_id!r} is on two lines (first on line "
                                        f"{known.line}): give a listing's photos as one line's images list"))
            continue
        for message in _merge(known, listing, explicit_id="photo_id" in obj):
            problems.append(LineProblem(number, listing.listing_id, message))
    return list(listings.values()), problems, count
