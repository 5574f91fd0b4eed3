"""The model, one definition for training and serving: a timm backbone, a shared embedding, one head per task.

    image ─▶ backbone (stem + blocks, early ones frozen) ─▶ pooled features [N, F]
          ─▶ projection Linear(F, D) ─▶ L2-normalise ─▶ embedding [N, D]   (what the index searches)
          ─▶ per task: Linear(D, C_task) on logit_scale × embedding ─▶ logits [N, C_task]

With a locator (`ModelConfig.locator`), the same pass also reads the backbone's last feature map:

          feature map [N, F, h, w] ─▶ objectness [N, h, w] in 0..1   (where the product is), from
              "saliency": the map's channel energy, min-max scaled per photo (no training), or
              "learnt": the locator head's probabilities (trained on the simulator's free boxes)

`feature_maps` also returns, from the same pass, the last stride-16 stage's output (cells twice as fine);
the localisation benchmark measures its saliency beside the served map (it found fewer listings: the
frozen early stage lights up on the scene's own texture, see README "Finding the product in the photo").

The heads read the normalised embedding itself, not the raw projection: what the classifiers learn to
separate is then exactly what cosine search sees, so every task's labels shape the retrieval space.
`logit_scale` (a constant, not learned) lets a unit-length vector still produce confident logits.

Freezing: the stem and all but the last `trainable_blocks` stages of `backbone.blocks` are frozen, and
their batch-norm layers stay in eval mode even under `model.train()`, so their running statistics are the
ImageNet ones forever. The last stages and the head conv (`conv_head`/`bn2`) are fine-tuned.
`trainable_blocks=0` trains only projection and heads; `-1` fine-tunes the whole backbone.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lookalike.core.errors import InputError
from lookalike.core.preprocessing import PreprocessSpec

DEFAULT_ARCHITECTURE = "tf_efficientnet_lite0"
# How the served objectness is read off the feature map (measured side by side in benchmarks/
# retrieval_quality.py: on simulated phone photos the untrained saliency crop found listings at least as
# well as the learnt head, see README "Finding the product in the photo").
LOCATOR_MAPS = ("saliency", "learnt")


@dataclass
class ModelConfig:
    architecture: str = DEFAULT_ARCHITECTURE
    embedding_dim: int = 128
    heads: dict[str, list[str]] = field(default_factory=dict)  # task -> labels in class-index order
    trainable_blocks: int = 2
    pretrained: str | None = "package"  # "package", a weights file path or s3:// URI, or None
    preprocessing: PreprocessSpec = field(default_factory=PreprocessSpec)
    logit_scale: float = 16.0
    locator: bool = False  # a head that finds the product in the photo (lookalike.training.locator)
    locator_map: str = "saliency"  # which objectness the model serves, when it has a locator (LOCATOR_MAPS)

    def __post_init__(self):
        if self.embedding_dim <= 0:
            raise InputError(f"embedding_dim must be positive, got {self.embedding_dim}")
        if self.trainable_blocks < -1:
            raise InputError("trainable_blocks is the number of final stages to fine-tune (-1: all)")
        for task, labels in self.heads.items():
            if len(labels) < 2:
                raise InputError(f"head {task!r} has {len(labels)} class(es); a head needs at least two")
            if len(set(labels)) != len(labels):
                raise InputError(f"head {task!r} has duplicate labels")
        if self.locator_map not in LOCATOR_MAPS:
            raise InputError(f"locator_map must be one of {', '.join(LOCATOR_MAPS)}, got {self.locator_map!r}")
        if isinstance(self.preprocessing, dict):
            self.preprocessing = PreprocessSpec.from_dict(self.preprocessing)

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "embedding_dim": self.embedding_dim,
            "heads": {task: list(labels) for task, labels in self.heads.items()},
            "trainable_blocks": self.trainable_blocks,
            "pretrained": None if self.pretrained is None else str(self.pretrained),
            "preprocessing": self.preprocessing.to_dict(),
            "logit_scale": self.logit_scale,
            "locator": self.locator,
            "locator_map": self.locator_map,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {k: data[k] for k in ("architecture", "embedding_dim", "trainable_blocks", "pretrained",
                                      "logit_scale", "locator", "locator_map") if k in data}
        return cls(heads={t: list(v) for t, v in data.get("heads", {}).items()},
                   preprocessing=PreprocessSpec.from_dict(data.get("preprocessing", {})), **known)

    def replace(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)


class LookalikeModel(nn.Module):
    def __init__(self, config: ModelConfig, backbone: nn.Module):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.num_features = int(backbone.num_features)
        self.projection = nn.Linear(self.num_features, config.embedding_dim)
        self.heads = nn.ModuleDict({task: nn.Linear(config.embedding_dim, len(labels))
                                    for task, labels in config.heads.items()})
        self.logit_scale = float(config.logit_scale)
        self.locator = locator_head(self.num_features) if config.locator else None
        self.base_weights = "none"
        self._frozen = self._freeze(config.trainable_blocks)

    # ---- freezing ----------------------------------------------------------------------------
    def _freeze(self, trainable_blocks: int) -> list[nn.Module]:
        if trainable_blocks == -1:
            return []
        blocks = getattr(self.backbone, "blocks", None)
        if blocks is None:
            raise InputError(f"{self.config.architecture} has no `blocks` stages to freeze by count; use "
                             f"trainable_blocks=-1 to fine-tune it whole")
        if trainable_blocks > len(blocks):
            raise InputError(f"trainable_blocks={trainable_blocks} but {self.config.architecture} has "
                             f"{len(blocks)} stages")
        cut = len(blocks) - trainable_blocks
        frozen = [m for name, m in self.backbone.named_children() if name != "blocks"]
        if trainable_blocks > 0:  # the head conv after the last stage is trained with it
            frozen = [m for name, m in self.backbone.named_children()
                      if name not in ("blocks", "conv_head", "bn2", "global_pool", "classifier")]
        frozen += list(blocks[:cut])
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)
        return frozen

    def train(self, mode: bool = True) -> LookalikeModel:
        super().train(mode)
        for module in self._frozen:  # frozen batch-norm keeps its ImageNet statistics
            module.eval()
        return self

    # ---- forward ----------------------------------------------------------------------------
    @property
    def cut(self) -> int | None:
        """Where the trained stages start in `backbone.blocks` (everything before is frozen, the "trunk"),
        or None when the backbone is trained whole or has no stem/blocks/head layout to split."""
        tb = self.config.trainable_blocks
        if tb < 0 or not all(hasattr(self.backbone, a) for a in _SPLIT_LAYOUT):
            return None
        return len(self.backbone.blocks) - tb

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen stem and early stages (identity when nothing is frozen)."""
        cut = self.cut
        return x if cut is None else backbone_trunk(self.backbone, x, cut)

    def tail(self, t: torch.Tensor) -> torch.Tensor:
        """The trained stages, head conv and pooling on the trunk's output → pooled features [N, F]."""
        cut = self.cut
        return self.backbone(t) if cut is None else backbone_tail(self.backbone, t, cut)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features [N, F] (the baseline embedding, once L2-normalised)."""
        return self.backbone(x)

    def embed_features(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(feats).float(), dim=-1)

    def logits_from_embedding(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        scaled = embedding * self.logit_scale
        return {task: head(scaled) for task, head in self.heads.items()}

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        if self.locator is None:
            embedding = self.embed_features(self.features(x))
            return {"embedding": embedding, "logits": self.logits_from_embedding(embedding)}
        fmap = self.feature_map(x)  # one pass feeds the embedding and the locator
        embedding = self.embed_features(self.backbone.global_pool(fmap))
        return {"embedding": embedding, "logits": self.logits_from_embedding(embedding),
                "objectness": self.objectness(fmap)}

    def objectness(self, fmap: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        """How likely each cell of the feature map shows the product [N, h, w], 0..1 (`locator_map`)."""
        if (kind or self.config.locator_map) == "learnt":
            return torch.sigmoid(self.locator(fmap).squeeze(1).float())
        return saliency(fmap)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map [N, F, h, w], before pooling (`features` is its global pool)."""
        return self.backbone.forward_features(x)

    def feature_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The last feature map and, from the same pass, the output of the backbone's last stride-16 stage
        [N, C, 2h, 2w] (cells of 16 px: twice as fine; None when the backbone has no such stage)."""
        stage = _stride16_stage(self.backbone)
        if stage is None:
            return self.feature_map(x), None
        b = self.backbone
        t, finer = b.bn1(b.conv_stem(x)), None
        for i, block in enumerate(b.blocks):
            t = block(t)
            if i == stage:
                finer = t
        return b.bn2(b.conv_head(t)), finer

    def forward_from_trunk(self, t: torch.Tensor) -> dict[str, Any]:
        """`forward` from the trunk's output (training and evaluation run the frozen trunk once)."""
        embedding = self.embed_features(self.tail(t))
        return {"embedding": embedding, "logits": self.logits_from_embedding(embedding)}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.features(x))

    @torch.no_grad()
    def init_projection(self, features: torch.Tensor) -> bool:
        """Start the projection as the PCA whitening of these pretrained features (whether it could).

        The embedding then begins as good as the pretrained model's features, often better (measured on the
        emoji catalog: same-listing recall@10 of held-out renders 0.902 against 0.885 for the raw 1280-d
        features and 0.818 for a random projection), and fine-tuning starts from what ImageNet knew instead
        of from a random 128-d view of it.
        """
        feats = features.float()
        if len(feats) <= self.config.embedding_dim:
            return False  # too few photos for as many directions
        mean = feats.mean(0)
        _, s, vt = torch.linalg.svd(feats - mean, full_matrices=False)
        d = self.config.embedding_dim
        weight = vt[:d] / s[:d, None].clamp_min(1e-6)
        # The output is L2-normalised, so only directions and relative scales matter: rows of unit mean
        # norm keep the weights at the scale the optimiser's steps are sized for.
        weight = weight / weight.norm(dim=1).mean()
        self.projection.weight.copy_(weight)
        self.projection.bias.copy_(-(weight @ mean))
        return True


