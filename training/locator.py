"""The locator: finding the product in a shopper's photo, learnt without a single new label.

The phone-photo simulator knows where it put the product (`PhoneInfo.mask`), so every simulated view is a
free localisation label. The locator head (`lookalike.training.model.locator_head`) reads the backbone's
last feature map (7x7 cells at 224 px) and says, per cell, how much of it shows the product; the
predictor boxes the cells it is sure of (`lookalike.core.boxes.box_from_objectness`) and the transformer
searches that part of the photo.

It learns after the embedding, with the whole network frozen: adding it changes no embedding, so every
retrieval figure of the model stands, and it costs seconds (the feature maps are computed once). Views use
the TRAINING recipe only; the benchmarks judge it on the EVALUATION recipe's scenes
(`benchmarks/retrieval_quality.py`, the `localise:` line).

    views = simulate(catalog photo, TRAINING)  ─▶ preprocessing ─▶ frozen backbone ─▶ feature maps
    target per cell = share of the cell the product covers (the view's mask, box-averaged)
    loss = binary cross-entropy of the locator's logits against those shares
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lookalike.core.boxes import box_from_objectness
from lookalike.core.preprocessing import PreprocessSpec, crop_window, preprocess_batch
from lookalike.training.data import ImageBank
from lookalike.training.model import LookalikeModel, locator_head
from lookalike.training.phone_photos import TRAINING, simulate

log = logging.getLogger(__name__)

VIEW_SIZE = 320  # simulated views are made at the size evaluation's phone photos are
WHOLE_SHARE = 0.15  # views that are the catalog photo itself (all product): a close-up is not cropped
HELD_OUT_SHARE = 0.1  # views kept out of fitting, to report how well boxes match


def make_views(bank: ImageBank, n: int, seed: int) -> tuple[list[Image.Image], list[np.ndarray], list[tuple]]:
    """`n` seeded TRAINING-recipe views of the bank's photos with their product masks and boxes."""
    rng = np.random.default_rng([seed, 0x10CA])
    images, masks, boxes = [], [], []
    for k in range(n):
        src = bank.images[int(rng.integers(len(bank)))]
        strength = 0.0 if rng.random() < WHOLE_SHARE else 1.0
        photo, info = simulate(src, np.random.default_rng([seed, 0x10CA, k]), strength=strength,
                               out_size=VIEW_SIZE, recipe=TRAINING)
        images.append(photo)
        masks.append(info.mask)
        boxes.append(info.box)
    return images, masks, boxes


def cell_targets(masks: list[np.ndarray], grid: tuple[int, int], spec: PreprocessSpec) -> torch.Tensor:
    """The share of each feature-map cell the product covers [N, h, w]: the mask seen through the same
    window of the photo the model's input shows (`crop_window`), box-averaged per cell."""
    h, w = grid
    out = []
    for m in masks:
        window = crop_window(m.shape[1], m.shape[0], spec)
        out.append(np.asarray(Image.fromarray(m.astype(np.float32), mode="F").resize(
            (w, h), Image.Resampling.BOX, box=window)))
    return torch.from_numpy(np.clip(np.stack(out), 0.0, 1.0).astype(np.float32))


@torch.no_grad()
def feature_maps(model: LookalikeModel, images: list[Image.Image], spec: PreprocessSpec, *,
                 device: torch.device, batch: int = 32) -> torch.Tensor:
    """The frozen backbone's last feature maps of `images`, kept in half precision (they are many)."""
    model.eval()
    maps = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(preprocess_batch(images[start:start + batch], spec)).to(device)
        maps.append(model.feature_map(x).to("cpu", torch.float16))
    return torch.cat(maps)


def box_iou(a: tuple, b: tuple) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def train_locator(model: LookalikeModel, bank: ImageBank, spec: PreprocessSpec, *, views: int, seed: int,
                  device: torch.device, steps: int = 400, batch: int = 64, lr: float = 2e-3) -> dict[str, Any]:
    """Give `model` a locator learnt from `views` simulated views of the bank's photos; its metrics."""
    torch.manual_seed(seed)
    images, masks, boxes = make_views(bank, views, seed)
    maps = feature_maps(model, images, spec, device=device)
    grid = (int(maps.shape[2]), int(maps.shape[3]))
    targets = cell_targets(masks, grid, spec)
    n_test = max(1, int(HELD_OUT_SHARE * len(images))) if len(images) >= 10 else 0
    fit = torch.arange(n_test, len(images))
    head = locator_head(int(maps.shape[1])).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    head.train()
    for step in range(steps):
        pick = fit[torch.randint(len(fit), (min(batch, len(fit)),), generator=gen)]
        logits = head(maps[pick].to(device).float()).squeeze(1)
        loss = F.binary_cross_entropy_with_logits(logits, targets[pick].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:  # cosine decay: the last steps settle
            group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        optimizer.step()
    head.eval()
    model.locator = head
    model.config.locator = True
    metrics: dict[str, Any] = {"views": len(images), "grid": list(grid), "steps": steps,
                               "final_loss": round(float(loss.detach()), 4), "recipe": TRAINING.name}
    if n_test:
        with torch.no_grad():
            probs = torch.sigmoid(head(maps[:n_test].to(device).float()).squeeze(1)).cpu().numpy()
        ious = []
        window = crop_window(VIEW_SIZE, VIEW_SIZE, spec)
        for prob, truth in zip(probs, boxes[:n_test]):
            found = box_from_objectness(prob)
            box = found.on_photo(VIEW_SIZE, VIEW_SIZE, window).box if found is not None else None
            ious.append(box_iou(box, truth) if box is not None and truth is not None else 0.0)
        metrics["held_out"] = {"views": n_test, "mean_iou": round(float(np.mean(ious)), 3),
                               "iou@0.5": round(float(np.mean(np.array(ious) >= 0.5)), 3)}
    log.info("locator: %d views, %s grid, held-out box IoU %s", len(images), grid, metrics.get("held_out"))
    return metrics
