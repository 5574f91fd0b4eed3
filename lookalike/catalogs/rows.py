"""The catalog: one JSON line per listing, each with one or more photos, labels and metadata an app shows.

    {"listing_id": "L1", "title": "Red apple", "labels": {"category": "fruit", "color": "red"},
     "metadata": {"url": "https://shop.example/l1", "price": "3.20"},
     "images": [{"uri": "s3://lookalike/catalogs/fruit/images/l1-front.webp", "photo_id": "front"},
                {"uri": "s3://lookalike/catalogs/fruit/images/l1-back.webp", "photo_id": "back",
                 "source": "user_photo"}]}

The line format (and the old one-photo rows it still reads) is `lookalike.catalogs.format`'s. In memory a
`CatalogRow` is ONE PHOTO: training, embedding and indexing iterate photos, and each row carries its
listing's title, labels and metadata (copied from the listing's line). `Catalog.listings()` groups them
back; `write_catalog` writes one line per listing. Any label may be missing; a task's dataset is the photos
whose listing carries its label. `source` is `catalog` (the seller's photo) or `user_photo` (a shopper's
photo of a purchased item, trained on like any other).

`validate_catalog` reports every problem with its line, per photo (missing, unreadable, listed twice) and
per listing (no readable photo, an id on two lines, conflicting labels, metadata that is not a string,
number or boolean), instead of stopping at the first.
"""
from __future__ import annotations

import io
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterable

from PIL import Image

from lookalike.core.errors import InputError
from lookalike.core.s3 import ObjectStore, S3Settings, parse_s3_uri
from lookalike.catalogs.format import SOURCES, LineProblem, Listing, Photo, read_listings
from lookalike.catalogs.sources import PhotoRefused, check_location, fetch_url
from lookalike.core.decoding import ImageError, ImageLimits, decode_image

__all__ = ["SOURCES", "CatalogError", "CatalogRow", "RowProblem", "ValidationReport", "Catalog", "validate_catalog",
           "write_catalog", "rows_of", "image_to_png_bytes"]

RowProblem = LineProblem  # a problem with its line (0: of the whole catalog)


class CatalogError(InputError):
    """The catalog cannot be used; the message lists what is wrong and where."""


@dataclass(frozen=True)
class CatalogRow:
    """One photo of a listing, with the listing's title, labels and metadata."""

    listing_id: str
    image: str
    labels: dict[str, str] = field(default_factory=dict)
    source: str = "catalog"
    title: str | None = None
    line: int = 0  # 1-based line in the catalog file, for error messages
    photo_id: str = "0"
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def photo(self) -> str:
        """`listing_id/photo_id`: how messages name one photo."""
        return f"{self.listing_id}/{self.photo_id}"

    def with_image(self, image: str) -> CatalogRow:
        """The same photo at another location (e.g. made absolute)."""
        return CatalogRow(self.listing_id, image, self.labels, self.source, self.title, self.line, self.photo_id,
                          self.metadata)


def rows_of(listing: Listing) -> list[CatalogRow]:
    """A listing's photos as rows, each with the listing's fields."""
    return [CatalogRow(listing.listing_id, p.uri, dict(listing.labels), p.source, listing.title, p.line or listing.line,
                       p.photo_id, dict(listing.metadata)) for p in listing.photos]


def listings_of(rows: Iterable[CatalogRow]) -> list[Listing]:
    """Rows grouped back into listings (in the order of each listing's first row); listing-level fields
    are the first row's."""
    out: dict[str, Listing] = {}
    for row in rows:
        listing = out.get(row.listing_id)
        if listing is None:
            listing = out[row.listing_id] = Listing(row.listing_id, [], row.title, dict(row.labels),
                                                    dict(row.metadata), row.line)
        listing.photos.append(Photo(row.image, row.photo_id, row.source, row.line))
    return list(out.values())


