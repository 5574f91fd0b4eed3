"""The evaluate-model step: a model folder measured on held-out listings beside the ImageNet-pretrained
model at its own 224 px (same queries: held-out photos looking for their listing's other photos and for
their labels, simulated phone photos of the EVALUATION recipe looking for their listing), and a
confusion matrix of every head the model has, computed through the serving path."""
from __future__ import annotations

import json
from pathlib import Path

from lookalike.pipelines.steps.prepare import image_cache_dir, open_catalog
from lookalike.pipelines.steps.embed import embed_images, load_embedder
from lookalike.pipelines.steps.report import write_html_report
from lookalike.pipelines.steps.runner import StepError, progress, write_metrics


def _pretrained_baseline(model):
    """The ImageNet-pretrained backbone of the model's architecture, untouched by fine-tuning."""
    from lookalike.training.evaluate import pretrained_backbone_copy
    from lookalike.training.model import create_model

    return pretrained_backbone_copy(create_model(model.config.replace(pretrained="package")))


def measure_model(model_dir: str | Path, eval_path: str | Path, catalog_path: str | Path, *, phone_queries: int,
                  seed: int, gallery_limit: int = 20000, label_queries: int = 2000) -> tuple[dict, dict]:
    """Evaluate a model folder on held-out listings beside the pretrained model, in one call.

    Gallery: the whole catalog (a seeded subset when larger than `gallery_limit`, always keeping the
    held-out listings). Queries: up to `label_queries` photos of held-out listings (each left out of the
    gallery while it searches: it finds its listing through the listing's other photos, and its labels
    among other listings), and `phone_queries` simulated phone photos (evaluation recipe) of held-out
    listings. Returns (flat metrics for KFP and the gates, the nested evaluation).
    """
    import numpy as np
    import torch

    from lookalike.training.data import ImageBank, kept_side
    from lookalike.training.evaluate import evaluate
    from lookalike.training.export import load_model
    from lookalike.training.queries import gallery_of, gallery_rows, phone_queries as make_phone_queries, view_queries

    model, _ = load_model(model_dir)
    held = open_catalog(eval_path)
    if not held.rows:
        raise StepError("the evaluation set is empty: raise holdout_fraction so some listings are held out")
    full = open_catalog(catalog_path)
    cache = str(image_cache_dir())
    bank = ImageBank.load(full, max_side=kept_side(model.config.preprocessing), progress=progress(),
                          cache_dir=cache)
    held_ids = set(held.listings())
    rows = gallery_rows(bank, listings=held_ids, limit=max(gallery_limit, 1), seed=seed)
    held_rows = np.array([r for r in rows if bank.rows[r].listing_id in held_ids], dtype=np.int64)
    if len(held_rows) > label_queries:
        held_rows = np.sort(np.random.default_rng([seed, 99]).choice(held_rows, label_queries, replace=False))
    query_sets = [view_queries(bank, held_rows),
                  make_phone_queries(bank, np.array([r for r in rows if bank.rows[r].listing_id in held_ids]),
                                     phone_queries, seed)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = evaluate(model.to(device), _pretrained_baseline(model).to(device), gallery_of(bank, rows), query_sets,
                      device=device, progress=progress())
    result["gallery_photos"] = int(len(rows))
    return flatten_evaluation(result), result


def flatten_evaluation(result: dict) -> dict[str, float]:
    """The nested evaluation as flat scalar metrics: <set>_recall@k (phone_recall@10, views_recall@10, …),
    accuracy_<task>, p@10_<task>, …, each fine-tuned figure beside its pretrained one (prefix baseline_)."""
    flat: dict[str, float] = {}
    for name, m in (result.get("listing") or {}).items():
        for who, prefix in (("finetuned", ""), ("baseline", "baseline_")):
            for key, value in (m.get(who) or {}).items():
                flat[f"{prefix}{name}_{key}"] = float(value)
        flat[f"{name}_queries"] = float(m.get("queries", 0))
    for task, m in (result.get("heads") or {}).items():
        flat[f"accuracy_{task}"] = float(m["accuracy"])
    for task, m in (result.get("retrieval") or {}).items():
        for who, prefix in (("finetuned", ""), ("baseline", "baseline_")):
            for key, value in (m.get(who) or {}).items():
                flat[f"{prefix}{key}_{task}"] = float(value)
    if "gallery_photos" in result:
        flat["gallery"] = float(result["gallery_photos"])
    return flat


def evaluate_model(model, eval_set, catalog, phone_queries: int, seed: int, metrics, report,
                   confusion_matrices=None) -> list[str]:
    """Scalar metrics, a confusion matrix of every head (from the served ONNX graph) and the HTML report.

    The matrices land as JSON in `confusion_matrices` ({head: {"labels", "matrix"}}); returns the heads,
    which the pipeline turns into one ClassificationMetrics artifact each (`show_confusion_matrix`).
    """
    from lookalike.training.phone_photos import SIMULATED_NOTE

    flat, nested = measure_model(model.path, eval_set.path, catalog.path, phone_queries=phone_queries, seed=seed)
    write_metrics(metrics, flat)
    matrices = confusion_matrices_of(model.path, eval_set.path)
    if confusion_matrices is not None:
        Path(confusion_matrices.path).parent.mkdir(parents=True, exist_ok=True)
        Path(confusion_matrices.path).write_text(json.dumps(
            {task: {"labels": labels, "matrix": matrix} for task, (labels, matrix) in matrices.items()}))
    write_html_report(Path(report.path), model.path, flat, nested, matrices)
    print(f"evaluation ({SIMULATED_NOTE.split(':')[0]} for phone recall): "
          + ", ".join(f"{k} {v:.3f}" for k, v in sorted(flat.items())
                      if k.startswith(("phone_recall", "baseline_phone_recall", "accuracy_"))), flush=True)
    return list(matrices)


def show_confusion_matrix(matrices, head: str, confusion) -> None:
    """Log one head's confusion matrix (from evaluate_model's JSON) on a ClassificationMetrics artifact,
    which the KFP UI draws."""
    found = json.loads(Path(matrices.path).read_text())
    if head not in found:
        raise StepError(f"the evaluation has no confusion matrix of head {head!r}; it has {', '.join(found)}")
    confusion.log_confusion_matrix(found[head]["labels"], found[head]["matrix"])


def confusion_matrices_of(model_dir: str | Path, eval_path: str | Path
                          ) -> dict[str, tuple[list[str], list[list[int]]]]:
    """Per head of the model: (labels, confusion matrix rows=true, cols=predicted) on the held-out rows,
    computed through the serving path (ONNX graph and the transformer's preprocessing)."""
    import numpy as np

    embedder = load_embedder(model_dir, "auto")
    held = open_catalog(eval_path)
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
