"""The work of each pipeline step, as plain functions over local folders and the store.

`pipelines/components.py` wraps each of these in a KFP component; keeping the work here means it is
tested without KFP, and the components stay a few lines each. Artifacts arrive as objects with a
`.path` (a local file or folder, downloaded by the KFP launcher on a cluster) and a `.metadata` dict;
metrics artifacts also have `log_metric` / `log_confusion_matrix`.

Every failure a user can fix raises `StepError` (or a store/catalog/artifact error) with a message that
says what to do; `run_step` prints it on one marked line, so a local run can show the user the message
of the step that failed instead of a stack trace.
"""
from __future__ import annotations

import hashlib
import html
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

STEP_FAILED = "lookalike-step-failed:"  # the marker line a failed step prints (read by pipelines.local)


class StepError(RuntimeError):
    """A step cannot go on; the message says what is wrong and what to do."""


class GateFailed(StepError):
    """The new model or index is not good enough to publish; nothing was published."""


def run_step(name: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Run one step. A known failure prints the marked message and exits 1 without a traceback."""
    started = time.perf_counter()
    try:
        result = fn(**kwargs)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one marked line
        if not _is_user_error(exc):
            traceback.print_exc()
        message = str(exc).strip() or type(exc).__name__
        print(f"{STEP_FAILED} {name}: {message}".replace("\n", "\n    "), flush=True)
        raise SystemExit(1) from None
    print(f"{name}: done in {time.perf_counter() - started:.1f} s", flush=True)
    return result


def _is_user_error(exc: Exception) -> bool:
    from storage.artifacts import ArtifactError
    from storage.s3 import StoreError

    return isinstance(exc, (StepError, StoreError, ArtifactError, ValueError, FileNotFoundError))


def _progress() -> bool:
    return os.environ.get("LOOKALIKE_PROGRESS", "1") != "0"


# ---- catalog ---------------------------------------------------------------------------------------

def held_out(listing_id: str, seed: int, fraction: float) -> bool:
    """Whether a listing is held out of training: a stable hash of (seed, listing id), so the split does
    not depend on row order or catalog size, and anyone can recompute it."""
    digest = hashlib.sha256(f"{seed}:{listing_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64 < fraction


def prepare_catalog(catalog_uri: str, holdout_fraction: float, seed: int, check_images: bool,
                    catalog, train_set, eval_set, report=None) -> dict[str, Any]:
    """Validate the catalog (every bad row, with its line) and split it: `catalog` holds every row,
    `train_set` and `eval_set` the rows trained on and held out. Image locations are made absolute so
    the files can be read from any step."""
    from storage.s3 import connect
    from training.catalog import Catalog, CatalogError, CatalogRow, validate_catalog, write_catalog

    if not catalog_uri:
        raise StepError("no catalog given: set the catalog_uri parameter to an s3:// URI of a catalog.jsonl "
                        "(`lookalike catalog import` writes one)")
    if not 0.0 <= holdout_fraction < 1.0:
        raise StepError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    if catalog_uri.startswith("s3://"):
        connect()  # an unreachable store or wrong keys fail here, with the store's own advice
    try:
        checked = validate_catalog(catalog_uri, check_images=check_images)
    except CatalogError as exc:
        raise StepError(str(exc)) from None
    if not checked.ok:
        raise StepError(f"catalog {catalog_uri} cannot be used:\n{checked.summary(max_problems=20)}\n"
                        f"Fix or drop the rows listed and run again (`lookalike catalog validate` shows them all)")
    source = Catalog.open(catalog_uri)
    rows = [CatalogRow(r.listing_id, source.resolve_image(r), r.labels, r.source, r.title, r.line)
            for r in source.rows]
    held = [r for r in rows if held_out(r.listing_id, seed, holdout_fraction)]
    held_ids = {r.listing_id for r in held}
    trained = [r for r in rows if r.listing_id not in held_ids]
    if holdout_fraction > 0 and not held:
        raise StepError(f"holdout_fraction {holdout_fraction} of {len(rows)} rows holds out nothing: "
                        f"raise it or import a larger catalog")
    for artifact, part in ((catalog, rows), (train_set, trained), (eval_set, held)):
        write_catalog(part, artifact.path)
        artifact.metadata.update({"rows": len(part), "source": catalog_uri})
    tasks = {task: len(labels) for task, labels in Catalog.from_rows(rows).tasks().items()}
    summary = {"catalog": catalog_uri, "rows": len(rows), "train_rows": len(trained), "eval_rows": len(held),
               "tasks": tasks}
    if report is not None:
        lines = [f"# Catalog {catalog_uri}", "", f"- rows: {len(rows)} (trained on {len(trained)}, "
                 f"held out {len(held)})", "", "| task | classes | labelled rows |", "| --- | --- | --- |"]
        for task, counts in sorted(checked.label_counts.items()):
            lines.append(f"| {task} | {len(counts)} | {sum(counts.values())} |")
        Path(report.path).write_text("\n".join(lines) + "\n")
    print(f"catalog {catalog_uri}: {len(rows)} rows, {len(trained)} to train on, {len(held)} held out; "
          f"tasks {tasks}", flush=True)
    return summary


def _open_catalog(path: str):
    from training.catalog import Catalog

    return Catalog.open(path, strict=False)


def _check_device(device: str) -> str:
    """`auto`, `cpu` or `cuda`; asking for CUDA on a machine without it fails with what to do."""
    if device not in ("auto", "cpu", "cuda"):
        raise StepError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise StepError("device=cuda was asked for but this machine has no CUDA GPU: on Kubernetes make "
                            "sure the task landed on the GPU node pool (gpu_node_selector / gpu_toleration), "
                            "locally use device=auto or cpu")
    return device


# ---- model ----------------------------------------------------------------------------------------

def _model_meta(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "model.json"
    if not path.is_file():
        raise StepError(f"{model_dir} holds no model.json: the model step upstream did not export a model")
    return json.loads(path.read_text())


def read_metrics(artifact) -> dict[str, Any]:
    """The metrics a step logged: the JSON it wrote at the artifact's path, else the artifact's metadata."""
    path = Path(artifact.path)
    if path.is_file() and path.stat().st_size:
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass
    return {k: v for k, v in dict(artifact.metadata).items() if k != "display_name"}


def write_metrics(artifact, values: dict[str, Any]) -> None:
    """Log scalar metrics (shown by the KFP UI) and keep them all as JSON at the artifact's path."""
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            artifact.log_metric(key, float(value))
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(json.dumps(values, indent=2, sort_keys=True))


def publish_model(model, alias: str, evaluation=None, report=None) -> str:
    """Publish the model folder under the version it was given at training, with its held-out
    evaluation in model.json and the HTML report beside it; point `alias` at it.

    The folder is copied first: an input artifact is never edited in place. Publishing a version that
    is already complete (a cached re-run) only moves the alias.
    """
    from storage.artifacts import model_repo
    from storage.s3 import connect
    from training.export import publish_model as publish

    store = connect()
    meta = _model_meta(model.path)
    version = meta.get("model_version")
    if not version:
        raise StepError(f"{model.path}/model.json has no model_version: train it with this pipeline's train step")
    repo = model_repo(store)
    if version in repo.versions():
        if alias:
            repo.set_alias(alias, version)
        print(f"model {version} was already published; {alias or 'no alias'} → {version}", flush=True)
        return version
    with tempfile.TemporaryDirectory(prefix="publish-model-") as tmp:
        staged = Path(tmp) / "model"
        shutil.copytree(model.path, staged, ignore=shutil.ignore_patterns("MANIFEST.json"))
        if evaluation is not None:
            meta = _model_meta(staged)
            meta.setdefault("metrics", {})["evaluation"] = read_metrics(evaluation)
            (staged / "model.json").write_text(json.dumps(meta, indent=2))
        if report is not None and Path(report.path).is_file():
            shutil.copyfile(report.path, staged / "report.html")
        publish(store, staged, alias=alias or None, version=version)
    print(f"published model {version} to {store.uri('models/' + version)}"
          f"{f'; {alias} → {version}' if alias else ''}", flush=True)
    return version


def fetch_model(model_ref: str, model) -> str:
    """Download a published model (version, alias or latest) into the artifact folder, verified."""
    from storage.artifacts import VersionNotFound, model_repo
    from storage.s3 import connect

    repo = model_repo(connect())
    try:
        version = repo.resolve(model_ref or "production")
    except VersionNotFound as exc:
        raise StepError(f"{exc}. Run the train pipeline first (or pass model_ref=<version>)") from None
    target = Path(model.path)
    if target.exists():
        shutil.rmtree(target)
    repo.fetch(version, target)
    model.metadata.update({"model_version": version})
    print(f"fetched model {version} ({model_ref})", flush=True)
    return version


# ---- embedding ------------------------------------------------------------------------------------

def _load_embedder(model_dir: str | Path, device: str):
    from predictor.embedder import Embedder

    device = _check_device(device)
    backend = {"auto": "auto", "cpu": "onnxruntime", "cuda": "torch"}[device]
    return Embedder.load(model_dir, backend=backend)


def _image_cache_dir() -> Path:
    from storage.artifacts import default_cache_dir

    return default_cache_dir() / "images"


def embed_images(embedder, catalog, rows, batch_size: int = 32, desc: str = "embed"):
    """Embed catalog rows through the serving preprocessing: (embeddings [N,D], {task: probs [N,C]})."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from tqdm import tqdm

    from transformer.preprocessing import PreprocessSpec, preprocess

    spec = PreprocessSpec.from_dict(embedder.meta["preprocessing"])
    chunks, probs = [], {t: [] for t in embedder.tasks}

    def load(row):
        return preprocess(catalog.load_image(row), spec)

    batch_size = max(1, int(batch_size))
    with ThreadPoolExecutor(4) as pool, tqdm(total=len(rows), desc=desc, unit="img",
                                             disable=not _progress(), file=sys.stdout) as bar:
        for start in range(0, len(rows), batch_size):
            batch = np.stack(list(pool.map(load, rows[start:start + batch_size])))
            emb, p = embedder.embed(batch)
            chunks.append(emb)
            for task in embedder.tasks:
                probs[task].append(p[task])
            bar.update(len(batch))
    dim = embedder.embedding_dim
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    return embeddings, {t: (np.concatenate(v) if v else np.zeros((0, len(embedder.heads[t])), np.float32))
                        for t, v in probs.items()}


def embed_catalog(model, catalog, batch_size: int, device: str, embeddings) -> dict[str, Any]:
    """Every catalog row → its embedding, saved with listing ids and labels (the index's input)."""
    import numpy as np

    embedder = _load_embedder(model.path, device)
    cat = _open_catalog(catalog.path)
    cat.prefetch(_image_cache_dir(), progress=_progress())
    vectors, _ = embed_images(embedder, cat, cat.rows, batch_size, desc="embed catalog")
    out = Path(embeddings.path)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "embeddings.npy", vectors.astype(np.float32))
    (out / "listings.jsonl").write_text("".join(json.dumps({"listing_id": r.listing_id, "labels": r.labels}) + "\n"
                                                for r in cat.rows))
    info = {"model_version": embedder.model_version, "count": int(len(vectors)), "dim": int(vectors.shape[1]),
            "backend": embedder.backend}
    (out / "embeddings.json").write_text(json.dumps(info, indent=2))
    embeddings.metadata.update(info)
    print(f"embedded {len(vectors)} images with model {embedder.model_version} ({embedder.backend})", flush=True)
    return info


def load_embeddings(path: str | Path):
    """(vectors [N,D] float32, listing ids, labels per row, info) from an embed step's folder."""
    import numpy as np

    path = Path(path)
    vectors = np.load(path / "embeddings.npy")
    rows = [json.loads(line) for line in (path / "listings.jsonl").read_text().splitlines() if line.strip()]
    info = json.loads((path / "embeddings.json").read_text())
    return vectors, [r["listing_id"] for r in rows], [r["labels"] for r in rows], info
