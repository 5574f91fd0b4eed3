"""Boxes around the product in a photo: parsing an app's `box`, reading one off the locator's objectness
map, and cutting the photo to it. One place for the geometry the transformer, the predictor and the
benchmarks share, so the crop measured is the crop served.

A box is (x0, y0, x1, y1) as fractions of the upright photo's width and height, 0 at the top left.

The locator (lookalike.training.locator) gives, per cell of the backbone's last feature map, the
probability that the cell shows the product. `box_from_objectness` upsamples that map, keeps the pixels
above one half and boxes them; its confidence is how cleanly the product stands out (mean probability
inside the box minus mean outside). `Localisation.crop_box` then widens the box by a margin of context and
to a square (the model's preprocessing centre-crops a square: an elongated crop would lose the product's
ends), clamped to the photo.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from lookalike.core.errors import InputError

Box = tuple[float, float, float, float]
BOXES = "boxes"  # the predictor's output: the locator's box per image [N, 5] (x0, y0, x1, y1, confidence)
# An automatic crop searches fused (`fuse_embeddings`): the first call asks for the whole photos' embeddings
# (parameter WITH_EMBEDDINGS, output EMBEDDINGS), the crop's call sends them back (input FUSE [N, D] FP32).
WITH_EMBEDDINGS = "with_embeddings"
EMBEDDINGS = "embeddings"
FUSE = "fuse"

MIN_BOX_SIDE = 0.02  # a box narrower or lower than this share of the photo holds too few pixels to search
# A found box is searched only when the locator is this sure of it and it leaves out enough of the photo
# to matter; otherwise the whole photo is searched (a close-up fills the frame: nothing to cut away).
MIN_CONFIDENCE = 0.35
MAX_AREA = 0.8
# Context kept around the product, as a share of its box on each side. Measured (benchmarks/
# retrieval_quality.py, margins 0 and 0.12): the tight crop found more listings with every map, as the
# box read off the map already reaches past the product's edge (cells are 32 px).
MARGIN = 0.0
_UPSAMPLE = 8  # objectness cells are 32 px at 224 px input: boxes are read off an 8x finer map
# Ways to read a box off a map (benchmarks/retrieval_quality.py measures each beside the served "cells"):
# "cells": every pixel above the threshold; "otsu": above the map's own Otsu level; "peak": the connected
# region above the threshold around the peak; "mass": mean ± sqrt(3)·std of the map's mass above its
# median. Each is free of parameters tuned to a catalog.
BOX_RULES = ("cells", "otsu", "peak", "mass")


@dataclass(frozen=True)
class Localisation:
    """Where the locator sees the product, and whether the service searched it."""
    box: Box  # the product's box (fractions of the photo)
    confidence: float  # 0..1: mean objectness inside the box minus outside

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])

    @property
    def usable(self) -> bool:
        """Worth searching instead of the whole photo."""
        return self.confidence >= MIN_CONFIDENCE and self.area <= MAX_AREA

    def on_photo(self, width: int, height: int, window: tuple[float, float, float, float]) -> Localisation:
        """This box, found on the model's input, on the whole `width` x `height` photo (`from_input_box`)."""
        return Localisation(from_input_box(self.box, width, height, window), self.confidence)

    def crop_box(self, width: int, height: int, margin: float = MARGIN) -> Box:
        return context_box(self.box, width, height, margin)

    def to_dict(self) -> dict[str, Any]:
        return {"box": [round(v, 4) for v in self.box], "confidence": round(self.confidence, 3)}


