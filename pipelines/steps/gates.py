"""The gates: a new model or index passes every bar, or the step raises `GateFailed` naming each failed
bar and what to do. A gate publishes nothing; the publish steps run only after it passes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lookalike.pipelines.steps.evaluation import measure_model
from lookalike.pipelines.steps.model import read_card
from lookalike.pipelines.steps.runner import GateFailed, StepError, read_metrics

Check = tuple[str, float, str, float, bool]  # (gate, measured, rule, bound, passed)
# The fewest simulated photos a recall gate is judged on: at 30, one photo moves recall by 0.033, and a
# true recall of 0.5 reads between 0.32 and 0.68 (95%); below it the gate says so and does not judge.
MIN_GATE_SAMPLE = 30


def _gate_table(checks: list[Check]) -> str:
    lines = ["| gate | measured | rule | passed |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {value:.4f} | {op} {bound:.4f} | {'yes' if ok else '**no**'} |"
              for name, value, op, bound, ok in checks]
    return "\n".join(lines)


def _failures(checks: list[Check]) -> str:
    return "; ".join(f"{n} {v:.4f} is not {op} {b:.4f}" for n, v, op, b, ok in checks if not ok)


def _verdict(title: str, checks: list[Check], verdict) -> bool:
    """Print (and write to the verdict artifact) the table of checks; whether every check passed."""
    passed = all(c[4] for c in checks)
    text = f"# {title}: {'passed' if passed else 'FAILED'}\n\n{_gate_table(checks)}\n"
    if verdict is not None:
        Path(verdict.path).write_text(text)
    print(text, flush=True)
    return passed


def pretrained_checks(flat: dict[str, float], margin: float) -> list[Check]:
    """The model against the ImageNet-pretrained model measured on the same queries (the evaluation's
    baseline_* figures): every same-listing recall@10 and every label's precision@10 at least the
    pretrained one's minus `margin`."""
    checks: list[Check] = []
    keys = sorted(k for k in flat if not k.startswith("baseline_") and f"baseline_{k}" in flat
                  and (k.endswith("_recall@10") or k.startswith("p@10_")))
    for key in keys:
        bound = flat[f"baseline_{key}"] - margin
        checks.append((f"{key} vs pretrained ({flat[f'baseline_{key}']:.4f})", flat[key], ">=", bound,
                       flat[key] >= bound))
    return checks


def check_model_gates(model, metrics, eval_set, catalog, min_recall_at_10: float, min_head_accuracy: float,
                      max_regression: float, compare_to: str, phone_queries: int, seed: int,
                      verdict=None, pretrained_margin: float = 0.0) -> dict[str, Any]:
    """Pass, or raise GateFailed saying which gate failed and what to do. Nothing is published here.

    The model must beat the ImageNet-pretrained model (measured by the evaluation on the same queries)
    on same-listing recall@10 and on every label's precision@10, within `pretrained_margin`. The
    comparison with `compare_to` (production) measures that model on the same held-out listings and the
    same simulated photos, so the two numbers are comparable.
    """
    from lookalike.core.artifacts import VersionNotFound, model_repo
    from lookalike.core.s3 import connect

    flat = read_metrics(metrics)
    checks: list[Check] = []
    if "phone_recall@10" not in flat:
        raise StepError("the evaluation has no phone_recall@10: the evaluation set produced no phone queries; "
                        "raise holdout_fraction or phone_queries")
    checks.append(("phone_recall@10", flat["phone_recall@10"], ">=", min_recall_at_10,
                   flat["phone_recall@10"] >= min_recall_at_10))
    heads = {k.removeprefix("accuracy_"): v for k, v in flat.items() if k.startswith("accuracy_")}
    for task, value in sorted(heads.items()):
        checks.append((f"accuracy_{task}", value, ">=", min_head_accuracy, value >= min_head_accuracy))
    if pretrained_margin < 1.0:
        checks += pretrained_checks(flat, pretrained_margin)
    compared = None
    if compare_to:
        repo = model_repo(connect())
        try:
            current = repo.resolve(compare_to)
        except VersionNotFound:
            current = None
            print(f"no model is {compare_to!r} yet: the comparison gate is skipped", flush=True)
        if current and current != read_card(model).model_version:
            old, _ = measure_model(repo.fetch(current), eval_set.path, catalog.path, phone_queries=phone_queries,
                                   seed=seed)
            compared = current
            for key in ["phone_recall@10", *[f"accuracy_{t}" for t in heads]]:
                if key in old and key in flat:
                    bound = old[key] - max_regression
                    checks.append((f"{key} vs {compare_to} {current} ({old[key]:.4f})", flat[key], ">=", bound,
                                   flat[key] >= bound))
    if not _verdict("Model gates", checks, verdict):
        production = None
        if compare_to:
            try:
                production = model_repo(connect()).resolve(compare_to)
            except VersionNotFound:
                production = None
        where = f"{compare_to} still points at {production}" if production else "no alias was moved"
        lost = any(" vs pretrained " in c[0] and not c[4] for c in checks)
        hint = ("; a model that loses to the pretrained one forgot what ImageNet knew: train at the catalog's "
                "own settings (leave image_size and steps at 0), with fewer trainable_blocks or a lower "
                "learning_rate, or relax the comparison with --param pretrained_margin=..." if lost else "")
        raise GateFailed(
            f"the new model did not pass: {_failures(checks)}. Nothing was published and {where}. To go on: "
            f"train longer or on more rows (steps, epochs), or, if the bar itself is wrong, lower it "
            f"(--param min_recall_at_10=..., min_head_accuracy=..., max_regression=...){hint}")
    return {"passed": True, "compared_with": compared, "checks": len(checks)}


def check_index_gates(build_metrics, search_metrics, min_index_recall: float, min_recall_at_10: float,
                      verdict=None) -> dict[str, Any]:
    """Pass, or raise GateFailed: the IVF index must find what exact search finds, and phone photos
    must find their listing through it."""
    built, searched = read_metrics(build_metrics), read_metrics(search_metrics)
    index_recall, phone_recall = built.get("index_recall@10", 0.0), searched.get("phone_recall@10", 0.0)
    checks: list[Check] = [
        ("index_recall@10 (IVF vs exact)", index_recall, ">=", min_index_recall, index_recall >= min_index_recall)]
    sample = int(searched.get("phone_queries", MIN_GATE_SAMPLE))
    if sample >= MIN_GATE_SAMPLE:
        checks.append(("phone_recall@10 through the index", phone_recall, ">=", min_recall_at_10,
                       phone_recall >= min_recall_at_10))
    else:  # an update of a few listings: a recall over a handful of photos is a coin toss, not a measurement
        print(f"phone_recall@10 {phone_recall:.3f} over {sample} simulated photos is too small a sample to judge "
              f"(fewer than {MIN_GATE_SAMPLE}): not gated", flush=True)
    if not _verdict("Index gates", checks, verdict):
        raise GateFailed(
            f"the new index did not pass: {_failures(checks)}. Nothing was published; the production index is "
            f"unchanged. To go on: rebuild with more lists searched (a higher target via min_index_recall tunes "
            f"nprobe up) or an exact index (index_factory=Flat), or lower the gate if the bar is wrong")
    return {"passed": True}
