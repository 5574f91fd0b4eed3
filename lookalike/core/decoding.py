"""Turning untrusted bytes into an upright sRGB image: the one decode path of serving, training and indexing.

Serving (transformer/server.py), training and indexing (lookalike/catalogs/rows.py `Catalog.load_image`) all decode
here, so the same bytes give the same pixels everywhere. Limits are checked from the header, before any pixel
is decoded: per image (`ImageLimits`), and per request through a budget of decoded pixels (`decode_images`,
`PixelBudget`). Given the smallest side the model's preprocessing needs (`min_side`), a JPEG is decoded in
the DCT domain at 1/2, 1/4 or 1/8 scale and other formats are reduced by an integer factor right after
decoding, so a 12-MP phone photo costs a fraction of a full-resolution decode. Callers that pass the same
`min_side` get the same pixels: serving and indexing pass the model's `PreprocessSpec.resize`.

Every failure is an `ImageError` whose `status` is the HTTP status a server should answer with
(400 for bad input, 413 for input too large), and whose message a shopper's app can show.
"""
from __future__ import annotations

import io
import operator
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import pillow_heif
from PIL import Image, ImageCms, UnidentifiedImageError

from lookalike.core.errors import InputError

# HEIC/HEIF (what iPhones upload) through libheif; Pillow decodes AVIF itself. Depth maps and auxiliary
# images are never what a search looks at, so they are not even read. Embedded thumbnails are listed (not
# decoded): one that still covers what the preprocessing needs is decoded instead of the primary image
# (`_draft_heif`), HEIC's counterpart of the JPEG draft.
pillow_heif.register_heif_opener(thumbnails=True, depth_images=False, aux_images=False)

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "AVIF", "HEIF")
_EXPECTED = "JPEG, PNG, WebP, HEIC or AVIF"

