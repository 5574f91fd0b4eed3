"""The one preprocessing: resize, crop and normalise an RGB image exactly as the model expects.

The spec lives in each model's `model.json` (written by training at export, read here by the
transformer), so training and serving cannot drift apart. Pillow and numpy only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any
from collections.abc import Sequence

import numpy as np
from PIL import Image

from lookalike.core.errors import InputError

_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class PreprocessSpec:
    size: int = 224  # the square input side the model sees
    resize: int = 256  # shorter side after resizing, before the centre crop (== size: no crop margin)
    crop: str = "center"  # "center" crop to size x size, or "none" (squash to size x size)
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # tf_efficientnet_lite* were trained with 0.5/0.5
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.interpolation not in _INTERPOLATION:
            raise InputError(f"unknown interpolation {self.interpolation!r}; use one of {sorted(_INTERPOLATION)}")
        if self.crop not in ("center", "none"):
            raise InputError(f"unknown crop {self.crop!r}; use 'center' or 'none'")
        if self.size <= 0 or self.resize < self.size:
            raise InputError(f"need 0 < size <= resize, got size={self.size} resize={self.resize}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        known = {k: data[k] for k in ("size", "resize", "crop", "interpolation") if k in data}
        for key in ("mean", "std"):
            if key in data:
                known[key] = tuple(float(v) for v in data[key])
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("extra")
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.size, self.size)


def crop_window(width: int, height: int, spec: PreprocessSpec) -> tuple[float, float, float, float]:
    """The part of a `width` x `height` photo the model's input shows, in source pixels (left, top, right,
    bottom): all of it when the spec squashes, the centre square that survives the crop otherwise."""
    if spec.crop == "none":
        return (0.0, 0.0, float(width), float(height))
    scale = spec.resize / min(width, height)
    new_w, new_h = max(spec.size, round(width * scale)), max(spec.size, round(height * scale))
    left, top = (new_w - spec.size) // 2, (new_h - spec.size) // 2
    sx, sy = width / new_w, height / new_h  # source pixels per resized pixel, as a whole-photo resize would use
    return (left * sx, top * sy, (left + spec.size) * sx, (top + spec.size) * sy)


def resize_and_crop(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """Geometric part of the preprocessing, on a PIL image (training augments after this step).

    With a centre crop, only the part of the photo that survives the crop is resampled (Pillow's `box`),
    at exactly the scale and offset of resizing the whole photo and then cropping: the same pixels within
    two levels of rounding, for about 60% of the work (every catalog photo and every query pays it)."""
    img = img.convert("RGB") if img.mode != "RGB" else img
    method = _INTERPOLATION[spec.interpolation]
    if spec.crop == "none":
        return img.resize((spec.size, spec.size), method)
    return img.resize((spec.size, spec.size), method, box=crop_window(*img.size, spec))


def normalize(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """An RGB image already at size x size → float32 CHW, normalised by the spec's mean and std."""
    std = np.asarray(spec.std, np.float32)
    arr = np.asarray(img, dtype=np.float32)
    arr *= 1.0 / (255.0 * std)  # (x/255 - mean)/std in two in-place passes
    arr -= np.asarray(spec.mean, np.float32) / std
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """RGB image → float32 [3, size, size], the model's input for one image."""
    return normalize(resize_and_crop(img, spec), spec)


def preprocess_batch(images: Sequence[Image.Image], spec: PreprocessSpec) -> np.ndarray:
    """Several RGB images → float32 [N, 3, size, size]."""
    if not images:
        return np.zeros((0, *spec.input_shape), np.float32)
    return np.stack([preprocess(img, spec) for img in images])
