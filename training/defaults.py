"""Training settings chosen from the catalog when they are not given: input size and crop from the photos'
resolution, the stages fine-tuned (fewer for photos, close to ImageNet's, than for thumbnails), the length
in epochs of the catalog, the warm-up and how often early stopping evaluates. Every choice carries its
reason (`Choice`): `lookalike train` prints them and model.json records them (lineage `chosen`).

- Input: a catalog of photos (median shorter side >= PHOTO_MIN_SIDE) trains at 224 px, EfficientNet-Lite0's
  own input size, with the model's own "center" crop (the shorter side resized to 256, then the middle
  224 x 224, so 3:4 photos are not squashed); thumbnails such as Fashion-MNIST's 28-px products keep the
  80 px squashed to a square that was measured best for them (see training/train.py).
- Length: as many epochs (one epoch = as many training views as the catalog has training photos) as a
  CPU budget allows, at most `max_epochs`; early stopping keeps the best evaluation, so a generous cap
  costs time but not quality. The budget is what a 2-core CPU trains in about ten minutes at the chosen
  size (`CPU_IMAGES_PER_SECOND`, measured), GPU_BUDGET_FACTOR times more on a GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from lookalike.training.settings import AUTO_BLOCKS, AUTO_L2SP

if TYPE_CHECKING:
    from lookalike.training.settings import TrainConfig

PHOTO_MIN_SIDE = 200  # px: a median shorter side from here on is a photo catalog
PHOTO_SIZE = 224  # EfficientNet-Lite0's own input size (its ImageNet weights' best)
THUMBNAIL_SIZE = 80  # measured on Fashion-MNIST: better fine-category P@10 than 96 px at equal compute
# The final stages fine-tuned, chosen by measurement (same-listing recall@10, fine-tuned / pretrained at
# 224 px, on queries the training never generated; objective ce+proxy, L2-SP, projection from PCA):
# - photos: a 600-listing slice of the emoji catalog, 224 px, 60 steps (~1.7 epochs). 1 stage: held-out
#   design set 0.900 / 0.885, simulated phone photos 0.573 / 0.487; 2 stages: 0.892 / 0.885 and
#   0.753 / 0.487; 3 stages: 0.868 / 0.885 and 0.727 / 0.487. Two stages learn the phone photos and still
#   keep what ImageNet knew of designs the catalog never showed; three start to forget it.
# - thumbnails: Fashion-MNIST as the demo trains it (2,700 listings, 80 px, 400 steps; phone photos of
#   300 held-out listings). 2 stages: phone 0.170 / 0.185, fine_category P@10 0.765 / 0.752; 3 stages:
#   0.300 / 0.185 and 0.762 / 0.752. 28-px grey products are far from ImageNet: they need the third.
PHOTO_BLOCKS, THUMBNAIL_BLOCKS = 2, 3
# L2-SP (the pull of the fine-tuned weights towards the pretrained ones) keeps a photo catalog close to what
# ImageNet knew of designs it never showed (emoji, above). Thumbnails are far from ImageNet's photos: on
# the whole of Fashion-MNIST (1,401 steps, 80 px; fine-tuned / pretrained, benchmarks/retrieval_quality.py)
# L2-SP 0.01 gave fine_category P@10 0.832 / 0.808, category 0.911, shade 0.647, phone recall@10
# 0.241 / 0.120; without it 0.836, 0.918, 0.665 and 0.264: every figure higher.
PHOTO_L2SP, THUMBNAIL_L2SP = 0.01, 0.0
# Training views per second of the whole loop (loader, forward, backward, step) on 2 CPU cores with the
# default batch (3 tasks x 8 listings x 2 views) and three trained stages, measured on this project's
# development machine (shared, so approximate): 80 px 112 img/s (Fashion-MNIST, 1400 steps in 10 min),
# 224 px 16 img/s (the emoji catalog).
CPU_IMAGES_PER_SECOND = {80: 112.0, 224: 16.0}
CPU_BUDGET_SECONDS = 600  # the training a default run may spend on 2 CPU cores (evaluation comes on top)
GPU_BUDGET_FACTOR = 20
MIN_STEPS = 100


@dataclass(frozen=True)
class Choice:
    setting: str
    value: Any
    why: str

    def line(self) -> str:
        return f"{self.setting} = {self.value}: {self.why}"

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "why": self.why}


def cpu_images_per_second(size: int) -> float:
    """Measured training throughput at 80 and 224 px, interpolated in log-log between them (and beyond)."""
    (s0, r0), (s1, r1) = sorted(CPU_IMAGES_PER_SECOND.items())
    slope = math.log(r1 / r0) / math.log(s1 / s0)
    return r0 * (size / s0) ** slope


def median_short_side(sizes: list[tuple[int, int]]) -> float:
    return float(np.median([min(w, h) for w, h in sizes])) if sizes else 0.0


def resolve(config: TrainConfig, *, sizes: list[tuple[int, int]], train_photos: int, n_tasks: int, device: str,
            views: int) -> tuple[TrainConfig, list[Choice]]:
    """`config` with every automatic setting (0 or "auto") made concrete, and the reasons."""
    choices: list[Choice] = []
    side = median_short_side(sizes)
    photo = side >= PHOTO_MIN_SIDE
    kind = (f"a photo catalog (median shorter side {side:.0f} px >= {PHOTO_MIN_SIDE})" if photo else
            f"thumbnails (median shorter side {side:.0f} px < {PHOTO_MIN_SIDE})")
    size, crop = config.image_size, config.crop
    if not size:
        size = PHOTO_SIZE if photo else THUMBNAIL_SIZE
        choices.append(Choice("image_size", size, f"{kind}: " + (
            "EfficientNet-Lite0's own input size, where its ImageNet features are best" if photo else
            "80 px was measured best for small product thumbnails at equal compute")))
    if crop == "auto":
        crop = "center" if photo else "none"
        choices.append(Choice("crop", crop, "the model's own centre crop of the resized shorter side, so photos "
                                            "keep their aspect" if photo else
                                            "squashed whole: a thumbnail has no margin to spare"))
    blocks = config.trainable_blocks
    if blocks == AUTO_BLOCKS:
        blocks = PHOTO_BLOCKS if photo else THUMBNAIL_BLOCKS
        choices.append(Choice("trainable_blocks", blocks, "measured best for " + (
            "photo catalogs: they learn phone photos and keep what ImageNet knew" if photo else
            "thumbnails, far from ImageNet's photos")))
    l2sp = config.l2sp_weight
    if l2sp == AUTO_L2SP:
        l2sp = PHOTO_L2SP if photo else THUMBNAIL_L2SP
        choices.append(Choice("l2sp_weight", l2sp, "keep the fine-tuned backbone close to ImageNet's weights: photos "
                                                   "are what it knew" if photo else
                                                   "off: thumbnails are far from ImageNet's photos, which held their "
                                                   "labels back"))
    batch = config.samples_per_task * n_tasks * views
    per_epoch = max(1, math.ceil(train_photos / batch))
    steps = config.steps
    if not steps:
        if config.epochs:
            steps = max(1, round(config.epochs * per_epoch))
            choices.append(Choice("steps", steps, f"{config.epochs:g} epochs of {train_photos} training photos "
                                                  f"in batches of {batch} views"))
        else:
            rate = cpu_images_per_second(size)
            budget = CPU_BUDGET_SECONDS * rate * (GPU_BUDGET_FACTOR if device == "cuda" else 1)
            epochs = min(config.max_epochs, budget / max(1, train_photos))
            steps = max(MIN_STEPS, round(epochs * per_epoch))
            where = "a GPU" if device == "cuda" else "2 CPU cores"
            capped = "the cap of max_epochs" if epochs == config.max_epochs else (
                f"about {CPU_BUDGET_SECONDS // 60} minutes of training on {where} at {size} px "
                f"(~{rate * (GPU_BUDGET_FACTOR if device == 'cuda' else 1):.0f} views/s)")
            choices.append(Choice("steps", steps, f"{steps * batch / max(1, train_photos):.2f} epochs of "
                                                  f"{train_photos} training photos in batches of {batch} views: "
                                                  f"{capped}; early stopping keeps the best"))
    warmup = config.warmup_steps or min(50, max(1, steps // 10))
    every = config.eval_every or max(10, steps // 10)
    if not config.eval_every:
        choices.append(Choice("eval_every", every, "about ten held-out evaluations over the run"))
    return replace(config, image_size=size, crop=crop, trainable_blocks=blocks, l2sp_weight=l2sp, steps=steps,
                   warmup_steps=warmup, eval_every=every), choices
