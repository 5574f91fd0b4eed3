"""The catalog: one JSON object per line describing a listing's image and its (optional) labels.

    {"listing_id": "fmnist-train-00042", "image": "s3://lookalike/catalogs/…/00042.png",
     "title": "Sneaker #42", "labels": {"category": "footwear", "fine_category": "Sneaker"},
     "source": "catalog"}

`image` is an `s3://` URI or a path (relative paths are relative to the catalog file). Any label may be
missing; a task's dataset is the rows that carry its label. `source` is `catalog` (the seller's photo)
or `user_photo` (a shopper's photo of a purchased item, trained on like any other row).

`validate_catalog` reports every bad row with its line number instead of stopping at the first.
"""
from __future__ import annotations

import io
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from storage.s3 import ObjectStore, S3Settings, parse_s3_uri
from transformer.decoding import ImageError, ImageLimits, decode_image

SOURCES = ("catalog", "user_photo")


class CatalogError(ValueError):
    """The catalog cannot be used; the message lists what is wrong and where."""


@dataclass(frozen=True)
class CatalogRow:
    listing_id: str
    image: str
    labels: dict[str, str] = field(default_factory=dict)
    source: str = "catalog"
    title: str | None = None
    line: int = 0  # 1-based line in the catalog file, for error messages

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"listing_id": self.listing_id, "image": self.image, "labels": self.labels,
                               "source": self.source}
        if self.title:
            out["title"] = self.title
        return out


@dataclass(frozen=True)
class RowProblem:
    line: int
    listing_id: str | None
    message: str

    def __str__(self) -> str:
        if self.line == 0:  # a problem of the whole catalog, not of one row
            return f"catalog: {self.message}"
        who = f" ({self.listing_id})" if self.listing_id else ""
        return f"line {self.line}{who}: {self.message}"


@dataclass
class ValidationReport:
    rows: int = 0
    problems: list[RowProblem] = field(default_factory=list)
    label_counts: dict[str, Counter] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems and self.rows > 0

    def summary(self, max_problems: int = 50) -> str:
        lines = [f"{self.rows} rows, {len(self.problems)} problems"]
        for task, counts in sorted(self.label_counts.items()):
            lines.append(f"  task {task}: {sum(counts.values())} labelled rows, {len(counts)} classes")
        for problem in self.problems[:max_problems]:
            lines.append(f"  {problem}")
        if len(self.problems) > max_problems:
            lines.append(f"  … and {len(self.problems) - max_problems} more")
        if self.rows == 0:
            lines.append("  the catalog has no rows")
        return "\n".join(lines)