@dataclass
class ValidationReport:
    rows: int = 0          # lines read (each a listing, or an old one-photo row)
    listings: int = 0      # listings read without a problem
    photos: int = 0        # their photos
    problems: list[RowProblem] = field(default_factory=list)
    label_counts: dict[str, Counter] = field(default_factory=dict)  # per task: photos per label

    @property
    def ok(self) -> bool:
        """No problem but refused photos, whose listings are skipped (`skipped_listings`)."""
        return not [p for p in self.problems if not p.skip_listing] and self.rows > 0

    @property
    def skipped_listings(self) -> set[str]:
        return {p.listing_id for p in self.problems if p.skip_listing and p.listing_id}

    def summary(self, max_problems: int = 50) -> str:
        lines = [f"{self.rows} lines: {self.listings} listings with {self.photos} photos, "
                 f"{len(self.problems)} problems"]
        for task, counts in sorted(self.label_counts.items()):
            lines.append(f"  task {task}: {sum(counts.values())} labelled photos, {len(counts)} classes")
        for problem in self.problems[:max_problems]:
            lines.append(f"  {problem}")
        if len(self.problems) > max_problems:
            lines.append(f"  … and {len(self.problems) - max_problems} more")
        if self.rows == 0:
            lines.append("  the catalog has no rows")
        return "\n".join(lines)


