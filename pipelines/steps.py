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
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

STEP_FAILED = "lookalike-step-failed:"  # the marker line a failed step prints (read by pipelines.local)

# KFP's executor logs at INFO; FAISS's loader would then list every CPU-specific build it did not find.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)


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
                    catalog, train_set, eval_set, report=None, for_training: bool = True) -> dict[str, Any]:
    """Validate the catalog (every bad row, with its line) and split it: `catalog` holds every row,
    `train_set` and `eval_set` the rows trained on and held out. Image locations are made absolute so
    the files can be read from any step. A catalog that is only indexed (`for_training=False`) may
    have a label with a single class."""
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
    if not for_training:
        checked.problems = [p for p in checked.problems if not (p.line == 0 and "single class" in p.message)]
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


# ---- training and evaluation ----------------------------------------------------------------------

def train_model(train_set, architecture: str, image_size: int, embedding_dim: int,
                trainable_blocks: int, steps: int, samples_per_task: int, learning_rate: float,
                train_options: dict, seed: int, device: str, model, metrics) -> dict[str, Any]:
    """Fine-tune on the training rows and export the model folder, named with its future version.

    The version is chosen here (not at publish time) so the index built from this folder records the
    model version it belongs to before either is published.
    """
    from dataclasses import fields

    from storage.artifacts import new_version
    from training.train import TrainConfig, train

    _check_device(device)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(train_options) - known)
    if unknown:
        raise StepError(f"train_options has unknown settings {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    settings = {"architecture": architecture, "image_size": int(image_size), "embedding_dim": int(embedding_dim),
                "trainable_blocks": int(trainable_blocks), "steps": int(steps),
                "samples_per_task": int(samples_per_task), "lr": float(learning_rate), "device": device,
                **train_options}
    try:
        config = TrainConfig(**settings)
    except (TypeError, ValueError) as exc:
        raise StepError(f"bad training settings: {exc}") from None
    catalog = _open_catalog(train_set.path)
    if not catalog.rows:
        raise StepError("the training set is empty: the catalog has too few rows for holdout_fraction")
    out = Path(model.path)
    result = train(catalog, config, out_dir=out, progress=_progress(), seed=seed,
                   lineage={"catalog": train_set.metadata.get("source", catalog.uri)})
    meta = _model_meta(out)
    meta["model_version"] = new_version()
    (out / "model.json").write_text(json.dumps(meta, indent=2))
    model.metadata.update({"model_version": meta["model_version"], "architecture": architecture,
                           "image_size": int(image_size), "heads": list(meta["heads"])})
    train_stats = result.metrics.get("train", {})
    write_metrics(metrics, {"steps": train_stats.get("steps", steps),
                            "images_per_second": train_stats.get("images_per_second", result.images_per_second),
                            **{f"final_loss_{k}": v for k, v in train_stats.get("final_loss", {}).items()}})
    for warning in result.warnings:
        print(f"warning: {warning}", flush=True)
    print(f"trained model {meta['model_version']}: heads {list(meta['heads'])}, "
          f"{result.images_per_second:.0f} images/s", flush=True)
    return meta


def _pretrained_baseline(model):
    """The ImageNet-pretrained backbone of the model's architecture, untouched by fine-tuning."""
    from training.evaluate import pretrained_backbone_copy
    from training.model import create_model

    return pretrained_backbone_copy(create_model(model.config.replace(pretrained="package")))


