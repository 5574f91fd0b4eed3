"""A CSV that describes the listings of a folder of photos: which files each listing has, its title, the
labels to learn and the metadata to show. `lookalike.catalogs.importers.import_folder` reads it.

    listing_id,filename,title,category,color,url,price      one row per photo; the listing's fields may be
    L1,l1/front.jpg,Red apple,fruit,red,https://…,3.20     repeated on each of its rows or left empty
    L1,l1/back.jpg,,,,,                                     after the first
    L2,pear.png,Pear,fruit,green,https://…,1.10

    listing_id,filenames,title,category                     or every photo of a listing in one cell,
    L1,l1/front.jpg;l1/back.jpg,Red apple,fruit             separated by ';'

Columns that say which files: `filename` or `filenames` (paths relative to the folder), and `listing_id`
(without a file column: the one file DIR/<listing_id>.<ext>; without `listing_id`: each file is a listing
named after its path). An optional `photo_id` column names each photo (default: its position, "0", "1", …).
A `title` column is always the title. The other columns are labels, unless told otherwise:
`label_columns` (the tasks to learn) and `metadata_columns` (free-form fields an app shows, carried
through as text). With only `label_columns` given, the remaining columns are metadata; with only
`metadata_columns`, the remaining ones are labels. An empty cell is a missing label or field.
"""
from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lookalike.catalogs.rows import CatalogError

ID_COLUMNS = ("listing_id", "filename", "filenames", "photo_id")
TITLE = "title"
SEPARATOR = ";"


@dataclass
class CsvListing:
    listing_id: str
    line: int
    photos: list[tuple[str, Path]] = field(default_factory=list)  # (photo id, file)
    title: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


def split_columns(header: Sequence[str], label_columns: Sequence[str] | None,
                  metadata_columns: Sequence[str] | None, where: str) -> tuple[list[str], list[str], list[str]]:
    """(label columns, metadata columns, columns left out) of a CSV header, per the rules above."""
    others = [c for c in header if c not in ID_COLUMNS and c != TITLE]
    for given, what in ((label_columns, "--label-columns"), (metadata_columns, "--metadata-columns")):
        unknown = [c for c in (given or ()) if c not in header]
        if unknown:
            raise CatalogError(f"{where}: {what} names {', '.join(map(repr, unknown))}, which the CSV does not have; "
                               f"its columns are {', '.join(header)}")
    metadata = [c for c in (metadata_columns or ()) if c != TITLE]
    if label_columns is not None:
        labels = list(label_columns)
        bad = [c for c in labels if c in ID_COLUMNS or c == TITLE]
        if bad:
            raise CatalogError(f"{where}: {', '.join(map(repr, bad))} cannot be a label column (it names the "
                               f"listing, its photos or its title)")
        if metadata_columns is None:
            metadata = [c for c in others if c not in labels]
    else:
        labels = [c for c in others if c not in metadata]
    both = sorted(set(labels) & set(metadata))
    if both:
        raise CatalogError(f"{where}: {', '.join(map(repr, both))} is named as a label and as metadata: choose one")
    left_out = [c for c in others if c not in labels and c not in metadata]
    return labels, metadata, left_out