# Formats we refuse, named by their first bytes so the message says what was sent. Only the allowed formats'
# parsers ever see the bytes.
_OTHER_FORMATS = ((b"GIF8", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
                  (b"%PDF", "PDF"), (b"8BPS", "PSD"), (b"\x00\x00\x01\x00", "ICO"), (b"<svg", "SVG"),
                  (b"<?xml", "SVG or XML"))

# EXIF orientation -> the transpose that makes the stored pixels upright (as ImageOps.exif_transpose does).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ORIENTATION_TAG = 0x0112
_REDUCING_GAP = 2  # integer reduction keeps at least this many times min_side (see _decode)


class ImageError(InputError):
    """Bytes that are not an image we accept, or one past a limit (`status` 413)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ImageLimits:
    # Per encoded image: a 12-MP phone JPEG is 3-6 MB, a HEIC 1-3 MB. With max_images this sizes the request
    # body cap, and so the transformer's memory per request (docs/capacity.md).
    max_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 40_000_000  # width * height of one image, checked from the header before decoding
    max_side: int = 12_000
    max_images: int = 8  # per request
    # Decoded pixels of a whole request, counted from the headers before anything is decoded: four 12-MP
    # phone photos (4 x 4032 x 3024 = 48.8 MP) pass; eight 36-MP images (288 MP, ~6 s of CPU and ~0.9 GB
    # of RAM as PNGs) are refused with 413 before a pixel is decoded.
    max_request_pixels: int = 50_000_000
    # Claimed pixels per encoded byte, for images of at least `pixels_per_byte_from` pixels: a header that
    # promises far more pixels than the bytes can carry is not a photo (a 631-byte JPEG claiming 6000x6000 is
    # 57,000 px/byte; a 4.4 KB 1-bit PNG of 6000x6000 is 8,100). Measured on 4032x3024 images: the sample
    # photos of scikit-image and matplotlib (upscaled, so smoother than any phone photo) at most 23 px/byte
    # as JPEG q90, 37 as JPEG q75, 127 as WebP q80, 76 as HEIC q50, 174 as AVIF q50 (as shipped: 0.3-7.4);
    # a flat-colour JPEG at q95 64 (170 optimised, 254 grey); a flat-colour PNG 286 (grey 659); a product
    # photo pasted on a white 12-MP canvas up to 57 as JPEG, 370 as WebP, 642 as HEIC and 1,746 as AVIF
    # when the product covers 0.5% of it. Only blank images go beyond (flat WebP-lossless, AVIF, HEIC: 1,500-
    # 23,000 px/byte): nothing to search with.
    max_pixels_per_byte: float = 2_000.0
    pixels_per_byte_from: int = 4_000_000
    formats: tuple[str, ...] = ALLOWED_FORMATS


class PixelBudget:
    """The decoded pixels one request may spend (`ImageLimits.max_request_pixels`); make one per request."""

    def __init__(self, limits: ImageLimits = ImageLimits()):
        self.limit = limits.max_request_pixels
        self.spent = 0

    def charge(self, pixels: int, name: str = "the image") -> None:
        """Spend `pixels` (an image's width x height, from its header) or raise 413 if the budget is passed."""
        if self.spent + pixels > self.limit:
            raise ImageError(
                f"{name} would bring the request's photos to {self.spent + pixels:,} decoded pixels; the budget "
                f"is {self.limit:,} pixels per request (max_request_pixels): send fewer or smaller photos",
                status=413)
        self.spent += pixels


def decode_image(data: bytes, limits: ImageLimits = ImageLimits(), name: str = "image", *,
                 min_side: int | None = None, budget: PixelBudget | None = None) -> Image.Image:
    """Decode JPEG/PNG/WebP/HEIC/AVIF bytes into an upright sRGB `RGB` image.

    With `min_side` (the shorter side the preprocessing resizes to, `PreprocessSpec.resize`), the image is
    decoded at a reduced size whose shorter side stays >= `min_side` (or its own, if smaller): JPEGs by DCT
    scaling (1/2, 1/4, 1/8, the largest that keeps min_side), other formats by an integer box reduction after
    decoding that keeps 2 x min_side. Without it (None), full resolution. `budget`, if given, is charged with
    the header's pixels before decoding.
    """
    min_side = _min_side(min_side)
    with _image_errors(name):
        img = _open(data, limits, name)
        if budget is not None:
            budget.charge(img.width * img.height, name)
        return _decode(img, min_side, lambda: _open(data, limits, name))


def decode_images(items: Sequence[bytes], limits: ImageLimits = ImageLimits(), *,
                  min_side: int | None = None, names: Sequence[str] | None = None) -> list[Image.Image]:
    """Decode the photos of one request, as `decode_image` does each, within the request's pixel budget.

    Every header is read and checked, and the request's decoded pixels counted, before any image is decoded:
    a request past a limit costs next to nothing. Images are named "the image" (one) or "image <i>" in
    messages unless `names` are given.
    """
    min_side = _min_side(min_side)
    if len(items) > limits.max_images:
        raise ImageError(f"{len(items)} images in one request; the limit is {limits.max_images} - split the "
                         "request", status=413)
    if names is None:
        names = ["the image"] if len(items) == 1 else [f"image {i}" for i in range(len(items))]
    opened = []
    for data, name in zip(items, names, strict=True):
        with _image_errors(name):
            opened.append(_open(data, limits, name))
    total = sum(img.width * img.height for img in opened)
    if total > limits.max_request_pixels:
        raise ImageError(
            f"the {len(items)} photos of this request hold {total:,} pixels together; the budget is "
            f"{limits.max_request_pixels:,} decoded pixels per request (max_request_pixels): send fewer or "
            "smaller photos", status=413)
    images = []
    for img, data, name in zip(opened, items, names):
        with _image_errors(name):
            images.append(_decode(img, min_side, lambda data=data, name=name: _open(data, limits, name)))
    return images


# ---- the steps ---------------------------------------------------------------------------------------------

def _min_side(min_side: int | None) -> int | None:
    """A caller's `min_side` as an int (numpy ints welcome); a bad one is a bug of the caller, not a 400."""
    if min_side is None:
        return None
    side = operator.index(min_side)
    if side < 1:
        raise ValueError(f"min_side must be a positive number of pixels or None, got {min_side!r}")
    return side


@contextmanager
def _image_errors(name: str) -> Iterator[None]:
    """Every failure of a decoder becomes an ImageError: 413 for a bomb, 400 for anything unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name} is not an image we can read ({_EXPECTED} expected)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name} is too large to decode safely: {exc}", status=413) from exc
    except (OSError, SyntaxError, ValueError, EOFError, RuntimeError) as exc:
        # Truncated or corrupt data: Pillow's LOAD_TRUNCATED_IMAGES stays off, so a photo cut short fails
        # here instead of decoding grey padding. Pillow's AVIF decoder reports some broken files as RuntimeError.
        raise ImageError(f"{name} is corrupt or truncated: {exc}") from exc


def _open(data: bytes, limits: ImageLimits, name: str) -> Image.Image:
    """Parse the header only, and check it against the per-image limits."""
    if not data:
        raise ImageError(f"{name} is empty: send the photo's encoded bytes ({_EXPECTED})")
    if len(data) > limits.max_bytes:
        raise ImageError(f"{name} is {len(data):,} bytes; the limit is {limits.max_bytes:,}", status=413)
    head = bytes(data[:16])
    refused = next((fmt for magic, fmt in _OTHER_FORMATS if head.startswith(magic)), None)
    if refused is not None:
        raise ImageError(f"{name} is {refused}; send one of {_EXPECTED}")
    Image.init()
    formats = [fmt for fmt in limits.formats if fmt in Image.OPEN]
    img = Image.open(io.BytesIO(data), formats=formats)
    width, height = img.size
    pixels = width * height
    if pixels <= 0:
        raise ImageError(f"{name} has no pixels ({width}x{height})")
    if pixels > limits.max_pixels or max(width, height) > limits.max_side:
        raise ImageError(f"{name} is {width}x{height} pixels; the limit is {limits.max_pixels:,} pixels and "
                         f"{limits.max_side:,} per side", status=413)
    if pixels >= limits.pixels_per_byte_from and pixels > limits.max_pixels_per_byte * len(data):
        raise ImageError(f"{name}'s header claims {width}x{height} = {pixels:,} pixels for {len(data):,} bytes: "
                         f"not a real photo (at most {limits.max_pixels_per_byte:,.0f} pixels per byte are "
                         "accepted)")
    return img


def _decode(img: Image.Image, min_side: int | None, reopen: Callable[[], Image.Image]) -> Image.Image:
    """Decode an opened image (reduced when `min_side` allows), to upright sRGB RGB; `reopen` opens the
    same bytes afresh (a HEIC whose thumbnail is refused after the draft is decoded whole from it)."""
    if min_side is not None and img.format in ("JPEG", "MPO"):  # MPO: a JPEG with more pictures after it
        # DCT-domain scaling: Pillow picks the largest of 1/8, 1/4, 1/2 that keeps both sides >= min_side.
        img.draft("RGB", (min_side, min_side))
    elif min_side is not None and img.format == "HEIF":
        img = _draft_heif(img, min_side, reopen)
    img.load()
    orientation = _orientation(img)
    icc = img.info.get("icc_profile")
    img = _reducible(img)
    if min_side is not None:
        # A box average by an integer factor (sides round up), leaving the shorter side >= 2 x min_side: the
        # bicubic resize of the preprocessing then still antialiases (Pillow's "reducing gap"). Reducing right
        # down to min_side moved an 80-px model's input by 6.9 levels (of 255) on average from a full decode;
        # with the gap, 0.95.
        factor = min(img.size) // (_REDUCING_GAP * min_side)
        if factor >= 2:
            img = img.reduce(factor)
    img = _to_srgb(img, icc)
    if orientation in _UPRIGHT:
        img = img.transpose(_UPRIGHT[orientation])
    return img


def _draft_heif(img: Image.Image, min_side: int, reopen: Callable[[], Image.Image]) -> Image.Image:
    """A HEIC set to decode its smallest embedded thumbnail whose shorter side is >= min_side, else as it was.

    HEVC has no reduced-resolution decode: a 12-MP HEIC costs about 1.3 s of libheif on this project's
    2-core reference machine, 60x its DCT-scaled JPEG, while the thumbnail a phone embeds decodes in the
    time of that JPEG. pillow-heif's draft picks the smallest thumbnail that is a scaled copy of the primary
    image (same mode, aspect ratio, crop, rotation and mirroring, colour profile) and at least `min_side` on
    both sides; `thumbnail_covers` checks its choice again, so a thumbnail too small or of another shape
    is never what a search sees, whatever the file claims.
    """
    full = img.size
    if not img.info.get("thumbnails") or img.draft(None, (min_side, min_side)) is None:
        return img
    if thumbnail_covers(full, img.size, min_side):
        return img
    return reopen()  # the draft cannot be undone on this object: decode the primary image from the bytes


def thumbnail_covers(full: tuple[int, int], thumbnail: tuple[int, int], min_side: int) -> bool:
    """Whether a thumbnail of size `thumbnail` can stand in for an image of size `full` when the
    preprocessing needs `min_side` pixels on the shorter side: smaller than the image, its shorter side
    at least min_side, and the same aspect ratio (up to the rounding of each side to whole pixels)."""
    (w, h), (tw, th) = full, thumbnail
    if min(tw, th) < min_side or tw * th >= w * h:
        return False
    return abs(tw * h - th * w) <= max(w, h)


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1 = upright); broken EXIF never fails a photo whose pixels are fine."""
    try:
        return int(img.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - any EXIF parse error: the pixels are still good
        return 1


def _reducible(img: Image.Image) -> Image.Image:
    """L, RGB or CMYK (what Image.reduce and the colour transform take); alpha is dropped, as it always was."""
    if img.mode in ("L", "RGB", "CMYK"):
        return img
    if img.mode in ("1", "LA"):
        return img.convert("L")
    return img.convert("RGB")


def _to_srgb(img: Image.Image, icc: bytes | None) -> Image.Image:
    """Convert by the embedded ICC profile to sRGB (Display P3 from iPhones, Adobe RGB from cameras...).

    Skipped silently when there is no profile, it is already sRGB, or it is unreadable or does not fit the
    image's mode: a photo never fails for its colour profile.
    """
    if icc:
        icc = bytes(icc)
        # Display profiles are a few KB and recur (every iPhone photo carries the same Display P3): cached. A
        # large one (a client may send up to max_bytes of it) is built once and not kept.
        build = _cached_transform_to_srgb if len(icc) <= 64 * 1024 else _transform_to_srgb
        transform = build(icc, img.mode)
        if transform is not None:
            try:
                return ImageCms.applyTransform(img, transform)
            except (ImageCms.PyCMSError, OSError, ValueError):
                pass
    return img if img.mode == "RGB" else img.convert("RGB")


def _transform_to_srgb(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        description = (profile.profile.profile_description or "").lower()
        if "srgb" in description:
            return None
        return ImageCms.buildTransform(profile, _srgb(), mode, "RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError, AttributeError):
        return None


_cached_transform_to_srgb = lru_cache(maxsize=32)(_transform_to_srgb)


@lru_cache(maxsize=1)
def _srgb() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