class Catalog:
    """The photos (rows) of one catalog file plus the means to read them (from S3, http(s) or local paths)."""

    def __init__(self, rows: list[CatalogRow], uri: str = "", store: ObjectStore | None = None,
                 base_dir: Path | None = None, *, checked: bool = False):
        self.rows = rows
        self.uri = uri
        self._store = store
        self._base_dir = base_dir
        self._cache_dir: Path | None = None
        # Photo locations are checked before anything is read (lookalike.catalogs.sources) unless the
        # catalog was built in code or written by a step that checked them (`checked`).
        self.checked = checked or (not uri and base_dir is None)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"Catalog({self.uri!r}, {len(self.listings())} listings, {len(self.rows)} photos)"

    def listings(self) -> dict[str, list[CatalogRow]]:
        """Listing id → its rows (photos), in order; listings in the order of their first row."""
        out: dict[str, list[CatalogRow]] = {}
        for row in self.rows:
            out.setdefault(row.listing_id, []).append(row)
        return out

    # ---- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, uri: str | Path, store: ObjectStore | None = None, *, strict: bool = True,
             checked: bool = False) -> Catalog:
        """Read a catalog from `s3://bucket/key.jsonl` or a local path.

        With strict=True (the default) any bad line raises CatalogError listing every problem; with
        strict=False bad lines are skipped (validate_catalog reports them).
        """
        text, store, base_dir = _read_text(str(uri), store)
        listings, problems, _ = read_listings(text.splitlines())
        if strict and problems:
            raise CatalogError(f"catalog {uri} has {len(problems)} problems:\n" +
                               "\n".join(f"  {p}" for p in problems[:20]))
        if strict and not listings:
            raise CatalogError(f"catalog {uri} is empty: it needs at least one listing")
        return cls([row for listing in listings for row in rows_of(listing)], str(uri), store, base_dir,
                   checked=checked)

    @classmethod
    def from_rows(cls, rows: Iterable[CatalogRow], uri: str = "", store: ObjectStore | None = None,
                  base_dir: Path | None = None) -> Catalog:
        return cls(list(rows), uri, store, base_dir)

    def subset(self, rows: Iterable[CatalogRow]) -> Catalog:
        """Another catalog over some of these rows, reading images the same way."""
        sub = Catalog(list(rows), self.uri, self._store, self._base_dir, checked=self.checked)
        sub._cache_dir = self._cache_dir
        return sub

    # ---- labels ----------------------------------------------------------------------------
    def tasks(self) -> dict[str, list[str]]:
        """Each task's label vocabulary (sorted), from the rows that carry it."""
        vocab: dict[str, set[str]] = {}
        for row in self.rows:
            for task, value in row.labels.items():
                vocab.setdefault(task, set()).add(value)
        return {task: sorted(values) for task, values in sorted(vocab.items())}

    def rows_with(self, task: str) -> list[CatalogRow]:
        return [row for row in self.rows if task in row.labels]

    # ---- images ----------------------------------------------------------------------------
    def resolve_image(self, row: CatalogRow) -> str:
        """The row's image as an s3:// URI, an http(s) URL or an absolute path."""
        if _is_remote(row.image) or os.path.isabs(row.image) or self._base_dir is None:
            return row.image
        return str(self._base_dir / row.image)

    def check_photo(self, row: CatalogRow) -> None:
        """PhotoRefused unless the row's photo location is one this catalog may name
        (`lookalike.catalogs.sources`): a catalog in the store names no local path."""
        check_location(self.resolve_image(row), None if str(self.uri).startswith("s3://") else self._base_dir)

    def image_bytes(self, row: CatalogRow) -> bytes:
        """The photo's encoded bytes; PhotoRefused for a location the catalog may not name."""
        location = self.resolve_image(row)
        if not self.checked:
            self.check_photo(row)
        if location.startswith("s3://"):
            cached = self._cached_path(location)
            if cached is not None and cached.exists():
                return cached.read_bytes()
            bucket, key = parse_s3_uri(location)
            return self._store_for(bucket).get_bytes(key)
        if location.startswith(("http://", "https://")):
            return fetch_url(location, ImageLimits().max_bytes)  # seller URLs: public addresses only, capped
        return Path(location).read_bytes()

    def load_image(self, row: CatalogRow, limits: ImageLimits | None = None, *,
                   min_side: int | None = None) -> Image.Image:
        """The row's image as upright sRGB, decoded as the transformer decodes it (same checks, same pixels).

        `min_side`: the shorter side the model's preprocessing resizes to (`PreprocessSpec.resize`), to decode
        as serving does (JPEG draft, integer reduction); None decodes at full resolution.
        """
        return decode_image(self.image_bytes(row), limits or ImageLimits(), name=f"photo {row.photo}",
                            min_side=min_side)

    def prefetch(self, cache_dir: str | Path, workers: int = 16, progress: bool = True) -> None:
        """Download every s3:// image once into `cache_dir`, in parallel; later reads come from disk."""
        self._cache_dir = Path(cache_dir)
        todo = [loc for loc in (self.resolve_image(r) for r in self.rows) if loc.startswith("s3://")]
        todo = [loc for loc in todo if not self._cached_path(loc).exists()]
        if not todo:
            return

        def fetch(location: str) -> None:
            bucket, key = parse_s3_uri(location)
            target = self._cached_path(location)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            tmp.write_bytes(self._store_for(bucket).get_bytes(key))
            tmp.replace(target)

        from tqdm import tqdm

        with ThreadPoolExecutor(workers) as pool:
            for _ in tqdm(pool.map(fetch, todo), total=len(todo), desc="download images", unit="img",
                          disable=not progress):
                pass

    def _cached_path(self, location: str) -> Path | None:
        if self._cache_dir is None:
            return None
        bucket, key = parse_s3_uri(location)
        return self._cache_dir / bucket / key

    def _store_for(self, bucket: str) -> ObjectStore:
        if self._store is None or self._store.bucket != bucket:
            settings = (self._store.settings if self._store else S3Settings.from_env()).with_bucket(bucket)
            self._store = ObjectStore(settings)
        return self._store