def measure_model(model_dir: str | Path, eval_path: str | Path, catalog_path: str | Path, *, phone_queries: int,
                  seed: int, gallery_limit: int = 20000, label_queries: int = 2000) -> tuple[dict, dict]:
    """Evaluate a model folder on held-out rows beside the ImageNet baseline, in one call.

    Gallery: the whole catalog (a seeded subset when larger than `gallery_limit`, always keeping the
    photographed listings). Label queries: held-out rows (their own row excluded from the search).
    Phone queries: simulated phone photos of held-out listings, whose match is the listing itself.
    Returns (flat metrics for KFP and the gates, the nested evaluation).
    """
    import numpy as np
    import torch

    from training.data import ImageBank
    from training.evaluate import evaluate
    from training.export import load_model
    from training.phone_photos import make_phone_queries

    model, meta = load_model(model_dir)
    spec = model.config.preprocessing
    held = _open_catalog(str(eval_path))
    if not held.rows:
        raise StepError("the evaluation set is empty: raise holdout_fraction so some listings are held out")
    full = _open_catalog(str(catalog_path))
    rng = np.random.default_rng([seed, 99])
    phone = make_phone_queries(held, phone_queries, seed)
    keep = {lid for lid, _ in phone}
    rows = full.rows
    if len(rows) > gallery_limit:
        others = [r for r in rows if r.listing_id not in keep]
        picks = rng.choice(len(others), size=max(0, gallery_limit - len(keep)), replace=False)
        rows = [r for r in rows if r.listing_id in keep] + [others[int(i)] for i in sorted(picks)]
    cache = str(_image_cache_dir())
    gallery = ImageBank.load(full.subset(rows), max_side=max(2 * spec.size, 64), progress=_progress(),
                             cache_dir=cache)
    q_rows = held.rows if len(held.rows) <= label_queries else \
        [held.rows[int(i)] for i in sorted(rng.choice(len(held.rows), label_queries, replace=False))]
    queries = ImageBank.load(held.subset(q_rows), max_side=max(2 * spec.size, 64), progress=_progress(),
                             cache_dir=cache)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = evaluate(model.to(device), _pretrained_baseline(model).to(device),
                      catalog_images=gallery.images, catalog_ids=[r.listing_id for r in gallery.rows],
                      catalog_labels=[r.labels for r in gallery.rows], query_images=queries.images,
                      query_ids=[r.listing_id for r in queries.rows], query_labels=[r.labels for r in queries.rows],
                      phone_queries=phone, device=device, progress=_progress())
    result["gallery"] = len(gallery)
    return flatten_evaluation(result), result


def flatten_evaluation(result: dict) -> dict[str, float]:
    """The nested evaluation as flat scalar metrics: phone_recall@10, baseline_phone_recall@10,
    accuracy_<task>, p@10_<task>, baseline_p@10_<task>, ..."""
    flat: dict[str, float] = {}
    phone = result.get("phone") or {}
    for who, prefix in (("finetuned", ""), ("baseline", "baseline_")):
        for key, value in (phone.get(who) or {}).items():
            flat[f"{prefix}phone_{key}"] = float(value)
    if phone:
        flat["phone_queries"] = float(phone.get("queries", 0))
    for task, m in (result.get("heads") or {}).items():
        flat[f"accuracy_{task}"] = float(m["accuracy"])
    for task, m in (result.get("retrieval") or {}).items():
        for who, prefix in (("finetuned", ""), ("baseline", "baseline_")):
            for key, value in (m.get(who) or {}).items():
                flat[f"{prefix}{key}_{task}"] = float(value)
    if "gallery" in result:
        flat["gallery"] = float(result["gallery"])
    return flat


def evaluate_model(model, eval_set, catalog, phone_queries: int, seed: int, metrics, report,
                   confusion: dict | None = None) -> dict[str, float]:
    """Scalar metrics, a confusion matrix per head (from the served ONNX graph) and the HTML report."""
    from training.phone_photos import SIMULATED_NOTE

    flat, nested = measure_model(model.path, eval_set.path, catalog.path, phone_queries=phone_queries, seed=seed)
    write_metrics(metrics, flat)
    matrices = _confusion_matrices(model.path, eval_set.path)
    for task, artifact in (confusion or {}).items():
        if task in matrices:
            labels, matrix = matrices[task]
            artifact.log_confusion_matrix(labels, matrix)
        else:
            artifact.metadata["note"] = f"the model has no {task!r} head"
    _write_html_report(Path(report.path), model.path, flat, nested, matrices)
    print(f"evaluation ({SIMULATED_NOTE.split(':')[0]} for phone recall): "
          + ", ".join(f"{k} {v:.3f}" for k, v in sorted(flat.items())
                      if k.startswith(("phone_recall", "baseline_phone_recall", "accuracy_"))), flush=True)
    return flat