def saliency(fmap: torch.Tensor) -> torch.Tensor:
    """A feature map's channel energy per cell, min-max scaled per photo [N, h, w] in 0..1: where the
    backbone sees most (no training; the class-activation idea)."""
    energy = fmap.float().norm(dim=1)
    low = energy.amin(dim=(1, 2), keepdim=True)
    high = energy.amax(dim=(1, 2), keepdim=True)
    return (energy - low) / (high - low).clamp_min(1e-6)


def _stride16_stage(backbone: nn.Module) -> int | None:
    """Index in `backbone.blocks` of the last stage at 1/16 of the input (timm's feature_info), or None."""
    if not all(hasattr(backbone, a) for a in _SPLIT_LAYOUT):
        return None
    for info in getattr(backbone, "feature_info", []):
        module = str(info.get("module", ""))
        if info.get("reduction") == 16 and module.startswith("blocks."):
            return int(module.split(".")[1])
    return None


def locator_head(channels: int, hidden: int = 64) -> nn.Module:
    """Objectness per feature-map cell: a 1x1 conv reads each cell, a 3x3 conv lets neighbours agree."""
    return nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, 1, 3, padding=1))


_SPLIT_LAYOUT = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool")


def backbone_trunk(backbone: nn.Module, x: torch.Tensor, cut: int) -> torch.Tensor:
    """timm EfficientNet's stem and its first `cut` stages."""
    x = backbone.bn1(backbone.conv_stem(x))
    for block in backbone.blocks[:cut]:
        x = block(x)
    return x


def backbone_tail(backbone: nn.Module, t: torch.Tensor, cut: int) -> torch.Tensor:
    """The stages from `cut` on, the head conv and the pooling: with `backbone_trunk`, the same as
    `backbone(x)` (timm's forward_features + forward_head of a classifier-less model)."""
    for block in backbone.blocks[cut:]:
        t = block(t)
    return backbone.global_pool(backbone.bn2(backbone.conv_head(t)))


def create_backbone(architecture: str) -> nn.Module:
    import timm

    try:
        return timm.create_model(architecture, pretrained=False, num_classes=0)
    except RuntimeError as exc:  # timm's "Unknown model"
        raise InputError(f"unknown timm architecture {architecture!r}: {exc}") from exc


def create_model(config: ModelConfig) -> LookalikeModel:
    """Build the model and load its backbone's ImageNet weights as `config.pretrained` says."""
    from lookalike.training.pretrained import load_pretrained

    backbone = create_backbone(config.architecture)
    description = load_pretrained(backbone, config.architecture, config.pretrained)
    model = LookalikeModel(config, backbone)
    model.base_weights = description
    return model