def box_from_objectness(prob: np.ndarray, threshold: float = 0.5, rule: str = "cells") -> Localisation | None:
    """The box read off an objectness map (upsampled) by `rule` (BOX_RULES; the served one is "cells": the
    box of every pixel where the product is more likely than not); None if there is none."""
    prob = np.asarray(prob, dtype=np.float32)
    if prob.ndim != 2 or prob.size == 0 or not np.isfinite(prob).all():
        return None
    if rule not in BOX_RULES:
        raise ValueError(f"box rule must be one of {', '.join(BOX_RULES)}, got {rule!r}")
    h, w = prob.shape
    fine = np.asarray(Image.fromarray(prob, mode="F").resize((w * _UPSAMPLE, h * _UPSAMPLE),
                                                             Image.Resampling.BILINEAR))
    if rule == "mass":
        pixels = _mass_box(fine)
    else:
        inside = fine >= (otsu_threshold(fine) if rule == "otsu" else threshold)
        if rule == "peak":
            inside = peak_region(fine, inside)
        if not inside.any():
            return None
        ys, xs = np.nonzero(inside)
        pixels = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    if pixels is None:
        return None
    fh, fw = fine.shape
    px0, py0, px1, py1 = pixels
    box = (px0 / fw, py0 / fh, px1 / fw, py1 / fh)
    in_box = np.zeros(fine.shape, bool)
    in_box[py0:py1, px0:px1] = True
    outside = float(fine[~in_box].mean()) if (~in_box).any() else 0.0
    confidence = float(np.clip(fine[in_box].mean() - outside, 0.0, 1.0))
    return Localisation(box, confidence)