def read_listing_csv(csv_path: Path, directory: Path, images: list[Path], *,
                     label_columns: Sequence[str] | None = None, metadata_columns: Sequence[str] | None = None
                     ) -> tuple[list[CsvListing], list[tuple[str, str]], list[str]]:
    """(listings in CSV order, skipped files with why, columns left out). Refuses a CSV it cannot read
    safely (a bad header, a listing whose rows disagree on a label or a field, a photo named twice) with
    CatalogError naming the line."""
    if not csv_path.is_file():
        raise CatalogError(f"labels CSV {csv_path} does not exist")
    name = csv_path.name
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [c.strip() for c in next(reader, None) or []]
        keys = [c for c in header if c in ("listing_id", "filename", "filenames")]
        if not keys or len(header) < 2:
            raise CatalogError(f"{csv_path}: the first line must be a header naming the files, such as "
                               f"`filename,<task>,…`, `listing_id,filename,title,<task>,…` or "
                               f"`listing_id,<task>,…`; got {header!r}")
        if any(not c for c in header) or len(set(header)) != len(header):
            raise CatalogError(f"{csv_path}: columns must have distinct, non-empty names: {header}")
        if "filename" in header and "filenames" in header:
            raise CatalogError(f"{csv_path}: give either a filename column (one row per photo) or a filenames "
                               f"column (';'-separated), not both")
        labels, metadata, left_out = split_columns(header, label_columns, metadata_columns, str(csv_path))
        by_stem: dict[str, list[Path]] = {}
        for p in images:
            by_stem.setdefault(p.stem, []).append(p)
        listings: dict[str, CsvListing] = {}
        skipped: list[tuple[str, str]] = []
        files_seen: dict[Path, int] = {}
        for line, cells in enumerate(reader, start=2):
            if not cells or not any(c.strip() for c in cells):
                continue
            if len(cells) > len(header):
                raise CatalogError(f"{csv_path} line {line}: {len(cells)} cells for {len(header)} columns")
            row = {c: v.strip() for c, v in zip(header, cells)}
            files, lid = _files_of(row, directory, by_stem, name, line, skipped)
            if lid is None:
                continue
            listing = listings.get(lid)
            if listing is None:
                listing = listings[lid] = CsvListing(lid, line)
            _take_fields(listing, row, labels, metadata, f"{csv_path} line {line}")
            for path in files:
                if path in files_seen:
                    raise CatalogError(f"{csv_path} line {line}: {path.relative_to(directory).as_posix()} is named "
                                       f"again (first on line {files_seen[path]}): list each photo once")
                files_seen[path] = line
                photo_id = row.get("photo_id") if len(files) == 1 and row.get("photo_id") else str(len(listing.photos))
                if any(pid == photo_id for pid, _ in listing.photos):
                    raise CatalogError(f"{csv_path} line {line}: listing {lid} has photo id {photo_id!r} twice")
                listing.photos.append((photo_id, path))
    return [x for x in listings.values() if x.photos], skipped, left_out


def _files_of(row: dict[str, str], directory: Path, by_stem: dict[str, list[Path]], name: str, line: int,
              skipped: list[tuple[str, str]]) -> tuple[list[Path], str | None]:
    """The files a CSV row names and the listing id they belong to (None: nothing to import from it)."""
    lid = row.get("listing_id") or None
    refs = ([row["filename"]] if row.get("filename") else
            [r.strip() for r in row.get("filenames", "").split(SEPARATOR) if r.strip()])
    if not refs and "filename" not in row and "filenames" not in row:  # listing_id only: DIR/<id>.<ext>
        found = by_stem.get(lid or "", [])
        if len(found) != 1:
            why = "no image" if not found else f"{len(found)} images"
            skipped.append((lid or f"line {line}", f"line {line} of {name}: {why} named {lid}.* in {directory}"))
            return [], None
        return found, lid
    if not refs:
        skipped.append((lid or f"line {line}", f"line {line} of {name} names no file"))
        return [], None
    files = []
    for ref in refs:
        path = directory / ref
        if not path.is_file():
            skipped.append((ref, f"named on line {line} of {name} but not found in {directory}"))
            continue
        files.append(path)
    if lid is None and files:
        lid = Path(refs[0]).with_suffix("").as_posix().replace("/", "-")
    return files, lid


def _take_fields(listing: CsvListing, row: dict[str, str], labels: list[str], metadata: list[str],
                 where: str) -> None:
    """Fill the listing's title, labels and metadata from one row; a value that differs from an earlier
    row's is refused (an empty cell just says nothing)."""
    wanted = [("title", TITLE)] + [("label", c) for c in labels] + [("metadata field", c) for c in metadata]
    for kind, column in wanted:
        value = row.get(column, "")
        if not value:
            continue
        holder = None if kind == "title" else listing.labels if kind == "label" else listing.metadata
        before = listing.title if holder is None else holder.get(column)
        if before is not None and before != value:
            raise CatalogError(f"{where}: listing {listing.listing_id} has {kind} {column!r} = {value!r} here but "
                               f"{before!r} on line {listing.line}: a listing has one value per column (leave the "
                               f"cell empty on its other rows)")
        if holder is None:
            listing.title = value
        else:
            holder[column] = value
