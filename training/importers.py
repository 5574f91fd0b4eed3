"""Catalog importers: Fashion-MNIST (real Zalando product images) and a user's own folder of images.

Both write the same layout into the store::

    catalogs/<name>/images/<listing_id>.<ext>   uploaded first, in parallel
    catalogs/<name>/catalog.jsonl               written last

so a catalog is never visible with images still missing. Image URIs in the rows are absolute
`s3://bucket/key` URIs, so the catalog file can be copied or read from anywhere.
"""
from __future__ import annotations

import csv
import gzip
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from storage.s3 import ObjectStore
from training.catalog import CatalogError, CatalogRow, image_to_png_bytes, write_catalog
from transformer.decoding import ImageError, ImageLimits, decode_image

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

IMAGE_SUFFIXES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def catalog_key(name: str) -> str:
    return f"catalogs/{name}/catalog.jsonl"


def resolve_catalog_uri(ref: str, store: ObjectStore | None = None) -> str:
    """A catalog reference as given on the command line → an s3:// URI or a path.

    `s3://…` and existing files are returned as they are; a bare name such as `fashion-mnist-train`
    means `catalogs/<name>/catalog.jsonl` in the configured bucket.
    """
    if "://" in ref or Path(ref).is_file() or not _NAME_RE.match(ref):
        return ref
    from storage.s3 import S3Settings

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
            rows.append(CatalogRow(lid, store.uri(f"catalogs/{name}/images/{lid}.png"), lab, "catalog",
                                   f"{fine} #{i}"))

        def encode(k: int, idx=keep) -> tuple[str, bytes, str]:
            from PIL import Image

            return (f"catalogs/{name}/images/{rows[k].listing_id}.png",
                    image_to_png_bytes(Image.fromarray(images[int(idx[k])])), "image/png")

        # An image's bytes depend only on its listing id, so images left by an earlier import are kept.
        present = set(store.iter(f"catalogs/{name}/images/")) if skip_existing else set()
        todo = [k for k in range(len(rows)) if f"catalogs/{name}/images/{rows[k].listing_id}.png" not in present]
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
    rows: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)

    def __str__(self) -> str:
        text = f"imported {self.rows} rows into {self.uri}"
        if self.skipped:
            text += f"; skipped {len(self.skipped)} files:\n" + "\n".join(f"  {f}: {why}" for f, why in self.skipped)
        return text


def import_folder(store: ObjectStore, directory: str | Path, name: str, *, labels_csv: Path | None = None,
                  task: str = "category", source: str = "catalog", workers: int = 16,
                  progress: bool = True) -> ImportResult:
    """Import a folder of JPEG/PNG/WebP images as catalog `name`.

    Labels come from one of:
    - sub-folder names (`DIR/<label>/<file>`), as task `task`; files directly in DIR have no label;
    - a CSV (`labels_csv`) whose first column is `filename` (a path relative to DIR) or `listing_id`
      (a file in DIR whose name without extension is that id), then one column per task; an empty cell
      is a missing label. Only the files the CSV names are imported.

    Every image is decoded with the serving checks first; unreadable ones are skipped, each reported by
    name in the result and in a warning. The image bytes are uploaded unchanged.
    """
    directory = Path(directory)
    if not _NAME_RE.match(name):
        raise CatalogError(f"catalog name {name!r} is not valid: use letters, digits, '.', '_' or '-'")
    if not directory.is_dir():
        raise CatalogError(f"{directory} is not a folder of images")
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    csv_resolved = Path(labels_csv).resolve() if labels_csv is not None else None
    ignored = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES and p.resolve() != csv_resolved]
    skipped: list[tuple[str, str]] = [(p.relative_to(directory).as_posix(),
                                       "not a .jpg, .jpeg, .png or .webp file") for p in ignored]

    if labels_csv is not None:
        entries, csv_skipped = _entries_from_csv(Path(labels_csv), directory, images)
        skipped += csv_skipped
    else:
        entries = []
        ids = _listing_ids(images, directory)
        for path in images:
            rel = path.relative_to(directory)
            labels = {task: rel.parts[0]} if len(rel.parts) > 1 else {}
            entries.append((ids[path], path, labels))

    store.check()  # nothing is uploaded to a store that is down or refuses us
    limits = ImageLimits()
    good: list[tuple[str, Path, dict[str, str]]] = []
    for lid, path, labels in entries:
        try:
            decode_image(path.read_bytes(), limits, name=path.name)
        except (ImageError, OSError) as exc:
            skipped.append((path.relative_to(directory).as_posix(), str(exc)))
            continue
        good.append((lid, path, labels))
    for rel, why in skipped:
        log.warning("skipped %s: %s", rel, why)
    if not good:
        raise CatalogError(f"no readable images to import from {directory}" +
                           (f" ({len(skipped)} files skipped)" if skipped else ""))

    rows = [CatalogRow(lid, store.uri(f"catalogs/{name}/images/{lid}{path.suffix.lower()}"), labels, source,
                       path.stem) for lid, path, labels in good]

    def job(k: int) -> tuple[str, bytes, str]:
        _, path, _ = good[k]
        return (f"catalogs/{name}/images/{rows[k].listing_id}{path.suffix.lower()}", path.read_bytes(),
                IMAGE_SUFFIXES[path.suffix.lower()])

    _upload(store, (lambda k=k: job(k) for k in range(len(rows))), len(rows), workers, progress,
            desc=f"upload {name}")
    uri = store.uri(catalog_key(name))
    write_catalog(rows, uri, store)
    if skipped:
        log.warning("%d files were skipped (listed above)", len(skipped))
    return ImportResult(uri, len(rows), skipped)