def validate_catalog(uri: str | Path, store: ObjectStore | None = None, *, check_images: bool = True,
                     workers: int = 8) -> ValidationReport:
    """Every problem of a catalog, each with its line.

    Per line: bad JSON, missing fields, wrong label types, metadata values that are not strings, numbers or
    booleans, a photo listed twice, a listing id on two lines, old one-photo rows of one listing whose
    labels or titles conflict. Per photo (with `check_images`): missing or unreadable. Per listing: no
    readable photo at all. Per task: a single class (it cannot be trained).
    """
    text, store, base_dir = _read_text(str(uri), store)
    listings, problems, count = read_listings(text.splitlines())
    rows = [row for listing in listings for row in rows_of(listing)]
    report = ValidationReport(rows=count, listings=len(listings), photos=len(rows), problems=problems)
    catalog = Catalog(rows, str(uri), store, base_dir)
    for row in rows:
        for task, value in row.labels.items():
            report.label_counts.setdefault(task, Counter())[value] += 1
    refused = set()
    for i, row in enumerate(rows):  # every location, read or not: a refusal costs no fetch
        try:
            catalog.check_photo(row)
        except PhotoRefused as exc:
            refused.add(i)
            report.problems.append(RowProblem(row.line, row.listing_id, f"photo {row.photo_id!r} refused: {exc}",
                                              skip_listing=True))
    catalog.checked = True  # every location is checked now: the reads below need not check again
    if check_images and rows:
        def check(row: CatalogRow) -> RowProblem | None:
            what = f"photo {row.photo_id!r} ({row.image})"
            try:
                catalog.load_image(row)
                return None
            except ImageError as exc:
                return RowProblem(row.line, row.listing_id, f"{what} is unreadable: {exc}")
            except (FileNotFoundError, IsADirectoryError):
                return RowProblem(row.line, row.listing_id, f"{what} does not exist")
            except Exception as exc:  # noqa: BLE001 - the store's own message says what to do
                text = str(exc)
                if "no such object" in text or "404" in text:
                    return RowProblem(row.line, row.listing_id, f"{what} does not exist")
                return RowProblem(row.line, row.listing_id, f"{what} cannot be read: {text}")

        todo = [i for i in range(len(rows)) if i not in refused]  # a refused photo is never read
        with ThreadPoolExecutor(workers) as pool:
            found = dict(zip(todo, pool.map(check, [rows[i] for i in todo])))
        bad = [i for i, problem in found.items() if problem is not None]
        report.problems.extend(found[i] for i in bad)
        broken: dict[str, int] = Counter(rows[i].listing_id for i in [*refused, *bad])
        skipped = {rows[i].listing_id for i in refused}
        for listing in listings:
            if broken.get(listing.listing_id, 0) == len(listing.photos) > 1:
                report.problems.append(RowProblem(listing.line, listing.listing_id,
                                                  f"the listing has no readable photo (all {len(listing.photos)} "
                                                  f"photos above fail): fix them or drop the listing",
                                                  skip_listing=listing.listing_id in skipped))
    for task, counts in report.label_counts.items():
        if len(counts) == 1:
            report.problems.append(RowProblem(0, None, f"task {task!r} has a single class "
                                                       f"({next(iter(counts))!r}): it cannot be trained"))
    report.problems.sort(key=lambda p: p.line)
    return report


def write_catalog(rows: Iterable[CatalogRow], uri: str | Path, store: ObjectStore | None = None) -> None:
    """Write rows as JSONL, one line per listing (its photos in `images`), to an s3:// URI or a local path
    (atomically for local files). A listing's title, labels and metadata are its first row's."""
    body = "".join(json.dumps(listing.to_json(), ensure_ascii=False) + "\n" for listing in listings_of(rows))
    uri = str(uri)
    if uri.startswith("s3://"):
        bucket, key = parse_s3_uri(uri)
        store = store if store is not None and store.bucket == bucket else ObjectStore(
            (store.settings if store else S3Settings.from_env()).with_bucket(bucket))
        store.put_bytes(key, body.encode(), content_type="application/x-ndjson")
    else:
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(body, encoding="utf-8")
        tmp.replace(path)


def _is_remote(location: str) -> bool:
    return location.startswith(("s3://", "http://", "https://"))


def _read_text(uri: str, store: ObjectStore | None) -> tuple[str, ObjectStore | None, Path | None]:
    if uri.startswith("s3://"):
        bucket, key = parse_s3_uri(uri)
        if store is None or store.bucket != bucket:
            store = ObjectStore((store.settings if store else S3Settings.from_env()).with_bucket(bucket))
        if not store.exists(key):
            raise CatalogError(f"catalog {uri} does not exist: import one with `lookalike catalog import` "
                               f"or check the URI")
        return store.get_bytes(key).decode("utf-8"), store, None
    path = Path(uri)
    if not path.is_file():
        raise CatalogError(f"catalog {uri} does not exist or is not a file")
    return path.read_text(encoding="utf-8"), store, path.resolve().parent


def image_to_png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
