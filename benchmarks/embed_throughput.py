"""Embedding throughput: the index pipeline's embed step against the model alone, in one run.

    python benchmarks/embed_throughput.py [--photos 600] [--size 224] [--rounds 3]

- baseline: the served model (ONNX Runtime on a CPU, torch on CUDA) embedding preprocessed tensors that
  are already in memory, at batch sizes 1, 2, 4, 8, 16 and 32; its best images/s is what the hardware
  can do with this model;
- the embed step (`lookalike.pipelines.steps.embed.embed_catalog`, what each shard task of the `index` pipeline
  runs): photos streamed from a real S3 server, decoded (JPEG draft to the model's resize), preprocessed
  and embedded, with decoding overlapped with the model.

The catalog is phone-like photos made from scikit-image's sample photographs: random crops resized to
640x480 and saved as JPEG at quality 90 (~60-90 KB each), uploaded to a private embedded S3 server. The
two are timed in alternating rounds (the machine may be shared) and the ratio is the median of the
per-round ratios. The last line reads `embed: step=<img/s> best_batch=<img/s> (batch <b>) ratio=<r>`.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCHES = (1, 2, 4, 8, 16, 32)


class Artifact:
    """What KFP hands a step: a path and a metadata dict."""

    def __init__(self, path, metadata=None):
        self.path, self.metadata = str(path), dict(metadata or {})


def make_photos(n: int, seed: int = 0) -> list[bytes]:
    from PIL import Image
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    sources = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket(), skdata.immunohistochemistry()]
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 0.9)), int(w * rng.uniform(0.5, 0.9))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        img = Image.fromarray(src[y:y + ch, x:x + cw]).convert("RGB").resize((640, 480), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def publish_catalog(store, photos: list[bytes], workdir: Path) -> Artifact:
    """The photos as a one-photo-per-listing catalog in the store, prepared as the pipeline prepares it."""
    from lookalike.pipelines.steps.prepare import prepare_catalog
    from lookalike.catalogs.rows import CatalogRow, write_catalog

    rows = []
    for i, data in enumerate(photos):
        key = f"catalogs/bench-photos/images/p{i:05d}.jpg"
        store.put_bytes(key, data, content_type="image/jpeg")
        rows.append(CatalogRow(f"p{i:05d}", store.uri(key), {"category": "a" if i % 2 else "b"}))
    uri = store.uri("catalogs/bench-photos/catalog.jsonl")
    write_catalog(rows, uri, store)
    parts = {name: Artifact(workdir / f"{name}.jsonl") for name in ("catalog", "train_set", "eval_set")}
    prepare_catalog(uri, 0.0, 0, False, for_training=False, **parts)
    return parts["catalog"]


def publish_model(store, size: int) -> Path:
    from lookalike.core.artifacts import model_repo, new_version
    from lookalike.training.export import export_model, publish_model
    from lookalike.training.model import ModelConfig, create_model
    from lookalike.core.preprocessing import PreprocessSpec

    config = ModelConfig(embedding_dim=128, heads={"category": ["a", "b"]},
                         preprocessing=PreprocessSpec(size=size, resize=round(size * 256 / 224)))
    with tempfile.TemporaryDirectory() as out:
        export_model(create_model(config), config, out, model_version=new_version())
        version = publish_model(store, out)
    return model_repo(store).fetch(version)


def model_alone(embedder, size: int, seconds: float = 2.0) -> dict[int, float]:
    """Images/s of the model on in-memory preprocessed tensors, per batch size."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((max(BATCHES), 3, size, size), dtype=np.float32)
    rates = {}
    for batch in BATCHES:
        embedder.embed(x[:batch])  # warm up this shape
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds or done == 0:
            embedder.embed(x[:batch])
            done += batch
        rates[batch] = done / (time.perf_counter() - start)
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=600, help="catalog photos (default 600)")
    parser.add_argument("--size", type=int, default=224, help="model input size in px (default 224)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--batch-size", type=int, default=64, help="the step's decode batch (default 64)")
    args = parser.parse_args()
    os.environ["LOOKALIKE_PROGRESS"] = "0"

    from lookalike.pipelines.steps.embed import embed_catalog, load_embedder
    from lookalike.core.s3 import ObjectStore
    from lookalike.core.store_server import EmbeddedS3Server

    workdir = Path(tempfile.mkdtemp(prefix="lookalike-embed-bench-"))
    os.environ.setdefault("LOOKALIKE_CACHE", str(workdir / "cache"))
    s3 = EmbeddedS3Server(workdir / "s3")
    settings = s3.start()
    os.environ.update(settings.to_env())
    try:
        store = ObjectStore(settings)
        photos = make_photos(args.photos)
        print(f"{len(photos)} photos of 640x480 (JPEG q90, mean {np.mean([len(p) for p in photos]) / 1e3:.0f} KB) "
              f"in a local S3 server; tf_efficientnet_lite0 at {args.size} px, {os.cpu_count()} cores", flush=True)
        catalog = publish_catalog(store, photos, workdir)
        model = Artifact(publish_model(store, args.size))
        embedder = load_embedder(model.path, "auto")
        print(f"backend: {embedder.backend}", flush=True)
        ratios, steps, bests = [], [], []
        for r in range(args.rounds):
            rates = model_alone(embedder, args.size)
            best_batch = max(rates, key=rates.get)
            start = time.perf_counter()
            info = embed_catalog(model, catalog, batch_size=args.batch_size, device="auto",
                                 embeddings=Artifact(workdir / f"emb-{r}"))
            step = info["count"] / (time.perf_counter() - start)
            ratios.append(step / rates[best_batch])
            steps.append(step)
            bests.append((rates[best_batch], best_batch))
            print(f"round {r + 1}: model alone " + "  ".join(f"b{b} {v:.1f}" for b, v in rates.items())
                  + f" img/s; embed step {step:.1f} img/s = {ratios[-1]:.2f} of batch {best_batch}", flush=True)
        best, batch = bests[int(np.argsort(ratios)[len(ratios) // 2])]
        print(f"embed: step={np.median(steps):.1f} best_batch={best:.1f} (batch {batch}) "
              f"ratio={np.median(ratios):.2f}")
    finally:
        s3.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
