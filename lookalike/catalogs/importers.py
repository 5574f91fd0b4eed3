"""Catalog importers: Fashion-MNIST (real Zalando product images) and a user's own folder of images.

Both write the same layout into the store::

    catalogs/<name>/images/<listing_id>.<ext>              a listing's only photo  } uploaded first,
    catalogs/<name>/images/<listing_id>/<photo_id>.<ext>   each of several photos  } in parallel
    catalogs/<name>/catalog.jsonl                          written last, one line per listing

so a catalog is never visible with images still missing. Image URIs in the rows are absolute
`s3://bucket/key` URIs, so the catalog file can be copied or read from anywhere.
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from lookalike.core.s3 import ObjectStore
from lookalike.catalogs.rows import CatalogError, CatalogRow, image_to_png_bytes, write_catalog
from lookalike.catalogs.layout import catalog_key, image_key, images_prefix
from lookalike.catalogs.listing_csv import CsvListing, read_listing_csv
from lookalike.core.decoding import ImageError, ImageLimits, decode_image

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# The class index of Fashion-MNIST's label files is the position in this list.
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Our broad grouping: what a marketplace's top-level navigation would show.
BROAD_CATEGORY = {
    "T-shirt/top": "tops", "Pullover": "tops", "Shirt": "tops",
    "Trouser": "bottoms",
    "Dress": "dresses",
    "Coat": "outerwear",
    "Sandal": "footwear", "Sneaker": "footwear", "Ankle boot": "footwear",
    "Bag": "bags",
}
# Debian's file stem of each split; `test` is kept as its own catalog for evaluation.
FASHION_MNIST_SPLITS = {"train": "train", "test": "t10k"}

# `shade` thresholds on the mean *stored* intensity of the foreground (pixels above SHADE_FOREGROUND).
# Fashion-MNIST stores negated intensities (the white studio background is 0), so a high stored mean
# is a dark garment. The cut points are about the tertiles of the training split.
SHADE_FOREGROUND = 25
SHADE_LIGHT_BELOW = 140.0
SHADE_DARK_ABOVE = 185.0
SHADE_FRACTION = 0.15

IMAGE_SUFFIXES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
                  ".heic": "image/heic", ".heif": "image/heif", ".avif": "image/avif"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def resolve_catalog_uri(ref: str, store: ObjectStore | None = None) -> str:
    """A catalog reference as given on the command line → an s3:// URI or a path.

    `s3://…` and existing files are returned as they are; a bare name such as `fashion-mnist-train`
    means `catalogs/<name>/catalog.jsonl` in the configured bucket.
    """
    if "://" in ref or Path(ref).is_file() or not _NAME_RE.match(ref):
        return ref
    from lookalike.core.s3 import S3Settings

    bucket = store.bucket if store is not None else S3Settings.from_env().bucket
    return f"s3://{bucket}/{catalog_key(ref)}"


# ---- Fashion-MNIST ---------------------------------------------------------------------------------

def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format, optionally gzipped) into a uint8 array.

    Header: two zero bytes, a dtype code (0x08 = unsigned byte), the number of dimensions, then each
    dimension as a big-endian int32; the data follows.
    """
    path = Path(path)
    data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise CatalogError(f"{path} is not an unsigned-byte IDX file (the MNIST format)")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise CatalogError(f"{path} is truncated: header says {dims}, found {body.size} values")
    return body.reshape(dims)


