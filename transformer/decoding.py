"""Turning untrusted bytes into an RGB image, with limits checked before any pixel is decoded.

Every failure is an `ImageError` whose `status` is the HTTP status a server should answer with
(400 for bad input, 413 for input too large), and whose message a shopper's app can show.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")


class ImageError(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 10 * 1024 * 1024  # per encoded image
    max_pixels: int = 40_000_000  # width * height, checked from the header before decoding
    max_side: int = 12_000
    max_images: int = 16  # per request
    formats: tuple[str, ...] = ALLOWED_FORMATS


def decode_image(data: bytes, limits: ImageLimits = ImageLimits(), name: str = "image") -> Image.Image:
    """Decode JPEG/PNG/WebP bytes into an RGB image, upright per its EXIF orientation."""
    if not data:
        raise ImageError(f"{name} is empty: send the photo's encoded bytes (JPEG, PNG or WebP)")
    if len(data) > limits.max_bytes:
        raise ImageError(f"{name} is {len(data):,} bytes; the limit is {limits.max_bytes:,}", status=413)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            width, height = img.size
            if fmt not in limits.formats:
                raise ImageError(f"{name} is {fmt or 'an unknown format'}; send one of {', '.join(limits.formats)}")
            # The header alone tells the size: refuse bombs before a single pixel is decompressed.
            if width * height > limits.max_pixels or max(width, height) > limits.max_side:
                raise ImageError(
                    f"{name} is {width}x{height} pixels; the limit is {limits.max_pixels:,} pixels and "
                    f"{limits.max_side} per side", status=413)
            img.load()
            img = ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise ImageError(f"{name} is not an image we can read (JPEG, PNG or WebP expected)") from exc
        raise ImageError(f"{name} is too large to decode safely: {exc}", status=413) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{name} is corrupt or truncated: {exc}") from exc
    return img.convert("RGB") if img.mode != "RGB" else img