def otsu_threshold(values: np.ndarray, bins: int = 64) -> float:
    """The level that splits `values` into two classes of least spread within (Otsu's): a threshold read
    off the map's own distribution, so a map with a dim product or a bright background is cut where it
    separates, not at a fixed level. Infinite for a flat map: no level separates anything."""
    v = np.asarray(values, np.float64).ravel()
    low, high = float(v.min()), float(v.max())
    if high - low < 1e-6:
        return float("inf")
    hist, edges = np.histogram(v, bins=bins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(hist)
    above = below[-1] - below
    mass_below = np.cumsum(hist * centres)
    mean_below = mass_below / np.maximum(below, 1)
    mean_above = (mass_below[-1] - mass_below) / np.maximum(above, 1)
    return float(edges[1:][int(np.argmax(below * above * (mean_below - mean_above) ** 2))])


def peak_region(fine: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """The connected part of `inside` (4-neighbours) that holds the map's peak: one object, not the box of
    every hot patch (a second bright thing elsewhere in the scene would stretch that box over both)."""
    region = np.zeros_like(inside)
    if not inside.any():
        return region
    region[np.unravel_index(int(np.argmax(np.where(inside, fine, -np.inf))), fine.shape)] = True
    while True:  # grow by one pixel a round: at most the region's diameter rounds (a few hundred at most)
        grown = region.copy()
        grown[1:] |= region[:-1]
        grown[:-1] |= region[1:]
        grown[:, 1:] |= region[:, :-1]
        grown[:, :-1] |= region[:, 1:]
        grown &= inside
        if np.array_equal(grown, region):
            return region
        region = grown


def _mass_box(fine: np.ndarray) -> tuple[int, int, int, int] | None:
    """The box fitted to the map's mass above its median: mean ± sqrt(3) standard deviations on each axis,
    the extent of a uniformly bright box of that spread (no threshold to choose)."""
    weight = np.clip(fine - np.median(fine), 0, None).astype(np.float64)
    total = weight.sum()
    if total <= 0:
        return None
    spans = []
    for axis_weight in (weight.sum(0), weight.sum(1)):  # x, then y
        at = np.arange(len(axis_weight)) + 0.5
        mean = float((axis_weight * at).sum() / total)
        std = float(np.sqrt((axis_weight * (at - mean) ** 2).sum() / total))
        spans.append((max(0, int(np.floor(mean - np.sqrt(3) * std))),
                      min(len(axis_weight), int(np.ceil(mean + np.sqrt(3) * std)))))
    (x0, x1), (y0, y1) = spans
    return (x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))


def fuse_embeddings(whole: np.ndarray, crop: np.ndarray) -> np.ndarray:
    """The query an automatic crop searches with: the whole photo's and the crop's embeddings averaged and
    L2-normalised again (rows of unit vectors in, rows of unit vectors out). Measured better than the crop
    alone on cut-out products (training/locator_eval.py, `fused`): the crop brings the product's detail,
    the whole photo keeps what a tight or wrong box cut away. A row searched whole fuses with itself."""
    fused = np.asarray(whole, np.float32) + np.asarray(crop, np.float32)
    norms = np.linalg.norm(fused, axis=1, keepdims=True)
    return (fused / np.maximum(norms, 1e-12)).astype(np.float32)


def boxes_table(objectness: np.ndarray | None) -> np.ndarray | None:
    """The locator's box per image [N, 5] (fractions of the model's input, then the confidence; NaN where
    it sees no product): the predictor's `boxes` output. None without a locator."""
    if objectness is None:
        return None
    out = np.full((len(objectness), 5), np.nan, np.float32)
    for i, prob in enumerate(objectness):
        found = box_from_objectness(prob)
        if found is not None:
            out[i] = (*found.box, found.confidence)
    return out


def context_box(box: Box, width: int, height: int, margin: float = MARGIN) -> Box:
    """`box` widened by `margin` of its size on each side, then to a square in pixels, within the photo."""
    x0, y0, x1, y1 = (box[0] * width, box[1] * height, box[2] * width, box[3] * height)
    bw, bh = x1 - x0, y1 - y0
    side = min(max(bw, bh) * (1 + 2 * margin), float(width), float(height))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = float(np.clip(cx - side / 2, 0, width - side))
    top = float(np.clip(cy - side / 2, 0, height - side))
    # Never narrower than the box itself (a box longer than the photo's short side stays whole).
    left, right = min(left, x0), max(left + side, x1)
    top, bottom = min(top, y0), max(top + side, y1)
    return (left / width, top / height, min(right / width, 1.0), min(bottom / height, 1.0))


def parse_box(value: Any, shown: Any = None) -> Box | None:
    """An app's `box` parameter ("x0,y0,x1,y1" or four numbers) as fractions; None when not given.

    Fractions rather than pixels, as Google's product search takes normalised vertices: the app need not
    know how large the photo decodes (EXIF rotation, the DCT-domain downscale), only where the product is.
    """
    if value is None or value == "":
        return None
    try:
        parts = value.split(",") if isinstance(value, str) else list(value)
        box = tuple(float(p) for p in parts) if parts else ()
    except (TypeError, ValueError):
        box = ()
    described = shown if shown is not None else repr(value)[:80]
    if len(box) != 4 or not all(0.0 <= v <= 1.0 for v in box):
        raise InputError(f"parameter 'box' must be 'x0,y0,x1,y1', four fractions of the photo's width and height "
                         f"between 0 and 1 (e.g. '0.25,0.1,0.75,0.9'), got {described}")
    x0, y0, x1, y1 = box
    if x1 - x0 < MIN_BOX_SIDE or y1 - y0 < MIN_BOX_SIDE:
        raise InputError(f"parameter 'box' {described} is empty or smaller than {MIN_BOX_SIDE:.0%} of the photo on a "
                         f"side: x1 must exceed x0 and y1 must exceed y0")
    return box  # type: ignore[return-value]


def crop_to_box(img: Image.Image, box: Box) -> Image.Image:
    """The part of a decoded photo inside a `box` of fractions (at least one pixel on each side)."""
    w, h = img.size
    left, top = min(w - 1, int(box[0] * w)), min(h - 1, int(box[1] * h))
    return img.crop((left, top, max(left + 1, round(box[2] * w)), max(top + 1, round(box[3] * h))))


def from_input_box(box: Box, width: int, height: int, window: tuple[float, float, float, float]) -> Box:
    """A box found on the model's input (fractions of it) as fractions of the whole photo, given the
    input's `window` on the photo in pixels (lookalike.core.preprocessing.crop_window)."""
    left, top, right, bottom = window
    ww, wh = right - left, bottom - top
    return (float(np.clip((left + box[0] * ww) / width, 0, 1)), float(np.clip((top + box[1] * wh) / height, 0, 1)),
            float(np.clip((left + box[2] * ww) / width, 0, 1)), float(np.clip((top + box[3] * wh) / height, 0, 1)))