def load_fashion_mnist(split: str, directory: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,28,28], labels uint8 [N]) of `train` (60k) or `test` (10k)."""
    if split not in FASHION_MNIST_SPLITS:
        raise CatalogError(f"unknown Fashion-MNIST split {split!r}; choose from {', '.join(FASHION_MNIST_SPLITS)}")
    stem = FASHION_MNIST_SPLITS[split]
    images_path = directory / f"{stem}-images-idx3-ubyte.gz"
    labels_path = directory / f"{stem}-labels-idx1-ubyte.gz"
    for p in (images_path, labels_path):
        if not p.is_file():
            raise CatalogError(f"{p} is missing: install Debian's dataset-fashion-mnist package "
                               f"(`apt-get install dataset-fashion-mnist`)")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise CatalogError(f"Fashion-MNIST {split}: {images.shape} images do not match {labels.shape} labels")
    return images, labels


def shade_of(images: np.ndarray) -> np.ndarray:
    """`light` / `medium` / `dark` per image, from the mean stored intensity of its foreground.

    Derived from pixels, not labelled by a person: it stands in for a sparse seller-filled attribute.
    """
    flat = images.reshape(len(images), -1)
    mean = np.empty(len(images), dtype=np.float64)
    for start in range(0, len(flat), 8192):  # in chunks: a float copy of all 60k images is 190 MB
        pixels = flat[start:start + 8192].astype(np.float32)
        fg = pixels > SHADE_FOREGROUND
        mean[start:start + 8192] = (pixels * fg).sum(1) / np.maximum(fg.sum(1), 1)
    return np.where(mean < SHADE_LIGHT_BELOW, "light", np.where(mean > SHADE_DARK_ABOVE, "dark", "medium"))


def stratified_slice(labels: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of `limit` rows drawn without replacement, as evenly over the classes as they allow."""
    classes = np.unique(labels)
    per_class = {int(c): np.flatnonzero(labels == c) for c in classes}
    want = {c: limit // len(classes) for c in per_class}
    for c in list(per_class)[: limit % len(classes)]:
        want[c] += 1
    chosen = [rng.choice(idx, size=min(want[c], len(idx)), replace=False) for c, idx in per_class.items()]
    return np.sort(np.concatenate(chosen))


def import_fashion_mnist(store: ObjectStore, *, split_names: Sequence[str] = ("train", "test"),
                         limit: int | None = None, seed: int = 0, workers: int = 16, progress: bool = True,
                         directory: Path = FASHION_MNIST_DIR, skip_existing: bool = True) -> dict[str, str]:
    """Import Fashion-MNIST into `catalogs/fashion-mnist-<split>/` and return each split's catalog URI.

    Rows: listing id `fmnist-<split>-<index in the original file, 5 digits>`, title "Sneaker #42", image a
    28x28 grayscale PNG, labels

    - `fine_category`: the 10 Fashion-MNIST classes;
    - `category`: tops, bottoms, dresses, outerwear, footwear, bags (see BROAD_CATEGORY);
    - `shade`: light / medium / dark on a seeded ~15% of rows only, as if few sellers filled it in. It is
      derived from pixels (mean foreground intensity with thresholds SHADE_LIGHT_BELOW/SHADE_DARK_ABOVE),
      not labelled by a person: it exists to exercise training on a sparse task.

    `limit` keeps at most that many rows per split, a seeded class-stratified slice (tests, quick demos).
    Listing ids and `shade` presence do not depend on `limit`, so a slice is a subset of the full import.
    With `skip_existing`, images already in the store are not uploaded again (a re-import is quick). A full
    import of both splits took about 290 s on 2 busy cores against the embedded store.
    """
    store.check()  # fail before uploading anything if the store is down, the keys wrong, the bucket gone
    uris = {}
    for split in split_names:
        started = time.perf_counter()
        images, labels = load_fashion_mnist(split, directory)
        # One generator per split, seeded independently of `limit`, so row-level choices are stable.
        split_rng = np.random.default_rng([seed, list(FASHION_MNIST_SPLITS).index(split)])
        has_shade = split_rng.random(len(labels)) < SHADE_FRACTION
        shades = shade_of(images)
        if limit is not None and limit < len(labels):
            if limit <= 0:
                raise CatalogError(f"--limit must be positive, got {limit}")
            keep = stratified_slice(labels, limit, np.random.default_rng([seed, 1000 + len(labels)]))
        else:
            keep = np.arange(len(labels))
        name = f"fashion-mnist-{split}"
        rows = []
        for i in keep:
            i = int(i)
            fine = FASHION_MNIST_CLASSES[int(labels[i])]
            lid = f"fmnist-{split}-{i:05d}"
            lab = {"category": BROAD_CATEGORY[fine], "fine_category": fine}
            if has_shade[i]:
                lab["shade"] = str(shades[i])
            rows.append(CatalogRow(lid, store.uri(image_key(name, lid, None, ".png")), lab, "catalog",
                                   f"{fine} #{i}"))

        def encode(k: int, idx=keep, name=name, rows=rows, images=images) -> tuple[str, bytes, str]:
            from PIL import Image

            return (image_key(name, rows[k].listing_id, None, ".png"),
                    image_to_png_bytes(Image.fromarray(images[int(idx[k])])), "image/png")

        # An image's bytes depend only on its listing id, so images left by an earlier import are kept.
        present = set(store.iter(images_prefix(name))) if skip_existing else set()
        todo = [k for k in range(len(rows)) if image_key(name, rows[k].listing_id, None, ".png") not in present]
        _upload(store, (lambda k=k: encode(k) for k in todo), len(todo), workers, progress,
                desc=f"upload {name}")
        write_catalog(rows, store.uri(catalog_key(name)), store)
        uris[split] = store.uri(catalog_key(name))
        print(f"imported {len(rows)} rows into {uris[split]} in {time.perf_counter() - started:.1f} s", flush=True)
    return uris


# ---- a user's folder -------------------------------------------------------------------------------

@dataclass
class ImportResult:
    uri: str
    rows: int                  # photos imported
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file or listing, why)
    listings: int = 0
    left_out: list[str] = field(default_factory=list)  # CSV columns that are neither labels nor metadata

    def __str__(self) -> str:
        text = f"imported {self.listings} listings with {self.rows} photos into {self.uri}"
        if self.left_out:
            text += f"; columns not imported (neither labels nor metadata): {', '.join(self.left_out)}"
        if self.skipped:
            text += f"; skipped {len(self.skipped)}:\n" + "\n".join(f"  {f}: {why}" for f, why in self.skipped)
        return text


