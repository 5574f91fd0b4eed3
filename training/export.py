"""Export a trained model as a model version folder, reload it, publish it.

    model.safetensors   every weight (backbone, projection, heads); never pickle
    model.onnx          the serving graph: `images` [N,3,H,W] float32 (already preprocessed)
                        → `embedding` [N,D] (L2-normalised) and `probs_<task>` [N,C] (softmax) per head
    model.json          architecture, embedding_dim, preprocessing, heads, metrics, lineage, config

The ONNX graph is checked against PyTorch at export (max abs difference ≤ 1e-4 on every output) and the
export fails rather than write a graph that serves different numbers than were evaluated.
"""
from __future__ import annotations

import logging
import subprocess
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lookalike.core.errors import LookalikeError
from lookalike.training.model import LookalikeModel, ModelConfig, create_model
from lookalike.core.model_card import (CARD_FILE, ONNX_FILE, ONNX_INPUT, WEIGHTS_FILE, ModelCard, ModelCardError,
                                       output_names)

log = logging.getLogger(__name__)

ONNX_TOLERANCE = 1e-4
ONNX_OPSET = 18


class ExportError(LookalikeError):
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
        located = (out["objectness"].float(),) if "objectness" in out else ()
        return (out["embedding"], *(out["logits"][t].float().softmax(-1) for t in self.tasks), *located)


def code_version() -> str:
    """The git commit of this code (with -dirty when modified), or 'unknown' outside a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "training", "lookalike/core"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def export_model(model: LookalikeModel, config: ModelConfig, out_dir: str | Path, *, model_version: str,
                 metrics: dict[str, Any] | None = None, lineage: dict[str, Any] | None = None,
                 check_batch: torch.Tensor | None = None) -> Path:
    """Write model.safetensors, model.onnx (checked against PyTorch) and model.json into `out_dir`.

    `model_version` is the name the training run minted when it started (lookalike.core.artifacts.new_version),
    so the folder, its card, its metrics and the published version all carry the one name.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.float().eval().to(memory_format=torch.contiguous_format).cpu()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt", "architecture": config.architecture})

    names = output_names(list(config.heads), model.locator is not None)
    onnx_path = out_dir / ONNX_FILE
    _export_onnx(ServingGraph(model), config, onnx_path, names)
    _check_onnx(model, onnx_path, config, names, check_batch)

    lineage = dict(lineage or {})
    lineage.setdefault("base_weights", model.base_weights)
    lineage.setdefault("code_version", code_version())
    card = ModelCard(
        model_version=model_version, architecture=config.architecture, embedding_dim=config.embedding_dim,
        preprocessing=config.preprocessing, heads={task: list(labels) for task, labels in config.heads.items()},
        trainable_blocks=config.trainable_blocks,
        onnx={"input": ONNX_INPUT, "outputs": names, "opset": ONNX_OPSET, "tolerance": ONNX_TOLERANCE},
        metrics=metrics or {}, lineage=lineage, config={**config.to_dict(), "pretrained": None})
    card.write(out_dir)
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


def load_model(model: ModelCard | str | Path) -> tuple[LookalikeModel, ModelCard]:
    """Rebuild the network a model card describes from its model.safetensors (no pretrained weights read).

    Give the card (already verified) or a folder; a folder's card is read, and verified once, here.
    """
    from safetensors.torch import load_file

    card = model if isinstance(model, ModelCard) else ModelCard.read(model)
    config_dict = dict(card.config)
    # The card's contract wins over the saved config.
    config_dict.update(architecture=card.architecture, embedding_dim=card.embedding_dim, heads=card.heads,
                       trainable_blocks=card.trainable_blocks, preprocessing=card.preprocessing.to_dict())
    net = create_model(ModelConfig.from_dict({**config_dict, "pretrained": None}))
    state = load_file(str(card.file(WEIGHTS_FILE)))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelCardError(f"{card.file(WEIGHTS_FILE)} does not match {CARD_FILE}: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}; republish the model")
    net.base_weights = card.lineage.get("base_weights", "none")
    return net.eval(), card


def publish_model(store, out_dir: str | Path, *, alias: str | None = None) -> str:
    """Publish an exported model folder as a new version of `models/` (whole or not at all), under the
    version its card was exported with; point `alias` at it. The folder is not edited."""
    from lookalike.core.artifacts import model_repo

    card = ModelCard.read(out_dir)
    for name in (WEIGHTS_FILE, ONNX_FILE):
        if not card.file(name).is_file():
            raise ModelCardError(f"{card.folder} has no {name}: export the model before publishing")
    repo = model_repo(store)
    repo.publish(card.folder, version=card.model_version,
                 metadata={"architecture": card.architecture, "heads": card.tasks})
    if alias:
        repo.set_alias(alias, card.model_version)
    return card.model_version