def parse_row(obj: Any, line: int) -> tuple[CatalogRow | None, list[str]]:
    """One decoded JSON value → a row, or the list of what is wrong with it."""
    if not isinstance(obj, dict):
        return None, [f"expected a JSON object, got {type(obj).__name__}"]
    errors = []
    listing_id = obj.get("listing_id")
    if not isinstance(listing_id, (str, int)) or isinstance(listing_id, bool) or str(listing_id) == "":
        errors.append("listing_id is missing or not a string")
    image = obj.get("image")
    if not isinstance(image, str) or not image:
        errors.append("image is missing (an s3:// URI or a path)")
    labels = obj.get("labels", {})
    if labels is None:
        labels = {}
    if not isinstance(labels, dict):
        errors.append(f"labels must be an object of task -> label, got {type(labels).__name__}")
        labels = {}
    clean_labels = {}
    for task, value in labels.items():
        if value is None:
            continue  # an explicitly missing label
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            errors.append(f"label {task!r} has a value of type {type(value).__name__}; labels are strings")
            continue
        clean_labels[str(task)] = str(value)
    source = obj.get("source", "catalog")
    if source not in SOURCES:
        errors.append(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    title = obj.get("title")
    if title is not None and not isinstance(title, str):
        errors.append("title must be a string")
        title = None
    if errors:
        return None, errors
    return CatalogRow(str(listing_id), image, clean_labels, source, title, line), []


class Catalog:
    """Rows of one catalog file plus the means to read their images (from S3 or local paths)."""

    def __init__(self, rows: list[CatalogRow], uri: str = "", store: ObjectStore | None = None,
                 base_dir: Path | None = None):
        self.rows = rows
        self.uri = uri
        self._store = store
        self._base_dir = base_dir
        self._cache_dir: Path | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"Catalog({self.uri!r}, {len(self.rows)} rows)"

    # ---- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, uri: str | Path, store: ObjectStore | None = None, *, strict: bool = True) -> "Catalog":
        """Read a catalog from `s3://bucket/key.jsonl` or a local path.

        With strict=True (the default) any bad row raises CatalogError listing every problem; with
        strict=False bad rows are skipped (validate_catalog reports them).
        """
        text, store, base_dir = _read_text(str(uri), store)
        rows, problems = _parse_lines(text.splitlines())
        if strict and problems:
            raise CatalogError(f"catalog {uri} has {len(problems)} bad rows:\n" +
                               "\n".join(f"  {p}" for p in problems[:20]))
        if strict and not rows:
            raise CatalogError(f"catalog {uri} is empty: it needs at least one row")
        return cls(rows, str(uri), store, base_dir)

    @classmethod
    def from_rows(cls, rows: Iterable[CatalogRow], uri: str = "", store: ObjectStore | None = None,
                  base_dir: Path | None = None) -> "Catalog":
        return cls(list(rows), uri, store, base_dir)

    def subset(self, rows: Iterable[CatalogRow]) -> "Catalog":
        """Another catalog over some of these rows, reading images the same way."""
        sub = Catalog(list(rows), self.uri, self._store, self._base_dir)
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
        """The row's image as an s3:// URI or an absolute path."""
        if row.image.startswith("s3://") or os.path.isabs(row.image) or self._base_dir is None:
            return row.image
        return str(self._base_dir / row.image)

    def image_bytes(self, row: CatalogRow) -> bytes:
        location = self.resolve_image(row)
        if location.startswith("s3://"):
            cached = self._cached_path(location)
            if cached is not None and cached.exists():
                return cached.read_bytes()
            bucket, key = parse_s3_uri(location)
            return self._store_for(bucket).get_bytes(key)
        return Path(location).read_bytes()

    def load_image(self, row: CatalogRow, limits: ImageLimits = ImageLimits()) -> Image.Image:
        """The row's image as RGB, decoded with the same checks the transformer applies."""
        return decode_image(self.image_bytes(row), limits, name=f"image of {row.listing_id}")

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

    # ---- writing ---------------------------------------------------------------------------
    def to_jsonl(self) -> str:
        return "".join(json.dumps(row.to_json()) + "\n" for row in self.rows)


def validate_catalog(uri: str | Path, store: ObjectStore | None = None, *, check_images: bool = True,
                     workers: int = 8) -> ValidationReport:
    """Every problem of a catalog, each with its line: bad JSON, missing fields, wrong label types,
    duplicate listing ids, missing or unreadable images."""
    text, store, base_dir = _read_text(str(uri), store)
    rows, problems = _parse_lines(text.splitlines())
    report = ValidationReport(rows=len(rows) + len({p.line for p in problems}), problems=problems)
    catalog = Catalog(rows, str(uri), store, base_dir)
    for row in rows:
        for task, value in row.labels.items():
            report.label_counts.setdefault(task, Counter())[value] += 1
    if check_images and rows:
        def check(row: CatalogRow) -> RowProblem | None:
            try:
                catalog.load_image(row)
                return None
            except ImageError as exc:
                return RowProblem(row.line, row.listing_id, f"image {row.image} is unreadable: {exc}")
            except (FileNotFoundError, IsADirectoryError):
                return RowProblem(row.line, row.listing_id, f"image {row.image} does not exist")
            except Exception as exc:  # noqa: BLE001 - the store's own message says what to do
                text = str(exc)
                if "no such object" in text:
                    return RowProblem(row.line, row.listing_id, f"image {row.image} does not exist")
                return RowProblem(row.line, row.listing_id, f"image {row.image} cannot be read: {text}")

        with ThreadPoolExecutor(workers) as pool:
            report.problems.extend(p for p in pool.map(check, rows) if p is not None)
    for task, counts in report.label_counts.items():
        if len(counts) == 1:
            report.problems.append(RowProblem(0, None, f"task {task!r} has a single class "
                                                       f"({next(iter(counts))!r}): it cannot be trained"))
    report.problems.sort(key=lambda p: p.line)
    return report


def write_catalog(rows: Iterable[CatalogRow], uri: str | Path, store: ObjectStore | None = None) -> None:
    """Write rows as JSONL to an s3:// URI or a local path (atomically for local files)."""
    body = "".join(json.dumps(row.to_json()) + "\n" for row in rows)
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
        tmp.write_text(body)
        tmp.replace(path)


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


def _parse_lines(lines: list[str]) -> tuple[list[CatalogRow], list[RowProblem]]:
    rows, problems, seen = [], [], {}
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(RowProblem(number, None, f"not valid JSON: {exc.msg}"))
            continue
        row, errors = parse_row(obj, number)
        if errors:
            lid = obj.get("listing_id") if isinstance(obj, dict) else None
            problems.extend(RowProblem(number, str(lid) if lid is not None else None, e) for e in errors)
            continue
        if row.listing_id in seen:
            problems.append(RowProblem(number, row.listing_id,
                                       f"duplicate listing_id (first on line {seen[row.listing_id]})"))
            continue
        seen[row.listing_id] = number
        rows.append(row)
    return rows, problems


def image_to_png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
