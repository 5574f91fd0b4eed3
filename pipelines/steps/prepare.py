"""The prepare step: validate a catalog (every bad row, with its line) and split it into the rows trained
on and the rows held out, by a stable hash of the listing id anyone can recompute (`held_out`)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from lookalike.pipelines.steps.runner import StepError


def held_out(listing_id: str, seed: int, fraction: float) -> bool:
    """Whether a listing is held out of training: a stable hash of (seed, listing id), so the split does
    not depend on row order or catalog size, and anyone can recompute it."""
    digest = hashlib.sha256(f"{seed}:{listing_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64 < fraction


def prepare_catalog(catalog_uri: str, holdout_fraction: float, seed: int, check_images: bool,
                    catalog, train_set, eval_set, report=None, for_training: bool = True) -> dict[str, Any]:
    """Validate the catalog (every bad row, with its line) and split it: `catalog` holds every row,
    `train_set` and `eval_set` the rows trained on and held out. Image locations are made absolute so
    the files can be read from any step. A catalog that is only indexed (`for_training=False`) may
    have a label with a single class.

    `catalog_uri` takes what `lookalike catalog` does: a name (`fashion-mnist-train`, meaning
    catalogs/<name>/catalog.jsonl in the configured bucket), an s3:// URI or a path.
    """
    from lookalike.core.s3 import connect
    from lookalike.catalogs.rows import Catalog, CatalogError, validate_catalog, write_catalog
    from lookalike.catalogs.importers import resolve_catalog_uri

    if not catalog_uri:
        raise StepError("no catalog given: set the catalog_uri parameter to a catalog name such as "
                        "fashion-mnist-train, or an s3:// URI of a catalog.jsonl (`lookalike catalog import` "
                        "writes one)")
    if not 0.0 <= holdout_fraction < 1.0:
        raise StepError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    uri = resolve_catalog_uri(catalog_uri)
    if uri.startswith("s3://"):
        connect()  # an unreachable store or wrong keys fail here, with the store's own advice
    try:
        checked = validate_catalog(uri, check_images=check_images)
    except CatalogError as exc:
        raise StepError(str(exc)) from None
    if not for_training:
        checked.problems = [p for p in checked.problems if not (p.line == 0 and "single class" in p.message)]
    if not checked.ok:
        raise StepError(f"catalog {uri} cannot be used:\n{checked.summary(max_problems=20)}\n"
                        f"Fix or drop the lines listed and run again (`lookalike catalog validate` shows them all)")
    skipped = checked.skipped_listings
    for problem in checked.problems:
        if problem.skip_listing:
            print(f"skipped listing {problem.listing_id}: {problem}", flush=True)
    source = Catalog.open(uri)
    # Each photo with its location made absolute; a listing with a refused photo is left out whole.
    rows = [r.with_image(source.resolve_image(r)) for r in source.rows if r.listing_id not in skipped]
    held = [r for r in rows if held_out(r.listing_id, seed, holdout_fraction)]
    held_ids = {r.listing_id for r in held}
    trained = [r for r in rows if r.listing_id not in held_ids]
    if holdout_fraction > 0 and not held:
        raise StepError(f"holdout_fraction {holdout_fraction} of {len(rows)} rows holds out nothing: "
                        f"raise it or import a larger catalog")
    for artifact, part in ((catalog, rows), (train_set, trained), (eval_set, held)):
        write_catalog(part, artifact.path)
        artifact.metadata.update({"rows": len(part), "source": uri})
    tasks = {task: len(labels) for task, labels in Catalog.from_rows(rows).tasks().items()}
    summary = {"catalog": uri, "rows": len(rows), "listings": checked.listings, "train_rows": len(trained),
               "eval_rows": len(held), "tasks": tasks}
    if report is not None:
        lines = [f"# Catalog {uri}", "", f"- listings: {checked.listings}",
                 f"- photos: {len(rows)} (trained on {len(trained)}, held out {len(held)})",
                 "", "| task | classes | labelled photos |", "| --- | --- | --- |"]
        for task, counts in sorted(checked.label_counts.items()):
            lines.append(f"| {task} | {len(counts)} | {sum(counts.values())} |")
        Path(report.path).write_text("\n".join(lines) + "\n")
    print(f"catalog {uri}: {checked.listings} listings with {len(rows)} photos, {len(trained)} photos to train on, "
          f"{len(held)} held out (whole listings); tasks {tasks}", flush=True)
    return summary


def open_catalog(path: str | Path):
    """A catalog another step wrote (image locations already absolute; rows already validated)."""
    from lookalike.catalogs.rows import Catalog

    return Catalog.open(str(path), strict=False, checked=True)


def image_cache_dir() -> Path:
    """Where steps keep decoded catalog images between runs on one machine."""
    from lookalike.core.artifacts import default_cache_dir

    return default_cache_dir() / "images"
