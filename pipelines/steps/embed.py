"""The embed step: catalog photos → embeddings, through the serving preprocessing (the model card's own
spec, applied by the transformer's code) and the served graph, so the index holds what a query will meet.

A catalog too large for one node is embedded in shards (`shard` of `shards`; the pipelines run one task
per shard in parallel, each on the GPU pool): a listing's photos all fall in one shard, chosen by its
place in the catalog. Photos stream from the store as they are needed (no copy of the catalog on local
disk); decoding runs in worker threads ahead of the model, so the model never waits for the next batch;
on a CPU the model embeds `CPU_BATCH` images at a time (ONNX Runtime's fastest per image here), on a GPU
the whole decoded batch.

Every photo of a listing is embedded. A photo that cannot be read or decoded is left out and named (one
line each), a listing left without any photo is named too, and when no listing is left the step fails
with one line: nothing half-embedded reaches the index."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from lookalike.pipelines.steps.prepare import open_catalog
from lookalike.pipelines.steps.runner import StepError, check_device, progress
from lookalike.core.errors import LookalikeError

CPU_BATCH = 4  # images per ONNX Runtime call on a CPU: fastest per image at 2-4 on 2 cores (embed_throughput.py)
DECODE_WORKERS = 4  # threads decoding ahead of the model (I/O-bound fetches overlap; Pillow releases the GIL)


def load_embedder(model_dir: str | Path, device: str):
    """The model folder's embedder: ONNX Runtime on a CPU, PyTorch on CUDA, the machine's best for auto."""
    from lookalike.predictor.embedder import Embedder

    device = check_device(device)
    backend = {"auto": "auto", "cpu": "onnxruntime", "cuda": "torch"}[device]
    return Embedder.load(model_dir, backend=backend)


def embed_images(embedder, catalog, rows, batch_size: int = 32, desc: str = "embed",
                 skipped: list[tuple[int, str]] | None = None):
    """Embed catalog rows through the serving preprocessing: (embeddings [N,D], {task: probs [N,C]}).

    With a `skipped` list, a row whose photo cannot be read or decoded is left out of the result and
    recorded there as (its index in `rows`, why); without one, such a row fails the call."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from tqdm import tqdm

    from lookalike.core.preprocessing import preprocess

    spec = embedder.card.preprocessing
    chunks, probs = [], {t: [] for t in embedder.tasks}

    def load(row):
        image = catalog.load_image(row, min_side=spec.resize)  # as the transformer decodes
        return preprocess(image, spec)

    def load_or_why(row):
        try:
            return load(row)
        except (LookalikeError, OSError) as exc:  # unreadable, undecodable, missing, store refusing
            return f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)

    batch_size = max(1, int(batch_size))
    on_cpu = embedder.device == "cpu"
    step = min(batch_size, CPU_BATCH) if on_cpu else batch_size
    # On a CPU the model runs one call per core side by side (ONNX Runtime then gives each a single-threaded
    # session: fewer core-ms per image than one call spread over every core); on a GPU one call at a time.
    lanes = (os.cpu_count() or 1) if on_cpu else 1
    work = load if skipped is None else load_or_why
    outputs: list = []  # futures of embedder.embed, in row order
    with ThreadPoolExecutor(DECODE_WORKERS) as pool, ThreadPoolExecutor(lanes) as model_lanes, \
            tqdm(total=len(rows), desc=desc, unit="img", disable=not progress(), file=sys.stdout) as bar:
        # The next batch decodes while this one is embedded: the futures are submitted a batch ahead.
        starts = list(range(0, len(rows), batch_size))
        pending = [pool.submit(work, row) for row in rows[:batch_size]]
        for n, start in enumerate(starts):
            done = [f.result() for f in pending]
            if n + 1 < len(starts):
                pending = [pool.submit(work, row) for row in rows[starts[n + 1]:starts[n + 1] + batch_size]]
            loaded = []
            for k, got in enumerate(done):
                if isinstance(got, str):
                    skipped.append((start + k, got))
                else:
                    loaded.append(got)
            for i in range(0, len(loaded), step):
                outputs.append(model_lanes.submit(embedder.embed, np.stack(loaded[i:i + step])))
            while len([f for f in outputs if not f.done()]) > 2 * lanes:  # bounded: decoding runs ahead
                outputs[-2 * lanes - 1].result()
            bar.update(len(done))
        for future in outputs:
            emb, p = future.result()
            chunks.append(emb)
            for task in embedder.tasks:
                probs[task].append(p[task])
    dim = embedder.embedding_dim
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    return embeddings, {t: (np.concatenate(v) if v else np.zeros((0, len(embedder.heads[t])), np.float32))
                        for t, v in probs.items()}


def shard_numbers(shards: int) -> list[int]:
    """0 .. shards-1, the items the pipelines' embedding fan-out loops over."""
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise StepError(f"embed_shards must be a positive integer (one embedding task per shard), got {shards!r}")
    return list(range(shards))


def shard_of(listing_ids: list[str], shards: int) -> dict[str, int]:
    """Each listing's shard: its place among the catalog's listings, round robin, so shards are even and a
    listing's photos stay together."""
    order = list(dict.fromkeys(listing_ids))
    return {lid: i % shards for i, lid in enumerate(order)}