def import_folder(store: ObjectStore, directory: str | Path, name: str, *, labels_csv: Path | None = None,
                  task: str = "category", source: str = "catalog", label_columns: Sequence[str] | None = None,
                  metadata_columns: Sequence[str] | None = None, workers: int = 16,
                  progress: bool = True) -> ImportResult:
    """Import a folder of JPEG/PNG/WebP/HEIC/AVIF photos as catalog `name`.

    Listings and labels come from one of:
    - sub-folder names (`DIR/<label>/<file>`), as task `task`: each file is a listing with one photo;
      files directly in DIR have no label;
    - a CSV (`labels_csv`, see `lookalike.catalogs.listing_csv`): one row per photo (`listing_id,filename,…`) or a
      `filenames` column of `;`-separated files, so a listing may have several photos; a `title` column is
      the title; `label_columns` / `metadata_columns` say which other columns are labels to learn and which
      are metadata to show (default: every other column is a label). Only the files the CSV names are
      imported.

    Every photo is decoded with the serving checks first; unreadable ones are skipped, and a listing left
    without a photo is skipped too, each reported in the result and in a warning. The bytes are uploaded
    unchanged, then catalog.jsonl (one line per listing) last.
    """
    directory = Path(directory)
    if not _NAME_RE.match(name):
        raise CatalogError(f"catalog name {name!r} is not valid: use letters, digits, '.', '_' or '-'")
    if not directory.is_dir():
        raise CatalogError(f"{directory} is not a folder of images")
    if labels_csv is None and (label_columns or metadata_columns):
        raise CatalogError("--label-columns and --metadata-columns describe the columns of --labels-csv: give the CSV")
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    csv_resolved = Path(labels_csv).resolve() if labels_csv is not None else None
    ignored = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES and p.resolve() != csv_resolved]
    skipped: list[tuple[str, str]] = [(p.relative_to(directory).as_posix(),
                                       "not a .jpg, .jpeg, .png, .webp, .heic, .heif or .avif file") for p in ignored]
    left_out: list[str] = []
    if labels_csv is not None:
        listings, csv_skipped, left_out = read_listing_csv(Path(labels_csv), directory, images,
                                                           label_columns=label_columns,
                                                           metadata_columns=metadata_columns)
        skipped += csv_skipped
        named = {path for listing in listings for _, path in listing.photos}
        missing = [p for p in images if p not in named]
        if missing:
            log.warning("%d images in %s are not in %s and were not imported (e.g. %s)", len(missing), directory,
                        Path(labels_csv).name, missing[0].relative_to(directory))
    else:
        ids = _listing_ids(images, directory)
        listings = []
        for line, path in enumerate(images, start=1):
            rel = path.relative_to(directory)
            listings.append(CsvListing(ids[path], line, [("0", path)],
                                       labels={task: rel.parts[0]} if len(rel.parts) > 1 else {}))

    store.check()  # nothing is uploaded to a store that is down or refuses us
    limits = ImageLimits()
    rows: list[CatalogRow] = []
    uploads: list[tuple[str, Path]] = []
    for listing in listings:
        kept = []
        for photo_id, path in listing.photos:
            try:
                decode_image(path.read_bytes(), limits, name=path.name)
            except (ImageError, OSError) as exc:
                skipped.append((path.relative_to(directory).as_posix(), str(exc)))
                continue
            kept.append((photo_id, path))
        if not kept:
            if len(listing.photos) > 1:
                skipped.append((listing.listing_id, f"no readable photo among its {len(listing.photos)}: the "
                                                    f"listing was not imported"))
            continue
        for photo_id, path in kept:
            key = image_key(name, listing.listing_id, photo_id if len(kept) > 1 else None, path.suffix.lower())
            key = unchanged_or_new_key(store, key, path.read_bytes())
            uploads.append((key, path))
            rows.append(CatalogRow(listing.listing_id, store.uri(key), listing.labels, source, listing.title,
                                   listing.line, photo_id, listing.metadata))
    for rel, why in skipped:
        log.warning("skipped %s: %s", rel, why)
    if not rows:
        raise CatalogError(f"no readable images to import from {directory}" +
                           (f" ({len(skipped)} files skipped)" if skipped else ""))

    def job(k: int) -> tuple[str, bytes, str]:
        key, path = uploads[k]
        return key, path.read_bytes(), IMAGE_SUFFIXES[path.suffix.lower()]

    _upload(store, (lambda k=k: job(k) for k in range(len(uploads))), len(uploads), workers, progress,
            desc=f"upload {name}")
    uri = store.uri(catalog_key(name))
    write_catalog(rows, uri, store)
    if skipped:
        log.warning("%d files or listings were skipped (listed above)", len(skipped))
    return ImportResult(uri, len(rows), skipped, len({r.listing_id for r in rows}), left_out)