def _listing_ids(images: list[Path], directory: Path) -> dict[Path, str]:
    """The file name without extension; the relative path (with '-' for '/') when names repeat."""
    stems = [p.stem for p in images]
    unique = len(set(stems)) == len(stems)
    ids = {}
    for p in images:
        rel = p.relative_to(directory).with_suffix("").as_posix()
        ids[p] = p.stem if unique else rel.replace("/", "-")
    return ids


def _entries_from_csv(csv_path: Path, directory: Path, images: list[Path]
                      ) -> tuple[list[tuple[str, Path, dict[str, str]]], list[tuple[str, str]]]:
    if not csv_path.is_file():
        raise CatalogError(f"labels CSV {csv_path} does not exist")
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header or header[0].strip() not in ("filename", "listing_id") or len(header) < 2:
            raise CatalogError(f"{csv_path}: the first line must be a header `filename,<task>,…` or "
                               f"`listing_id,<task>,…`, got {header!r}")
        key, tasks = header[0].strip(), [t.strip() for t in header[1:]]
        if any(not t for t in tasks) or len(set(tasks)) != len(tasks):
            raise CatalogError(f"{csv_path}: task columns must have distinct, non-empty names: {tasks}")
        by_stem: dict[str, list[Path]] = {}
        for p in images:
            by_stem.setdefault(p.stem, []).append(p)
        entries, skipped, seen = [], [], {}
        for line, cells in enumerate(reader, start=2):
            if not cells or not any(c.strip() for c in cells):
                continue
            ref = cells[0].strip()
            if len(cells) > len(header):
                raise CatalogError(f"{csv_path} line {line}: {len(cells)} cells for {len(header)} columns")
            labels = {t: c.strip() for t, c in zip(tasks, cells[1:]) if c.strip()}
            if key == "filename":
                path = directory / ref
                if not path.is_file():
                    skipped.append((ref, f"named on line {line} of {csv_path.name} but not found in {directory}"))
                    continue
                lid = Path(ref).with_suffix("").as_posix().replace("/", "-")
            else:
                found = by_stem.get(ref, [])
                if len(found) != 1:
                    why = "no image" if not found else f"{len(found)} images"
                    skipped.append((ref, f"line {line} of {csv_path.name}: {why} named {ref}.* in {directory}"))
                    continue
                path, lid = found[0], ref
            if lid in seen:
                raise CatalogError(f"{csv_path} line {line}: {ref!r} repeats line {seen[lid]}")
            seen[lid] = line
            entries.append((lid, path, labels))
    listed = {p for _, p, _ in entries}
    missing = [p for p in images if p not in listed]
    if missing:
        log.warning("%d images in %s are not in %s and were not imported (e.g. %s)", len(missing), directory,
                    csv_path.name, missing[0].relative_to(directory))
    return entries, skipped


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