def embed_catalog(model, catalog, batch_size: int, device: str, embeddings, shard: int = 0,
                  shards: int = 1) -> dict[str, Any]:
    """Every photo of every listing (of shard `shard` of `shards`) → its embedding, saved with its listing
    id, photo id and the listing's labels (the index's input). Unreadable photos are left out, each named
    (see the module doc)."""
    import numpy as np

    if not (isinstance(shards, int) and shards >= 1 and 0 <= shard < shards):
        raise StepError(f"shard {shard!r} of {shards!r}: shards must be a positive integer and shard one of "
                        f"0..shards-1 (the embed_shards parameter)")
    embedder = load_embedder(model.path, device)
    cat = open_catalog(catalog.path)
    if shards > 1:
        mine = shard_of([r.listing_id for r in cat.rows], shards)
        cat = cat.subset([r for r in cat.rows if mine[r.listing_id] == shard])
        print(f"shard {shard + 1} of {shards}: {len(cat.listings())} listings, {len(cat.rows)} photos", flush=True)
    skipped: list[tuple[int, str]] = []
    vectors, _ = embed_images(embedder, cat, cat.rows, batch_size, desc=f"embed shard {shard + 1}/{shards}"
                              if shards > 1 else "embed catalog", skipped=skipped)
    bad = {i for i, _ in skipped}
    for i, why in skipped:
        print(f"skipped photo {cat.rows[i].photo} ({cat.rows[i].image}): {why}", flush=True)
    kept = [r for i, r in enumerate(cat.rows) if i not in bad]
    listings = cat.listings()
    left = {r.listing_id for r in kept}
    lost = [lid for lid in listings if lid not in left]
    for lid in lost:
        print(f"skipped listing {lid}: none of its {len(listings[lid])} photos could be read", flush=True)
    if not kept and shards == 1:
        raise StepError(f"none of the {len(listings)} listings of {catalog_source(catalog) or 'the catalog'} has a "
                        f"photo that can be read ({len(skipped)} photos failed, each named above): fix the photos "
                        f"or their URIs and run again; nothing was indexed")
    out = Path(embeddings.path)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "embeddings.npy", vectors.astype(np.float32).reshape(-1, embedder.embedding_dim))
    (out / "listings.jsonl").write_text("".join(json.dumps({"listing_id": r.listing_id, "photo_id": r.photo_id,
                                                            "labels": r.labels}) + "\n" for r in kept))
    # The catalog the rows came from (the prepare step records it), so the index card can name it and the
    # transformer can find the listings' titles and photos.
    info = {"model_version": embedder.model_version, "count": int(len(vectors)), "dim": embedder.embedding_dim,
            "backend": embedder.backend, "catalog": catalog_source(catalog), "listings": len(left),
            "skipped_photos": len(skipped), "skipped_listings": len(lost), "shard": shard, "shards": shards}
    (out / "embeddings.json").write_text(json.dumps(info, indent=2))
    embeddings.metadata.update(info)
    print(f"embedded {len(vectors)} photos of {len(left)} listings with model {embedder.model_version} "
          f"({embedder.backend})" + (f"; skipped {len(skipped)} photos, {len(lost)} listings" if skipped else ""),
          flush=True)
    return info


def catalog_source(catalog) -> str | None:
    """The catalog URI a prepared catalog artifact came from (the prepare step records it)."""
    return dict(getattr(catalog, "metadata", None) or {}).get("source")


def load_embeddings(paths):
    """(vectors [N,D] float32, listing ids, labels per row, info) from an embed step's folder, or from the
    folders of all its shards (a list, in shard order); the photo id of each row is `info["photo_ids"]`.
    Shards must come from one model; a catalog none of whose shards kept a photo fails here, once."""
    import numpy as np

    parts = [Path(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths])]
    vectors, ids, labels, photos, infos = [], [], [], [], []
    for path in parts:
        rows = [json.loads(line) for line in (path / "listings.jsonl").read_text().splitlines() if line.strip()]
        infos.append(json.loads((path / "embeddings.json").read_text()))
        vectors.append(np.load(path / "embeddings.npy"))
        ids += [r["listing_id"] for r in rows]
        labels += [r["labels"] for r in rows]
        photos += [str(r.get("photo_id", "0")) for r in rows]
    models = {i.get("model_version") for i in infos}
    if len(models) != 1:
        raise StepError(f"the shards were embedded with different models ({', '.join(sorted(map(str, models)))}); "
                        f"run the pipeline again")
    info = dict(infos[0])
    info.update(count=len(ids), photo_ids=photos, listings=sum(int(i.get("listings", 0)) for i in infos),
                skipped_photos=sum(int(i.get("skipped_photos", 0)) for i in infos), shards=len(parts))
    if not ids:
        raise StepError(f"no listing of {info.get('catalog') or 'the catalog'} has a photo that can be read "
                        f"({info['skipped_photos']} photos failed, each named in the embed steps' logs): fix the "
                        f"photos or their URIs and run again; nothing was indexed")
    return np.concatenate(vectors).astype(np.float32, copy=False), ids, labels, info