def unchanged_or_new_key(store: ObjectStore, key: str, data: bytes) -> str:
    """`key`, unless the store already holds other bytes there: then a key named by the new bytes' hash
    (`…/L1.<sha256[:12]>.jpg`). A re-import never overwrites a photo in place, so an index built from the
    earlier import keeps serving photos that exist (published indexes name their photos' keys); what an
    import writes is visible only once its catalog.jsonl is (written last)."""
    try:
        if not store.exists(key) or store.get_bytes(key) == data:
            return key
    except Exception:  # noqa: BLE001 - unreadable as good as changed: a new key loses nothing
        pass
    stem, dot, suffix = key.rpartition(".")
    return f"{stem}.{hashlib.sha256(data).hexdigest()[:12]}{dot}{suffix}" if dot else \
        f"{key}.{hashlib.sha256(data).hexdigest()[:12]}"


def _listing_ids(images: list[Path], directory: Path) -> dict[Path, str]:
    """The file name without extension; the relative path (with '-' for '/') when names repeat."""
    stems = [p.stem for p in images]
    unique = len(set(stems)) == len(stems)
    ids = {}
    for p in images:
        rel = p.relative_to(directory).with_suffix("").as_posix()
        ids[p] = p.stem if unique else rel.replace("/", "-")
    return ids


def _upload(store: ObjectStore, jobs: Iterable[Callable[[], tuple[str, bytes, str]]], total: int, workers: int,
            progress: bool, desc: str) -> None:
    """Run upload jobs (each returns key, body, content type) on a thread pool with a progress bar."""
    from tqdm import tqdm

    def run(job: Callable[[], tuple[str, bytes, str]]) -> None:
        key, body, content_type = job()
        store.put_bytes(key, body, content_type=content_type)

    with ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        try:
            for _ in pool.map(run, jobs):
                bar.update()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # one failure stops the rest: no catalog follows
            raise
