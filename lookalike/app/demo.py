"""The main job on the embedded defaults: from an empty machine to measured visual search, in one run.

    store up → import Fashion-MNIST → train-and-index (kfp.local) → transformer + predictor up →
    simulated phone photos of held-out listings → matches, recall@10, and the ImageNet baseline beside it

Everything is the real thing at a small size: a real S3 server, the same KFP pipeline that runs on a
cluster, the two KServe servers of the InferenceService, queries over KServe v2 REST. The defaults keep
the whole run within about 15 minutes on 2 CPU cores; `DemoSettings` (and `lookalike demo --help`) scale
it up. The phone photos are simulated from catalog images and every recall printed says so.
"""
from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from lookalike.core.settings import home


@dataclass
class DemoSettings:
    """What the demo runs. Training settings left at None take the pipeline's defaults, which are
    TrainConfig's (tuned for a 2-core CPU); `steps` is the demo's own, to fit its time budget."""

    rows: int = 3000  # catalog rows imported from Fashion-MNIST's training split (class-stratified)
    holdout_fraction: float = 0.1  # listings held out of training: the demo's queries are photos of these
    steps: int = 400
    image_size: int | None = None
    samples_per_task: int | None = None
    trainable_blocks: int | None = None
    embedding_dim: int | None = None
    queries: int = 100  # simulated phone photos sent through the served stack
    top_k: int = 10
    seed: int = 0
    min_recall_at_10: float = 0.0  # the demo's gates only refuse a broken run; the cluster defaults are stricter
    min_head_accuracy: float = 0.0
    min_index_recall: float = 0.8
    train_options: dict[str, Any] = field(default_factory=dict)

    def pipeline_params(self, catalog_uri: str) -> dict[str, Any]:
        """The train-and-index parameters; training settings left at None are not passed, so the
        pipeline's defaults (TrainConfig's) apply."""
        chosen = {"image_size": self.image_size, "embedding_dim": self.embedding_dim,
                  "trainable_blocks": self.trainable_blocks, "samples_per_task": self.samples_per_task}
        return {
            "catalog_uri": catalog_uri, "holdout_fraction": self.holdout_fraction, "seed": self.seed,
            "check_images": False,  # the importer wrote them a moment ago; embedding decodes each anyway
            "steps": self.steps, **{key: value for key, value in chosen.items() if value is not None},
            "phone_queries": min(self.queries, 200),
            "min_recall_at_10": self.min_recall_at_10, "min_head_accuracy": self.min_head_accuracy,
            "min_index_recall": self.min_index_recall, "max_regression": 1.0, "device": "auto",
            **self.train_options,  # any other training setting by name (lookalike/training/settings.py)
        }


@dataclass
class DemoResult:
    model_version: str
    index_version: str
    recall_at_k: float
    baseline_recall_at_k: float | None
    queries: int
    top_k: int
    html: Path
    seconds: dict[str, float]


def start_store(out: TextIO):
    """The configured store if it answers; otherwise the embedded one (started here, stopped by the caller).

    The settings land in os.environ, so the pipeline's tasks and the servers (child processes) inherit them.
    """
    from lookalike.core.s3 import S3Settings, StoreError, connect
    from lookalike.core.store_server import EmbeddedS3Server, free_port

    settings = S3Settings.from_env()
    try:
        connect(settings, create_bucket=True)
        print(f"using the store at {settings.url} (bucket {settings.bucket!r})", file=out, flush=True)
        return None
    except StoreError:
        host, _, port = settings.endpoint.partition(":")
        if host not in ("127.0.0.1", "localhost"):
            raise
    server = EmbeddedS3Server(home() / "s3", port=int(port or 9000), access_key=settings.access_key,
                              secret_key=settings.secret_key, bucket=settings.bucket)
    try:
        server.start()
    except StoreError:  # the port is taken by something that is not our store: take another
        server = EmbeddedS3Server(home() / "s3", port=free_port(), access_key=settings.access_key,
                                  secret_key=settings.secret_key, bucket=settings.bucket)
        server.start()
    os.environ.update(server.settings.to_env())
    print(f"started the embedded S3 server at {server.settings.url} (data in {server.data_dir})", file=out, flush=True)
    return server


