"""The model card: what a model version folder holds and what its `model.json` says, in one class.

    models/<model_version>/
        model.safetensors   every weight (never pickle)
        model.onnx          the serving graph: `images` [N,3,S,S] → `embedding`, `probs_<task>` per head
        model.json          this card: version, architecture, embedding size, preprocessing, heads, …
        MANIFEST.json       sha256 of every file, written last by lookalike.core.artifacts

Everyone who needs to know about a model reads its card here: training writes it at export, the
predictor loads the network it describes, the transformer applies its preprocessing, the pipelines add
their evaluation. As timm keeps a model's pretrained config beside its architecture and open_clip hands
out the preprocessing with the model, the card carries the preprocessing (a `PreprocessSpec`) so
training and serving cannot drift apart. It is torch-free, so the transformer's image can read it.

A card read from a folder is verified once, here, against the folder's MANIFEST.json when it has one;
whoever receives the card (with its `folder`) loads the files without hashing them again.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lookalike.core.artifacts import MANIFEST, ArtifactError, verify_dir, write_json
from lookalike.core.preprocessing import PreprocessSpec

CARD_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
ONNX_INPUT = "images"
OBJECTNESS = "objectness"  # [N, h, w] probability that each feature-map cell shows the product
FORMAT = 1
SUBFOLDER = "model"  # KServe's storage initializer may mount a pair as <dir>/model/ + <dir>/index/
REQUIRED = ("model_version", "architecture", "embedding_dim", "preprocessing", "heads")


class ModelCardError(ArtifactError):
    """A folder is not a usable model version (no card, an unreadable card, an unknown format)."""


@dataclass(frozen=True)
class ModelCard:
    model_version: str
    architecture: str
    embedding_dim: int
    preprocessing: PreprocessSpec
    heads: dict[str, list[str]]
    trainable_blocks: int | None = None
    onnx: dict[str, Any] = field(default_factory=dict)  # input name, output names, opset, tolerance
    metrics: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)  # catalog, base weights, code version
    config: dict[str, Any] = field(default_factory=dict)  # the full model config it was built with
    folder: Path | None = field(default=None, compare=False)  # where it was read from (verified)

    def __repr__(self) -> str:
        return f"ModelCard({self.model_version}, {self.architecture}, {self.preprocessing.size} px)"

    # ---- the contract ------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    @property
    def onnx_input(self) -> str:
        return str(self.onnx.get("input", ONNX_INPUT))

    @property
    def has_locator(self) -> bool:
        """Whether the serving graph also says where the product is (an `objectness` output)."""
        return OBJECTNESS in self.onnx.get("outputs", [])

    @property
    def output_names(self) -> list[str]:
        """The serving graph's outputs, in order: the embedding, one probability tensor per head, then the
        locator's objectness map when the model has one."""
        return output_names(self.tasks, self.has_locator)

    def file(self, name: str) -> Path:
        """A file of the folder the card was read from."""
        if self.folder is None:
            raise ModelCardError(f"the card of model {self.model_version} was not read from a folder")
        return self.folder / name

    @classmethod
    def from_dict(cls, data: dict[str, Any], folder: Path | None = None) -> ModelCard:
        where = f"{folder / CARD_FILE}" if folder else CARD_FILE
        if not isinstance(data, dict):
            raise ModelCardError(f"{where} is not a JSON object")
        if data.get("format") != FORMAT:
            raise ModelCardError(f"{where} has format {data.get('format')!r}; this code reads format {FORMAT}. "
                                 f"Republish the model with the current exporter")
        missing = [key for key in REQUIRED if key not in data]
        if missing:
            raise ModelCardError(f"{where} lacks {', '.join(missing)}; republish the model with the current exporter")
        try:
            return cls(model_version=str(data["model_version"]), architecture=str(data["architecture"]),
                       embedding_dim=int(data["embedding_dim"]),
                       preprocessing=PreprocessSpec.from_dict(data["preprocessing"]),
                       heads={str(t): [str(x) for x in labels] for t, labels in dict(data["heads"]).items()},
                       trainable_blocks=data.get("trainable_blocks"), onnx=dict(data.get("onnx") or {}),
                       metrics=dict(data.get("metrics") or {}), lineage=dict(data.get("lineage") or {}),
                       config=dict(data.get("config") or {}), folder=folder)
        except (TypeError, ValueError) as exc:
            raise ModelCardError(f"{where} is not a valid model card ({exc}); republish the model") from exc

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "model_version": self.model_version, "architecture": self.architecture,
                "embedding_dim": self.embedding_dim, "preprocessing": self.preprocessing.to_dict(),
                "heads": {t: list(labels) for t, labels in self.heads.items()},
                "trainable_blocks": self.trainable_blocks, "onnx": dict(self.onnx), "metrics": dict(self.metrics),
                "lineage": dict(self.lineage), "config": dict(self.config)}

    def replace(self, **fields: Any) -> ModelCard:
        """A copy with some fields changed (e.g. `metrics=`); cards are never edited in place."""
        return replace(self, **fields)

    # ---- folders -----------------------------------------------------------------------------
    @staticmethod
    def locate(path: str | Path) -> Path:
        """The model version folder at `path`: `path` itself, or `path/model/` (a mounted model/index pair)."""
        path = Path(path)
        if (path / CARD_FILE).is_file():
            return path
        if (path / SUBFOLDER / CARD_FILE).is_file():
            return path / SUBFOLDER
        raise ModelCardError(f"{path} holds no {CARD_FILE} (nor {SUBFOLDER}/{CARD_FILE}): it is not a model "
                             f"version folder. Point at a folder `lookalike train` wrote or a published version")

    @classmethod
    def read(cls, path: str | Path, *, verify: bool = True) -> ModelCard:
        """The card of the model folder at `path` (or `path/model/`).

        With `verify` (the default), a folder that has a MANIFEST.json (a published version) has every file
        checked against it, once; pass verify=False only for a folder verified already (a fresh download).
        """
        folder = cls.locate(path)
        if verify and (folder / MANIFEST).exists():
            verify_dir(folder)
        try:
            data = json.loads((folder / CARD_FILE).read_text())
        except ValueError as exc:
            raise ModelCardError(f"{folder / CARD_FILE} is not valid JSON ({exc}); republish the model") from exc
        return cls.from_dict(data, folder)

    @classmethod
    def is_published(cls, path: str | Path) -> bool:
        """Whether the model folder at `path` is a complete published version (it has a manifest)."""
        return (cls.locate(path) / MANIFEST).is_file()

    def write(self, folder: str | Path) -> Path:
        """Write model.json into `folder` atomically; return its path."""
        folder = Path(folder)
        if (folder / MANIFEST).exists():
            raise ModelCardError(f"{folder} is a published version; versions are never edited")
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / CARD_FILE, self.to_dict())
        return folder / CARD_FILE


def output_names(tasks: list[str], locator: bool = False) -> list[str]:
    return ["embedding"] + [f"probs_{task}" for task in tasks] + ([OBJECTNESS] if locator else [])
