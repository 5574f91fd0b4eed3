"""The automatic crop: search the product the predictor's locator found, with the whole photo around it.

    photo ─▶ decode ─▶ preprocess ─▶ predictor (embedding, search and the locator's box, one pass)
                                        │ box usable (sure enough, and it leaves part of the photo out)?
                                        ├─ no: the whole photo's answer stands
                                        └─ yes: crop the decoded photo to the box with some context,
                                           preprocess, ask the predictor again with the whole photo's
                                           embedding: the crop's and the whole photo's embeddings fused
                                           (`lookalike.core.boxes.fuse_embeddings`) are searched

At most one extra model pass, only for photos the locator is sure of. An app's own `box` wins (no
locator box is used), and `crop=off` searches the whole photo. The answer always says which box was
searched, as fractions of the upright photo, so an app can draw it. The geometry is
`lookalike.core.boxes` (the benchmarks measure the same crop).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from lookalike.core.boxes import Box, Localisation, crop_to_box, parse_box
from lookalike.core.errors import InputError
from lookalike.core.preprocessing import PreprocessSpec, crop_window
from lookalike.serving.errors import BadInput
from lookalike.serving.protocol import shown

CROP = "crop"  # request parameter: "auto" (default) or "off"
CROP_MODES = ("auto", "off")
# Photos are decoded a little larger when they may be cropped, so a crop of two thirds of the photo still
# has the pixels the model's input needs (a 12-MP JPEG still decodes at 1/8 scale in the DCT domain).
CROP_DECODE_SCALE = 1.4
WHOLE = (0.0, 0.0, 1.0, 1.0)
# Content-key suffixes (lookalike.serving.photo_cache): a photo asked with the automatic crop never shares
# an answer with crop=off, and the answer of its crop is kept under a key of its own.
AUTO_CROP_KEY = ".auto"
CROPPED_KEY = ".crop"


def box_and_crop(params: dict) -> tuple[Box | None, str]:
    """The request's `box` (fractions of the upright photo; None: not given) and `crop` mode, checked: a
    400 that says what to send otherwise."""
    box = params.get("box")
    if box not in (None, "") and not isinstance(box, str):
        raise BadInput(f"parameter 'box' must be a string 'x0,y0,x1,y1', got {shown(box)}")
    try:
        box = parse_box(box, shown(box))
    except InputError as exc:
        raise BadInput(str(exc)) from None
    mode = params.get(CROP)
    mode = "auto" if mode in (None, "") else str(mode).strip().lower()
    if mode not in CROP_MODES:
        raise BadInput(f"parameter 'crop' must be 'auto' (search the product the model finds) or 'off' (search "
                       f"the whole photo), got {shown(params.get(CROP))}")
    return box, mode


@dataclass(frozen=True)
class Searched:
    """Which part of one photo was searched, for the answer (boxes as fractions of the upright photo)."""
    box: Box  # where the product is: the locator's box, the app's box, or the whole photo
    source: str  # "crop": the locator's box was searched; "whole": the whole photo; "app": the app's own box
    confidence: float | None = None  # the locator's, where it found a box
    region: Box | None = None  # with "crop": the part searched (the box with context, squared)
    found: Box | None = None  # with "whole": the locator's box, not used (unsure, or nearly the whole photo)

    def to_dict(self) -> dict:
        out: dict = {"box": [round(v, 4) for v in self.box], "searched": self.source}
        if self.confidence is not None:
            out["confidence"] = round(self.confidence, 3)
        for name, box in (("region", self.region), ("found", self.found)):
            if box is not None:
                out[name] = [round(v, 4) for v in box]
        return out

    def row(self) -> list[float]:
        """As the `boxes` output's row: x0, y0, x1, y1, confidence (NaN when there is none)."""
        return [*self.box, np.nan if self.confidence is None else self.confidence]


def locate(boxes: np.ndarray, images: list[Image.Image], spec: PreprocessSpec) -> list[Localisation | None]:
    """The predictor's boxes (fractions of the model's input) as boxes on each decoded photo."""
    out: list[Localisation | None] = []
    for row, img in zip(np.asarray(boxes, dtype=np.float32).reshape(-1, 5), images):
        if not np.isfinite(row).all():
            out.append(None)
            continue
        found = Localisation(tuple(float(v) for v in row[:4]), float(row[4]))
        out.append(found.on_photo(*img.size, crop_window(*img.size, spec)))
    return out


def plan_crops(images: list[Image.Image], located: list[Localisation | None]
               ) -> tuple[list[Image.Image], list[Searched]]:
    """The photos to search again (the crop where the box is usable, else the photo itself) and what each
    searched; nothing to search again when no box is usable (the first answer stands)."""
    photos, searched = [], []
    for img, loc in zip(images, located):
        if loc is not None and loc.usable:
            crop = loc.crop_box(*img.size)
            photos.append(crop_to_box(img, crop))
            searched.append(Searched(loc.box, "crop", loc.confidence, region=crop))
        else:
            photos.append(img)
            searched.append(Searched(WHOLE, "whole", None if loc is None else loc.confidence,
                                     found=None if loc is None else loc.box))
    return photos, searched