def _confusion_matrices(model_dir: str | Path, eval_path: str | Path) -> dict[str, tuple[list[str], list[list[int]]]]:
    """Per head: (labels, confusion matrix rows=true, cols=predicted) on the held-out rows, computed
    through the serving path (ONNX graph and the transformer's preprocessing)."""
    import numpy as np

    embedder = _load_embedder(model_dir, "auto")
    held = _open_catalog(str(eval_path))
    rows = held.rows[:2000]
    _, probs = embed_images(embedder, held, rows, 32, desc="heads on held-out rows")
    out = {}
    for task, labels in embedder.heads.items():
        index = {label: i for i, label in enumerate(labels)}
        matrix = np.zeros((len(labels), len(labels)), dtype=int)
        predicted = probs[task].argmax(axis=1) if len(rows) else []
        for row, guess in zip(rows, predicted):
            truth = row.labels.get(task)
            if truth in index:
                matrix[index[truth], int(guess)] += 1
        out[task] = (list(labels), matrix.tolist())
    return out


def _write_html_report(path: Path, model_dir: str | Path, flat: dict[str, float], nested: dict,
                       matrices: dict) -> None:
    """One self-contained page: the metrics beside the baseline, plots, and the confusion matrices."""
    import base64

    from training.phone_photos import SIMULATED_NOTE
    from training.report import write_report

    with tempfile.TemporaryDirectory(prefix="report-") as tmp:
        write_report(tmp, [], {"eval": nested})
        plots = sorted(Path(tmp, "plots").glob("*.png"))
        images = "".join(f'<figure><img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
                         f"<figcaption>{html.escape(p.stem)}</figcaption></figure>" for p in plots)
    loss = Path(model_dir) / "plots" / "loss.png"
    if loss.is_file():
        images = (f'<figure><img src="data:image/png;base64,{base64.b64encode(loss.read_bytes()).decode()}">'
                  f"<figcaption>training loss</figcaption></figure>") + images
    meta = _model_meta(model_dir)
    pairs = sorted(k for k in flat if not k.startswith("baseline_"))
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{flat[k]:.4f}</td>"
                   f"<td>{(f'{flat[b]:.4f}' if (b := 'baseline_' + k) in flat else '')}</td></tr>" for k in pairs)
    tables = []
    for task, (labels, matrix) in matrices.items():
        head = "".join(f"<th>{html.escape(str(l))}</th>" for l in labels)
        body = "".join(f"<tr><th>{html.escape(str(labels[i]))}</th>" + "".join(f"<td>{v}</td>" for v in r) + "</tr>"
                       for i, r in enumerate(matrix))
        tables.append(f"<h3>{html.escape(task)}</h3><table class='cm'><tr><th>true \\ predicted</th>{head}</tr>"
                      f"{body}</table>")
    page = (f"<!doctype html><meta charset='utf-8'><title>Evaluation of {html.escape(str(meta.get('model_version')))}"
            f"</title><style>body{{font-family:sans-serif}}td,th{{padding:3px 8px;border:1px solid #ddd}}"
            f"table{{border-collapse:collapse}}img{{max-width:560px}}figure{{display:inline-block}}</style>"
            f"<h1>Evaluation of model {html.escape(str(meta.get('model_version')))}</h1>"
            f"<p>{html.escape(meta.get('architecture', ''))}, input {meta['preprocessing']['size']} px, "
            f"heads {html.escape(', '.join(meta['heads']))}. Held-out listings only; the baseline is the "
            f"ImageNet-pretrained backbone without fine-tuning, measured in the same run.</p>"
            f"<p><i>Phone-photo metrics: {html.escape(SIMULATED_NOTE)}</i></p>"
            f"<table><tr><th>metric</th><th>fine-tuned</th><th>baseline</th></tr>{rows}</table>{images}"
            f"<h2>Confusion matrices (held-out rows)</h2>{''.join(tables)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)


# ---- gates ----------------------------------------------------------------------------------------

def _gate_table(checks: list[tuple[str, float, str, float, bool]]) -> str:
    lines = ["| gate | measured | rule | passed |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {value:.4f} | {op} {bound:.4f} | {'yes' if ok else '**no**'} |"
              for name, value, op, bound, ok in checks]
    return "\n".join(lines)


def check_model_gates(model, metrics, eval_set, catalog, min_recall_at_10: float, min_head_accuracy: float,
                      max_regression: float, compare_to: str, phone_queries: int, seed: int,
                      verdict=None) -> dict[str, Any]:
    """Pass, or raise GateFailed saying which gate failed and what to do. Nothing is published here.

    The comparison with `compare_to` (production) measures that model on the same held-out listings
    and the same simulated photos, so the two numbers are comparable.
    """
    from storage.artifacts import VersionNotFound, model_repo
    from storage.s3 import connect

    flat = read_metrics(metrics)
    checks: list[tuple[str, float, str, float, bool]] = []
    if "phone_recall@10" not in flat:
        raise StepError("the evaluation has no phone_recall@10: the evaluation set produced no phone queries; "
                        "raise holdout_fraction or phone_queries")
    checks.append(("phone_recall@10", flat["phone_recall@10"], ">=", min_recall_at_10,
                   flat["phone_recall@10"] >= min_recall_at_10))
    heads = {k.removeprefix("accuracy_"): v for k, v in flat.items() if k.startswith("accuracy_")}
    for task, value in sorted(heads.items()):
        checks.append((f"accuracy_{task}", value, ">=", min_head_accuracy, value >= min_head_accuracy))
    compared = None
    if compare_to:
        store = connect()
        repo = model_repo(store)
        try:
            current = repo.resolve(compare_to)
        except VersionNotFound:
            current = None
            print(f"no model is {compare_to!r} yet: the comparison gate is skipped", flush=True)
        new_version = _model_meta(model.path).get("model_version")
        if current and current != new_version:
            folder = repo.fetch(current)
            old, _ = measure_model(folder, eval_set.path, catalog.path, phone_queries=phone_queries, seed=seed)
            compared = current
            for key in ["phone_recall@10", *[f"accuracy_{t}" for t in heads]]:
                if key in old and key in flat:
                    bound = old[key] - max_regression
                    checks.append((f"{key} vs {compare_to} {current} ({old[key]:.4f})", flat[key], ">=", bound,
                                   flat[key] >= bound))
    failed = [c for c in checks if not c[4]]
    table = _gate_table(checks)
    text = f"# Model gates: {'FAILED' if failed else 'passed'}\n\n{table}\n"
    if verdict is not None:
        Path(verdict.path).write_text(text)
    print(text, flush=True)
    if failed:
        try:
            production = model_repo(connect()).resolve(compare_to or "production")
        except VersionNotFound:
            production = None
        where = f"{compare_to or 'production'} still points at {production}" if production else \
            "no alias was set"
        raise GateFailed(
            "the new model did not pass: " + "; ".join(f"{n} {v:.4f} is not {op} {b:.4f}" for n, v, op, b, _ in failed)
            + f". Nothing was published and {where}. To go on: train longer or on more rows (steps, "
              f"train_options), or, if the bar itself is wrong, lower it (--param min_recall_at_10=..., "
              f"min_head_accuracy=..., max_regression=...)")
    return {"passed": True, "compared_with": compared, "checks": len(checks)}


def check_index_gates(build_metrics, search_metrics, min_index_recall: float, min_recall_at_10: float,
                      verdict=None) -> dict[str, Any]:
    """Pass, or raise GateFailed: the IVF index must find what exact search finds, and phone photos
    must find their listing through it."""
    built, searched = read_metrics(build_metrics), read_metrics(search_metrics)
    checks = [("index_recall@10 (IVF vs exact)", built.get("index_recall@10", 0.0), ">=", min_index_recall,
               built.get("index_recall@10", 0.0) >= min_index_recall),
              ("phone_recall@10 through the index", searched.get("phone_recall@10", 0.0), ">=", min_recall_at_10,
               searched.get("phone_recall@10", 0.0) >= min_recall_at_10)]
    failed = [c for c in checks if not c[4]]
    text = f"# Index gates: {'FAILED' if failed else 'passed'}\n\n{_gate_table(checks)}\n"
    if verdict is not None:
        Path(verdict.path).write_text(text)
    print(text, flush=True)
    if failed:
        raise GateFailed(
            "the new index did not pass: " + "; ".join(f"{n} {v:.4f} is not {op} {b:.4f}" for n, v, op, b, _ in failed)
            + ". Nothing was published; the production index is unchanged. To go on: rebuild with more lists "
              "searched (a higher target via min_index_recall tunes nprobe up) or an exact index "
              "(index_factory=Flat), or lower the gate if the bar is wrong")
    return {"passed": True}


# ---- index ----------------------------------------------------------------------------------------

def _labels_by_task(labels: list[dict[str, str]]) -> dict[str, list[str | None]]:
    tasks = sorted({t for lab in labels for t in lab})
    return {t: [lab.get(t) for lab in labels] for t in tasks}


def _index_metrics(index) -> dict[str, float]:
    info = index.info
    out = {"count": float(info["count"]), "nlist": float(info.get("nlist") or 0),
           "nprobe": float(info.get("nprobe") or 0), "index_recall@10": float(info.get("recall_at_10") or 0.0),
           "exact": 1.0 if info.get("kind") == "exact" else 0.0}
    if info.get("build_seconds") is not None:
        out["build_seconds"] = float(info["build_seconds"])
    return out


def build_index(embeddings, model, index_factory: str, min_index_recall: float, seed: int, device: str,
                index, metrics) -> dict[str, Any]:
    """Train the IVF centroids, add every vector with its listing id, tune nprobe for recall@10 against
    exact search of at least 0.95 (or the gate's bar, if higher), so the gate has headroom."""
    from predictor.index import VectorIndex

    device = _check_device(device)
    vectors, ids, labels, info = load_embeddings(embeddings.path)
    model_version = _model_meta(model.path).get("model_version")
    if info.get("model_version") != model_version:
        raise StepError(f"the embeddings were made with model {info.get('model_version')}, not {model_version}")
    built = VectorIndex.build(vectors, ids, _labels_by_task(labels), model_version=model_version,
                              factory=index_factory or None, target_recall=min(1.0, max(min_index_recall, 0.95)),
                              seed=seed, use_gpu=None if device == "auto" else device == "cuda",
                              progress=_progress())
    built.save(index.path)
    values = _index_metrics(built)
    write_metrics(metrics, values)
    index.metadata.update({"model_version": model_version, "count": len(ids), "factory": built.info["factory"]})
    print(f"built {built.info['factory']} index of {len(ids)} listings: nprobe {built.info.get('nprobe')}, "
          f"recall@10 vs exact {values['index_recall@10']:.3f}", flush=True)
    return values


def evaluate_index(index, model, queries, phone_queries: int, seed: int, metrics, report=None) -> dict[str, float]:
    """Simulated phone photos of listings in `queries`, through the serving preprocessing and the
    index: recall@1/5/10 of the photographed listing."""
    import numpy as np

    from predictor.index import VectorIndex
    from training.phone_photos import SIMULATED_NOTE, make_phone_queries
    from transformer.preprocessing import PreprocessSpec, preprocess

    embedder = _load_embedder(model.path, "auto")
    built = VectorIndex.load(index.path, model_version=embedder.model_version)
    catalog = _open_catalog(queries.path)
    known = catalog.subset([r for r in catalog.rows if r.listing_id in built])
    if not known.rows:
        raise StepError("none of the query listings are in the index: nothing to evaluate")
    photos = make_phone_queries(known, phone_queries, seed)
    spec = PreprocessSpec.from_dict(embedder.meta["preprocessing"])
    hits = {1: 0, 5: 0, 10: 0}
    k = min(10, built.count)
    for start in range(0, len(photos), 32):
        chunk = photos[start:start + 32]
        vectors, _ = embedder.embed(np.stack([preprocess(img.convert("RGB"), spec) for _, img in chunk]))
        found = built.search(vectors, top_k=k).listing_ids
        for (lid, _), ids in zip(chunk, found):
            for cut in hits:
                hits[cut] += lid in ids[:cut]
    n = max(1, len(photos))
    values = {f"phone_recall@{cut}": hits[cut] / n for cut in hits} | {"phone_queries": float(len(photos)),
                                                                       "count": float(built.count)}
    write_metrics(metrics, values)
    text = (f"# Index search\n\n{len(photos)} simulated phone photos of listings in the index, searched with "
            f"nprobe {built.info.get('nprobe')} over {built.count} listings:\n\n"
            + "\n".join(f"- recall@{cut}: {values[f'phone_recall@{cut}']:.3f}" for cut in hits)
            + f"\n\n_{SIMULATED_NOTE}_\n")
    if report is not None:
        Path(report.path).write_text(text)
    print(f"index search: phone recall@10 {values['phone_recall@10']:.3f} over {len(photos)} simulated photos",
          flush=True)
    return values


def publish_index(index, alias: str) -> str:
    """Publish the index folder as a new version under its model; point `alias` at it."""
    from predictor.index import VectorIndex
    from storage.artifacts import model_repo
    from storage.s3 import connect

    store = connect()
    built = VectorIndex.load(index.path)
    if built.model_version not in model_repo(store).versions():
        raise StepError(f"the index was built with model {built.model_version}, which is not published: publish "
                        f"the model first (the pipelines do)")
    version = built.publish(store, alias=alias or None)
    print(f"published index {version} of model {built.model_version} ({built.count} listings)"
          f"{f'; {alias} → {version}' if alias else ''}", flush=True)
    return version


def _read_ids(uri: str) -> list[str]:
    from storage.s3 import ObjectStore, S3Settings, parse_s3_uri

    if uri.startswith("s3://"):
        bucket, key = parse_s3_uri(uri)
        text = ObjectStore(S3Settings.from_env().with_bucket(bucket)).get_bytes(key).decode()
    else:
        text = Path(uri).read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def update_index(model, embeddings, index_ref: str, delisted_uri: str, index, metrics) -> dict[str, Any]:
    """The published index plus new listings (replacing ones already there) minus delisted ones,
    without retraining the centroids. Reports drift: when a rebuild is due, run the index pipeline."""
    from predictor.index import VectorIndex
    from storage.artifacts import VersionNotFound
    from storage.s3 import connect

    store = connect()
    model_version = _model_meta(model.path).get("model_version")
    vectors, ids, labels, info = load_embeddings(embeddings.path)
    if info.get("model_version") != model_version:
        raise StepError(f"the new listings were embedded with model {info.get('model_version')}, not {model_version}")
    try:
        current = VectorIndex.fetch(store, model_version, index_ref or "production")
    except VersionNotFound as exc:
        raise StepError(f"{exc}. Build one first with the index pipeline") from None
    delisted = _read_ids(delisted_uri) if delisted_uri else []
    gone = [lid for lid in delisted if lid in current]
    removed = current.remove(gone) if gone else 0
    present = [i for i, lid in enumerate(ids) if lid in current]
    fresh = [i for i, lid in enumerate(ids) if lid not in current]
    by_task = _labels_by_task(labels)

    def pick(rows):
        return vectors[rows], [ids[i] for i in rows], {t: [v[i] for i in rows] for t, v in by_task.items()}

    replaced = current.replace(*pick(present)) if present else 0
    added = current.add(*pick(fresh)) if fresh else 0
    drift = current.drift()
    current.save(index.path)
    values = {**_index_metrics(current), "added": float(added), "replaced": float(replaced),
              "removed": float(removed), "rebuild_due": 1.0 if drift["rebuild_due"] else 0.0}
    write_metrics(metrics, values)
    index.metadata.update({"model_version": model_version, "parent_version": current.info.get("index_version"),
                           "drift": drift["why"]})
    print(f"updated index {current.info.get('index_version')}: +{added} new, {replaced} replaced, -{removed} "
          f"delisted ({len(delisted) - len(gone)} delisted ids were not in it); drift: {drift['why']}", flush=True)
    if drift["rebuild_due"]:
        print("a full rebuild is due: run the index pipeline (lookalike pipeline run index) to re-cluster", flush=True)
    return values