def run_demo(settings: DemoSettings | None = None, *, out_dir: str | Path | None = None,
             out: TextIO | None = None) -> DemoResult:
    import sys

    from lookalike.app.serving_stack import ServingStack
    from lookalike.pipelines.local import run_local
    from lookalike.core.s3 import connect
    from lookalike.catalogs.importers import import_fashion_mnist

    settings = settings or DemoSettings()
    out = out or sys.stdout
    # Sleeping OpenMP workers: on a small shared machine, spinning ones starve the other processes.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per query request otherwise
    out_dir = Path(out_dir or home() / "demo")
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = now - clock
        clock = now

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    server = start_store(out)
    stack = None
    try:
        store = connect()
        say(f"\n== 1/4 import {settings.rows} Fashion-MNIST listings (real Zalando product photos)")
        uris = import_fashion_mnist(store, split_names=("train",), limit=settings.rows, seed=settings.seed)
        catalog_uri = uris["train"]
        lap("import")

        say("\n== 2/4 pipeline train-and-index, locally (the same pipeline a cluster runs)")
        run = run_local("train-and-index", settings.pipeline_params(catalog_uri), root=home() / "pipeline-runs",
                        out=out)
        model_version, index_version = run.outputs["model_version"], run.outputs["index_version"]
        say("step times: " + ", ".join(f"{step} {took:.0f} s" for step, took in run.steps))
        say(f"published model {model_version} and index {index_version}")
        lap("pipeline")

        say("\n== 3/4 serving: predictor (model + IVF index) and transformer (decode, preprocess), KServe v2")
        stack = ServingStack(model_version=model_version, index_version=index_version, log_dir=home() / "logs")
        stack.start()
        say(f"transformer at {stack.endpoints['transformer_rest']}, predictor at {stack.endpoints['predictor_rest']}")
        lap("serve")

        say(f"\n== 4/4 {settings.queries} simulated phone photos of held-out listings → top-{settings.top_k}")
        result = _query_held_out(store, catalog_uri, settings, stack.endpoints["transformer_rest"], out_dir,
                                 model_version, index_version, out)
        lap("query")
        result.seconds = seconds
        (out_dir / "result.json").write_text(json.dumps({**asdict(result), "html": str(result.html),
                                                          "settings": asdict(settings)}, indent=2))
        return result
    finally:
        if stack is not None:
            stack.stop()
        if server is not None:
            server.stop()


def _query_held_out(store, catalog_uri: str, settings: DemoSettings, url: str, out_dir: Path,
                    model_version: str, index_version: str, out: TextIO) -> DemoResult:
    from lookalike.app.client import query_photos, write_html
    from lookalike.pipelines.steps.prepare import held_out
    from lookalike.core.artifacts import model_repo
    from lookalike.catalogs.rows import Catalog
    from lookalike.training.phone_photos import SIMULATED_NOTE, make_phone_queries
    from lookalike.core.model_card import CARD_FILE, ModelCard

    catalog = Catalog.open(catalog_uri, store)
    held = catalog.subset([r for r in catalog.rows if held_out(r.listing_id, settings.seed, settings.holdout_fraction)])
    # A seed the pipeline's own evaluation did not use: fresh photos, not the ones the gates saw.
    photos = make_phone_queries(held, min(settings.queries, len(held)), settings.seed + 1)
    encoded = []
    for _, img in photos:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=90)
        encoded.append(buf.getvalue())
    results: list[dict[str, Any]] = []
    for start in range(0, len(encoded), 8):
        results.extend(query_photos(url, encoded[start:start + 8], top_k=settings.top_k))
    ranks = []
    for (lid, _), res in zip(photos, results):
        found = [m["listing_id"] for m in res["matches"]]
        ranks.append(found.index(lid) + 1 if lid in found else None)
    recall = sum(r is not None for r in ranks) / max(1, len(ranks))
    card = ModelCard.from_dict(model_repo(store).read_json(model_version, CARD_FILE))
    baseline = _baseline_recall(card.metrics)

    name = f"recall@{settings.top_k}"
    print(f"\n{'photo of':<22} {'found at':>8}   best match", file=out)
    for (lid, _), rank, res in list(zip(photos, ranks, results))[:15]:
        best = res["matches"][0] if res["matches"] else {"listing_id": "-", "title": ""}
        print(f"{lid:<22} {('#' + str(rank)) if rank else 'missed':>8}   {best['listing_id']} {best.get('title', '')}",
              file=out)
    if len(photos) > 15:
        print(f"… and {len(photos) - 15} more in the HTML page", file=out)
    baseline_text = f"{baseline:.3f}" if baseline is not None else "not measured"
    print(f"\n{name} through the served stack: {recall:.3f} over {len(photos)} queries "
          f"(ImageNet-pretrained baseline, same model family without fine-tuning: {baseline_text})", file=out)
    print(f"({SIMULATED_NOTE})", file=out)

    html_path = out_dir / "demo.html"
    rows = [(Path(f"{lid} - {'found at #' + str(rank) if rank else 'missed'}"), data, res)
            for (lid, _), data, rank, res in zip(photos, encoded, ranks, results)]
    write_html(html_path, rows)
    summary = (f"<p><b>{name}: {recall:.3f}</b> over {len(photos)} simulated phone photos of held-out listings, "
               f"through the transformer and predictor (model {model_version}, index {index_version}). "
               f"ImageNet-pretrained baseline {name}: <b>{baseline_text}</b>.</p><p><i>{SIMULATED_NOTE}</i></p>")
    page = html_path.read_text().replace("<h1>Lookalike matches</h1>", "<h1>Lookalike demo</h1>" + summary, 1)
    html_path.write_text(page)
    print(f"wrote {html_path}", file=out, flush=True)
    return DemoResult(model_version, index_version, recall, baseline, len(photos), settings.top_k, html_path, {})


def _baseline_recall(metrics: dict[str, Any]) -> float | None:
    """The ImageNet-baseline phone-photo recall@10 the evaluation step measured (None when absent)."""
    evaluation = metrics.get("evaluation", metrics)
    value = evaluation.get("baseline_phone_recall@10")
    return float(value) if value is not None else None
