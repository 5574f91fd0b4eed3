"""The training report written into the model folder: report.md and plots/*.png.

Everything is shown beside the ImageNet-pretrained model measured on the same queries in the same run
(at its own 224 px): same-listing recall@k of each query set (held-out views, an evaluation catalog,
simulated phone photos), label precision overall and per class, head accuracy; then how the training
went: the settings chosen from the catalog and why, early stopping, the losses. `comparison_lines`
sets several runs side by side (e.g. the proxy and the triplet objective).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lookalike.training.evaluate import BASELINE, FINETUNED, summary_lines

_SKIP = {"step", "loss", "images_per_s", "time_s", "l2sp"}
_COLOURS = {FINETUNED: "#1f77b4", BASELINE: "#aaaaaa"}
_NAMES = {FINETUNED: "fine-tuned", BASELINE: "ImageNet pretrained"}
PER_CLASS_PLOT_MAX = 16  # tasks with at most this many classes get a per-class bar plot


def write_report(model_dir: str | Path, history: list[dict[str, float]], metrics: dict[str, Any]) -> Path:
    """Write the plots and report.md into `model_dir`; return the report's path."""
    import matplotlib

    matplotlib.use("Agg")
    model_dir = Path(model_dir)
    plots = model_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    made = []
    if history:
        made.append(("Training loss per task", _loss_plot(history, plots / "loss.png")))
    ev = metrics.get("eval", {})
    if ev.get("heads"):
        made.append(("Head accuracy", _bar_plot({t: {FINETUNED: m["accuracy"]} for t, m in ev["heads"].items()},
                                               "accuracy on held-out queries", plots / "accuracy.png")))
    if ev.get("retrieval"):
        made.append(("Label retrieval precision@10", _bar_plot(
            {t: {FINETUNED: m[FINETUNED]["p@10"], BASELINE: m[BASELINE]["p@10"]} for t, m in ev["retrieval"].items()},
            "precision@10 (same label)", plots / "retrieval.png")))
        for task, m in ev["retrieval"].items():
            if 2 <= len(m.get("per_class", {})) <= PER_CLASS_PLOT_MAX:
                made.append((f"Precision@10 per class of {task}", _bar_plot(
                    {c: {FINETUNED: v[FINETUNED], BASELINE: v[BASELINE]} for c, v in m["per_class"].items()},
                    f"{task}: precision@10 per class", plots / f"per_class_{_slug(task)}.png")))
    if ev.get("listing"):
        made.append(("Same-listing recall@10", _bar_plot(
            {name: {FINETUNED: m[FINETUNED]["recall@10"], BASELINE: m[BASELINE]["recall@10"]}
             for name, m in ev["listing"].items()}, "recall@10 (the query's own listing)", plots / "recall.png")))

    lines = ["# Training report", ""]
    if ev:
        lines += evaluation_lines(ev)
    lines += training_lines(metrics)
    if made:
        lines += ["", "## Plots", ""] + [f"![{title}](plots/{path.name})" for title, path in made]
    path = model_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def evaluation_lines(ev: dict[str, Any]) -> list[str]:
    """The evaluation as markdown: fine-tuned beside pretrained, per query set, per task and per class."""
    base = ev.get("baseline", {})
    size = base.get("preprocessing", {}).get("size", 224)
    lines = ["## Evaluation: fine-tuned beside the ImageNet-pretrained model (same queries, same run)", "",
             f"Pretrained: {base.get('what', 'the backbone without fine-tuning')}, at {size} px. "
             f"Gallery: {ev.get('gallery', {}).get('photos', ev.get('catalog_rows', '?'))} photos of "
             f"{ev.get('gallery', {}).get('listings', '?')} listings; a search returns listings ranked by their "
             f"best photo. No query was made by the recipe training augments with.", ""]
    if ev.get("listing"):
        lines += ["### Same listing (the query's own listing among the top k)", "",
                  "| queries | n | recall@1 | recall@10 | pretrained recall@1 | pretrained recall@10 | ratio@10 |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, m in ev["listing"].items():
            f, b = m[FINETUNED], m[BASELINE]
            what = f"{name} (SIMULATED)" if m.get("simulated") else f"{name} (held out)"
            lines.append(f"| {what} | {m['queries']} | {f['recall@1']:.3f} | {f['recall@10']:.3f} | "
                         f"{b['recall@1']:.3f} | {b['recall@10']:.3f} | {_ratio(f['recall@10'], b['recall@10'])} |")
        notes = {m["note"] for m in ev["listing"].values() if m.get("note")}
        lines += [""] + [f"_{note}._" for note in sorted(notes)] + [""]
    if ev.get("retrieval"):
        lines += ["### Labels (top-10 listings with the query's label; the query's own listing left out)", "",
                  "| task | queries | p@1 | p@10 | mAP@10 | pretrained p@1 | pretrained p@10 | pretrained mAP@10 |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for task, m in ev["retrieval"].items():
            f, b = m[FINETUNED], m[BASELINE]
            lines.append(f"| {task} | {m['queries']} | {f['p@1']:.3f} | {f['p@10']:.3f} | {f['map@10']:.3f} | "
                         f"{b['p@1']:.3f} | {b['p@10']:.3f} | {b['map@10']:.3f} |")
        lines.append("")
        for task, m in ev["retrieval"].items():
            rows = m.get("per_class", {})
            if not rows:
                continue
            lines += [f"Precision@10 per class of `{task}`:", "",
                      "| class | queries | fine-tuned | pretrained |", "| --- | --- | --- | --- |"]
            lines += [f"| {c} | {v['queries']} | {v[FINETUNED]:.3f} | {v[BASELINE]:.3f} |" for c, v in rows.items()]
            lines.append("")
    if ev.get("heads"):
        lines += ["| head | accuracy | queries |", "| --- | --- | --- |"]
        lines += [f"| {t} | {m['accuracy']:.3f} | {m['n']} |" for t, m in ev["heads"].items()]
        lines.append("")
    return lines + ["```", *summary_lines(ev), "```", ""]


def training_lines(metrics: dict[str, Any]) -> list[str]:
    lines = ["## Training", ""]
    train = metrics.get("train", {})
    if train:
        lines.append(f"- objective `{train.get('objective')}`: {train.get('steps')} steps of "
                     f"{train.get('planned_steps')} planned, {train.get('images_seen')} views, "
                     f"{train.get('images_per_second')} views/s, {train.get('seconds')} s")
        for setting, choice in (train.get("chosen") or {}).items():
            lines.append(f"- chosen from the catalog: {setting} = {choice['value']} ({choice['why']})")
        stopping = train.get("early_stopping")
        if stopping:
            lines.append(f"- early stopping: best held-out score {stopping['best_score']} at step "
                         f"{stopping['best_step']} (kept)" + (f", stopped at step {stopping['stopped_at']}"
                                                              if stopping.get("stopped_at") else "")
                         + "; scores " + ", ".join(f"{e['step']}: {e['score']}" for e in stopping["evaluations"]))
        if train.get("final_loss"):
            lines.append("- final loss (mean of the last 50 steps): " +
                         ", ".join(f"{k} {v:.3f}" for k, v in train["final_loss"].items()))
    holdout = metrics.get("holdout")
    if holdout:
        lines.append(f"- held out of training: {holdout['select']} photos for early stopping, {holdout['test']} "
                     f"for the evaluation; {holdout['trained_photos']} photos trained on")
    for task, info in metrics.get("tasks", {}).items():
        counts = info.get("class_counts", {})
        smallest = min(counts.items(), key=lambda kv: kv[1]) if counts else None
        lines.append(f"- task `{task}`: {info['listings']} listings, {info['classes']} classes"
                     + (f" (smallest: {smallest[0]}, {smallest[1]} listings)" if smallest else ""))
    for warning in metrics.get("warnings", []):
        lines.append(f"- warning: {warning}")
    return lines


def comparison_lines(runs: dict[str, dict[str, Any]]) -> list[str]:
    """Several runs' evaluations side by side (one column per run, the pretrained model last)."""
    names = list(runs)
    first = runs[names[0]]
    header = "| metric | " + " | ".join(names) + " | pretrained |"
    lines = [header, "| --- |" + " --- |" * (len(names) + 1)]
    for name, m in first.get("listing", {}).items():
        for k in ("recall@1", "recall@10"):
            values = [runs[n].get("listing", {}).get(name, {}).get(FINETUNED, {}).get(k) for n in names]
            lines.append(f"| {name} {k} | " + " | ".join(_fmt(v) for v in values) + f" | {_fmt(m[BASELINE][k])} |")
    for task, m in first.get("retrieval", {}).items():
        values = [runs[n].get("retrieval", {}).get(task, {}).get(FINETUNED, {}).get("p@10") for n in names]
        lines.append(f"| {task} p@10 | " + " | ".join(_fmt(v) for v in values) + f" | {_fmt(m[BASELINE]['p@10'])} |")
    return lines


def _fmt(value) -> str:
    return "" if value is None else f"{value:.3f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window <= 1:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def _loss_plot(history: list[dict[str, float]], path: Path) -> Path:
    import matplotlib.pyplot as plt

    keys = sorted({k for h in history for k in h} - _SKIP)
    fig, ax = plt.subplots(figsize=(7, 4))
    window = max(1, len(history) // 50)
    for key in keys:
        pts = [(h["step"], h[key]) for h in history if key in h]
        steps, values = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
        sm = _smooth(values, window)
        ax.plot(steps[len(steps) - len(sm):], sm, label=key, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (moving mean over {window} steps)")
    ax.set_title("Training loss per task")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bar_plot(values: dict[str, dict[str, float]], ylabel: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    groups = list(values)
    series = [s for s in (FINETUNED, BASELINE) if any(s in v for v in values.values())]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(min(16, max(5, 1.1 * len(groups) + 2)), 4))
    for i, s in enumerate(series):
        xs = np.arange(len(groups)) + (i - (len(series) - 1) / 2) * width
        bars = ax.bar(xs, [values[g].get(s, 0.0) for g in groups], width, label=_NAMES[s], color=_COLOURS[s])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(np.arange(len(groups)), groups, rotation=30 if len(groups) > 6 else 0, ha="right"
                  if len(groups) > 6 else "center")
    ax.set_ylim(0, 1.22)  # head room for the legend above the bars
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel(ylabel)
    ax.legend(loc="upper center", ncol=len(series), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
