"""Export a trained model as a model version folder, reload it, publish it.

    model.safetensors   every weight (backbone, projection, heads); never pickle
    model.onnx          the serving graph: `images` [N,3,H,W] float32 (already preprocessed)
                        → `embedding` [N,D] (L2-normalised) and `probs_<task>` [N,C] (softmax) per head
    model.json          architecture, embedding_dim, preprocessing, heads, metrics, lineage, config

The ONNX graph is checked against PyTorch at export (max abs difference ≤ 1e-4 on every output) and the
export fails rather than write a graph that serves different numbers than were evaluated.
"""
from __future__ import annotations

import json
import logging
import subprocess
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from storage.artifacts import MANIFEST, model_repo, new_version, verify_dir, write_json
from training.model import LookalikeModel, ModelConfig, create_model

log = logging.getLogger(__name__)

FORMAT = 1
WEIGHTS_FILE, ONNX_FILE, META_FILE = "model.safetensors", "model.onnx", "model.json"
ONNX_INPUT = "images"
ONNX_TOLERANCE = 1e-4
ONNX_OPSET = 18


class ExportError(RuntimeError):
    """The export would not serve what was trained (e.g. ONNX disagrees with PyTorch)."""


class ServingGraph(nn.Module):
    """What the predictor runs: preprocessed images → (embedding, probs per task in `tasks` order)."""

    def __init__(self, model: LookalikeModel):
        super().__init__()
        self.model = model
        self.tasks = list(model.heads.keys())
        self.eval()  # the exporter restores the wrapper's mode afterwards: it must be eval too

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(images)
        return (out["embedding"], *(out["logits"][t].float().softmax(-1) for t in self.tasks))


def output_names(tasks: list[str]) -> list[str]:
    return ["embedding"] + [f"probs_{task}" for task in tasks]


def code_version() -> str:
    """The git commit of this code (with -dirty when modified), or 'unknown' outside a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "training", "transformer"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def export_model(model: LookalikeModel, config: ModelConfig, out_dir: str | Path, *,
                 metrics: dict[str, Any] | None = None, lineage: dict[str, Any] | None = None,
                 check_batch: torch.Tensor | None = None, model_version: str | None = None) -> Path:
    """Write model.safetensors, model.onnx (checked against PyTorch) and model.json into `out_dir`.

    The folder gets its version name now (`model_version`, default a fresh time-sorted one), so a
    pipeline can publish it later under the name its metrics were recorded with.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.float().eval().to(memory_format=torch.contiguous_format).cpu()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt", "architecture": config.architecture})

    tasks = list(config.heads)
    names = output_names(tasks)
    onnx_path = out_dir / ONNX_FILE
    _export_onnx(ServingGraph(model), config, onnx_path, names)
    _check_onnx(model, onnx_path, config, names, check_batch)

    lineage = dict(lineage or {})
    lineage.setdefault("base_weights", model.base_weights)
    lineage.setdefault("code_version", code_version())
    meta = {
        "format": FORMAT,
        "model_version": model_version or new_version(),
        "architecture": config.architecture,
        "embedding_dim": config.embedding_dim,
        "preprocessing": config.preprocessing.to_dict(),
        "heads": {task: list(labels) for task, labels in config.heads.items()},
        "trainable_blocks": config.trainable_blocks,
        "onnx": {"input": ONNX_INPUT, "outputs": names, "opset": ONNX_OPSET, "tolerance": ONNX_TOLERANCE},
        "metrics": metrics or {},
        "lineage": lineage,
        "config": {**config.to_dict(), "pretrained": None},
    }
    write_json(out_dir / META_FILE, meta)
    return out_dir


def _export_onnx(graph: ServingGraph, config: ModelConfig, path: Path, names: list[str]) -> None:
    size = config.preprocessing.size
    example = torch.zeros(2, 3, size, size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer chatter about constant-folded shapes
        torch.onnx.export(graph, (example,), str(path), input_names=[ONNX_INPUT], output_names=names,
                          dynamic_axes={ONNX_INPUT: {0: "batch"}, **{n: {0: "batch"} for n in names}},
                          opset_version=ONNX_OPSET, dynamo=False)


def _check_onnx(model: LookalikeModel, path: Path, config: ModelConfig, names: list[str],
                check_batch: torch.Tensor | None) -> None:
    import onnxruntime as ort

    size = config.preprocessing.size
    if check_batch is None:  # random normalised pixels, batch 3 so the dynamic batch axis is exercised
        check_batch = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    check_batch = check_batch.float().cpu().contiguous()
    model.eval()
    with torch.no_grad():
        expected = ServingGraph(model)(check_batch)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(names, {ONNX_INPUT: check_batch.numpy()})
    for name, want, have in zip(names, expected, got):
        diff = float(np.max(np.abs(want.numpy() - have))) if have.size else 0.0
        if have.shape != tuple(want.shape) or not diff <= ONNX_TOLERANCE:
            path.unlink(missing_ok=True)
            raise ExportError(f"ONNX output {name} differs from PyTorch (shape {have.shape} vs "
                              f"{tuple(want.shape)}, max abs diff {diff:.2e} > {ONNX_TOLERANCE}); "
                              f"the model was not exported")


def load_model(model_dir: str | Path) -> tuple[LookalikeModel, dict[str, Any]]:
    """Rebuild the model from model.json + model.safetensors (no pretrained weights are read).

    When the folder holds a MANIFEST.json (a published version) every file is checked against it first.
    """
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    meta_path = model_dir / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{model_dir} has no {META_FILE}: it is not a model version folder")
    if (model_dir / MANIFEST).exists():
        verify_dir(model_dir)
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} has format {meta.get('format')!r}; this code reads format {FORMAT}")
    config_dict = dict(meta.get("config") or {})
    for key in ("architecture", "embedding_dim", "heads", "trainable_blocks", "preprocessing"):
        config_dict[key] = meta[key]  # the top-level contract wins over the saved config
    config = ModelConfig.from_dict({**config_dict, "pretrained": None})
    model = create_model(config)
    state = load_file(str(model_dir / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{model_dir / WEIGHTS_FILE} does not match model.json: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    model.base_weights = meta.get("lineage", {}).get("base_weights", "none")
    return model.eval(), meta


def publish_model(store, out_dir: str | Path, *, alias: str | None = None, version: str | None = None) -> str:
    """Publish a model folder as a new version of `models/` (whole or not at all); return the version.

    The version is `version`, else the one model.json was exported with; model.json is rewritten to
    say it before upload, so a downloaded folder knows what it is.
    """
    out_dir = Path(out_dir)
    for name in (WEIGHTS_FILE, ONNX_FILE, META_FILE):
        if not (out_dir / name).is_file():
            raise FileNotFoundError(f"{out_dir} has no {name}: export the model before publishing")
    meta = json.loads((out_dir / META_FILE).read_text())
    version = version or meta.get("model_version") or new_version()
    meta["model_version"] = version
    write_json(out_dir / META_FILE, meta)
    repo = model_repo(store)
    repo.publish(out_dir, version=version, metadata={"architecture": meta["architecture"],
                                                     "heads": list(meta["heads"])})
    if alias:
        repo.set_alias(alias, version)
    return version
