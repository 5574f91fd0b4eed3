"""The evaluation report: one self-contained HTML page (the KFP UI shows it, the published model keeps it
as report.html) with the metrics beside the baseline's, the plots, and a confusion matrix per head."""
from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path


def write_html_report(path: Path, model_dir: str | Path, flat: dict[str, float], nested: dict,
                      matrices: dict[str, tuple[list[str], list[list[int]]]]) -> None:
    """Write the page for the model folder `model_dir`, its flat and nested evaluation and its matrices."""
    from lookalike.training.phone_photos import SIMULATED_NOTE
    from lookalike.training.report import write_report
    from lookalike.core.model_card import ModelCard

    card = ModelCard.read(model_dir)
    with tempfile.TemporaryDirectory(prefix="report-") as tmp:
        write_report(tmp, [], {"eval": nested})
        figures = [_figure(p, p.stem) for p in sorted(Path(tmp, "plots").glob("*.png"))]
    loss = card.folder / "plots" / "loss.png"
    if loss.is_file():
        figures.insert(0, _figure(loss, "training loss"))
    pairs = sorted(k for k in flat if not k.startswith("baseline_"))
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{flat[k]:.4f}</td>"
                   f"<td>{(f'{flat[b]:.4f}' if (b := 'baseline_' + k) in flat else '')}</td></tr>" for k in pairs)
    tables = [_confusion_table(task, labels, matrix) for task, (labels, matrix) in matrices.items()]
    version = html.escape(card.model_version)
    page = (f"<!doctype html><meta charset='utf-8'><title>Evaluation of {version}</title>"
            f"<style>body{{font-family:sans-serif}}td,th{{padding:3px 8px;border:1px solid #ddd}}"
            f"table{{border-collapse:collapse}}img{{max-width:560px}}figure{{display:inline-block}}</style>"
            f"<h1>Evaluation of model {version}</h1>"
            f"<p>{html.escape(card.architecture)}, input {card.preprocessing.size} px, "
            f"heads {html.escape(', '.join(card.tasks))}. Held-out listings only; the baseline is the "
            f"ImageNet-pretrained backbone without fine-tuning, measured in the same run.</p>"
            f"<p><i>Phone-photo metrics: {html.escape(SIMULATED_NOTE)}</i></p>"
            f"<table><tr><th>metric</th><th>fine-tuned</th><th>baseline</th></tr>{rows}</table>{''.join(figures)}"
            f"<h2>Confusion matrices (held-out rows)</h2>{''.join(tables)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)


def _figure(png: Path, caption: str) -> str:
    data = base64.b64encode(png.read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def _confusion_table(task: str, labels: list[str], matrix: list[list[int]]) -> str:
    head = "".join(f"<th>{html.escape(str(label))}</th>" for label in labels)
    body = "".join(f"<tr><th>{html.escape(str(labels[i]))}</th>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>"
                   for i, row in enumerate(matrix))
    return (f"<h3>{html.escape(task)}</h3><table class='cm'><tr><th>true \\ predicted</th>{head}</tr>"
            f"{body}</table>")
