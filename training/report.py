"""The training report written into the model folder: report.md and plots/*.png.

Plots: the loss of each task (and the triplet loss) over steps, each head's accuracy, label retrieval
and simulated-phone-photo recall@k of the fine-tuned model beside the pretrained baseline.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from training.evaluate import BASELINE, FINETUNED, summary_lines

_SKIP = {"step", "loss", "images_per_s", "time_s"}
_COLOURS = {FINETUNED: "#1f77b4", BASELINE: "#aaaaaa"}


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
    if ev.get("phone"):
        made.append(("Simulated phone photo recall@k", _recall_plot(ev["phone"], plots / "recall.png")))

    lines = ["# Training report", ""]
    train = metrics.get("train", {})
    if train:
        lines += [f"- steps: {train.get('steps')}, images seen: {train.get('images_seen')}, "
                  f"{train.get('images_per_second')} images/s",
                  f"- final loss (mean of the last 50 steps): " +
                  ", ".join(f"{k} {v:.3f}" for k, v in train.get("final_loss", {}).items())]
    for task, info in metrics.get("tasks", {}).items():
        lines.append(f"- task `{task}`: {info['rows']} rows, {info['classes']} classes")
    for warning in metrics.get("warnings", []):
        lines.append(f"- warning: {warning}")
    if ev:
        lines += ["", "## Evaluation (fine-tuned beside the ImageNet-pretrained backbone, same run)", ""]
        if "catalog_rows" in ev:
            lines.append(f"Catalog searched: a seeded {ev['catalog_rows']}-row subset of the {ev['catalog_of']} "
                         f"training rows; label queries: {ev['query_rows']} of {ev['query_of']} held-out rows.")
            lines.append("")
        if ev.get("retrieval"):
            lines += ["| task | p@1 | p@10 | mAP@10 | baseline p@1 | baseline p@10 | baseline mAP@10 | queries |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            for task, m in ev["retrieval"].items():
                f, b = m[FINETUNED], m[BASELINE]
                lines.append(f"| {task} | {f['p@1']:.3f} | {f['p@10']:.3f} | {f['map@10']:.3f} | {b['p@1']:.3f} | "
                             f"{b['p@10']:.3f} | {b['map@10']:.3f} | {m['queries']} |")
            lines.append("")
        if ev.get("heads"):
            lines += ["| head | accuracy | queries |", "| --- | --- | --- |"]
            lines += [f"| {t} | {m['accuracy']:.3f} | {m['n']} |" for t, m in ev["heads"].items()]
            lines.append("")
        if ev.get("phone"):
            ph = ev["phone"]
            lines += [f"**Simulated** phone photos → catalog, match = the photographed listing "
                      f"({ph['queries']} queries, {ph['catalog']} listings). {ph['note']}.", "",
                      "| | " + " | ".join(ph[FINETUNED]) + " |", "| --- |" + " --- |" * len(ph[FINETUNED]),
                      "| fine-tuned | " + " | ".join(f"{v:.3f}" for v in ph[FINETUNED].values()) + " |",
                      "| baseline | " + " | ".join(f"{v:.3f}" for v in ph[BASELINE].values()) + " |", ""]
        lines += ["```", *summary_lines(ev), "```"]
    if made:
        lines += ["", "## Plots", ""] + [f"![{title}](plots/{path.name})" for title, path in made]
    path = model_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


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

    tasks = list(values)
    series = [s for s in (FINETUNED, BASELINE) if any(s in v for v in values.values())]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(tasks) + 2), 4))
    for i, s in enumerate(series):
        xs = np.arange(len(tasks)) + (i - (len(series) - 1) / 2) * width
        ys = [values[t].get(s, 0.0) for t in tasks]
        bars = ax.bar(xs, ys, width, label=s.replace("finetuned", "fine-tuned").replace(
            "baseline", "ImageNet baseline"), color=_COLOURS[s])
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(np.arange(len(tasks)), tasks)
    ax.set_ylim(0, 1.22)  # head room for the legend above the bars
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel(ylabel)
    ax.legend(loc="upper center", ncol=len(series), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _recall_plot(phone: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    top = max([*phone[FINETUNED].values(), *phone[BASELINE].values(), 0.05])
    for s, label, dy in ((FINETUNED, "fine-tuned", 7), (BASELINE, "ImageNet baseline", -13)):
        ks = [int(k.split("@")[1]) for k in phone[s]]
        ax.plot(ks, list(phone[s].values()), marker="o", label=label, color=_COLOURS[s])
        for k, v in zip(ks, phone[s].values()):
            ax.annotate(f"{v:.3f}", (k, v), textcoords="offset points", xytext=(0, dy), ha="center", fontsize=8)
    ax.set_xticks(ks)
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k (the photographed listing)")
    ax.set_ylim(0, min(1.05, top * 1.3))  # small recalls stay readable
    ax.set_title(f"SIMULATED phone photos → catalog ({phone['queries']} queries)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
