"""HEIC at JPEG speed (lookalike/core/decoding.py `_draft_heif`): a HEIC decodes the smallest thumbnail it
embeds that still covers what the preprocessing needs, within a few levels of a full decode, and never a
thumbnail too small or of another shape. Fast: images are made in memory."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lookalike.core import decoding
from lookalike.core.decoding import decode_image, thumbnail_covers
from lookalike.core.preprocessing import PreprocessSpec, preprocess

SPEC = PreprocessSpec(size=112, resize=128)  # small sizes keep the HEIC encodes quick


def _photo(size: tuple[int, int] = (1024, 768), block: int = 4) -> Image.Image:
    """Real photographic detail at 1/`block` of `size`, each pixel repeated over a block x block square.

    libheif makes the thumbnails it writes by picking one pixel in every block (no filtering), where a phone
    scales its preview properly: on this picture both give the same thumbnail, so the test measures what
    the decoder does with a faithful thumbnail rather than the test encoder's scaler."""
    skdata = pytest.importorskip("skimage.data")
    small = (size[0] // block, size[1] // block)
    detail = Image.fromarray(skdata.astronaut()).convert("RGB").resize(small, Image.Resampling.LANCZOS)
    return detail.resize(size, Image.Resampling.NEAREST)


def _heic(img: Image.Image, thumbnails: list[int], **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="HEIF", quality=90, thumbnails=thumbnails, **kwargs)
    return buf.getvalue()


def _levels(a: Image.Image, b: Image.Image) -> np.ndarray:
    """Per-value difference of the model inputs made from two decodes, in 8-bit pixel levels."""
    return np.abs(preprocess(a, SPEC) - preprocess(b, SPEC)) * np.asarray(SPEC.std, np.float32)[:, None, None] * 255


def test_a_heic_decodes_its_smallest_covering_thumbnail_within_a_few_levels_of_a_full_decode():
    data = _heic(_photo(), [512, 256])  # 512x384 and 256x192: the second is the smallest that covers 128
    thumb = decode_image(data, min_side=SPEC.resize)
    full = decode_image(data)
    assert thumb.size == (256, 192) and full.size == (1024, 768)
    levels = _levels(full, thumb)
    print(f"thumbnail vs full decode of a HEIC -> {SPEC.size} px: mean {levels.mean():.2f} levels, "
          f"99th percentile {np.percentile(levels, 99):.1f}")
    assert levels.mean() < 2.0


def test_a_thumbnail_smaller_than_the_preprocessing_needs_is_not_used():
    photo = _photo()
    data = _heic(photo, [160])  # 160x120: its shorter side is under the 128 the preprocessing needs
    img = decode_image(data, min_side=SPEC.resize)
    plain = decode_image(_heic(photo, []), min_side=SPEC.resize)
    assert img.size == plain.size == (342, 256)  # the primary image, reduced by 3 as before
    assert np.array_equal(np.asarray(img), np.asarray(plain))
    # A smaller model's preprocessing is covered by the same thumbnail.
    assert decode_image(data, min_side=120).size == (160, 120)


def test_without_min_side_a_heic_is_decoded_whole():
    assert decode_image(_heic(_photo(), [256])).size == (1024, 768)


def test_the_thumbnail_of_a_rotated_heic_comes_back_upright_like_the_full_decode():
    upright = _photo((768, 1024))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter, as a phone held upright stores it
    data = _heic(upright.transpose(Image.Transpose.ROTATE_90), [256], exif=exif.tobytes())
    thumb, full = decode_image(data, min_side=SPEC.resize), decode_image(data)
    assert full.size == (768, 1024) and thumb.size == (192, 256)
    assert _levels(full, thumb).mean() < 2.0


@pytest.mark.parametrize("full, thumbnail, min_side, covers", [
    ((4032, 3024), (512, 384), 256, True),
    ((4032, 3024), (320, 240), 256, False),   # too small
    ((4032, 3024), (320, 240), 240, True),
    ((4032, 3024), (512, 288), 256, True),    # 16:9 from 4:3: another shape
    ((4032, 3024), (513, 385), 256, True),    # rounding of each side
    ((4032, 3024), (4032, 3024), 256, False),  # not smaller: nothing gained
])
def test_which_thumbnails_may_stand_in_for_the_image(full, thumbnail, min_side, covers):
    if thumbnail == (512, 288):
        covers = False  # its shorter side is 288 >= 256, but the aspect ratio differs
    assert thumbnail_covers(full, thumbnail, min_side) is covers


def test_a_thumbnail_of_another_shape_chosen_by_the_file_is_refused_and_the_image_decoded_whole():
    class Heic:
        """What the decoder sees of a HEIC whose draft picked a thumbnail of another aspect ratio."""
        info = {"thumbnails": [7]}
        size = (4032, 3024)

        def draft(self, mode, size):
            self.size = (512, 288)
            return mode, (0, 0, 512, 288)

    whole = object()
    assert decoding._draft_heif(Heic(), 256, lambda: whole) is whole
