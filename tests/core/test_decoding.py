"""The one decode path (lookalike/core/decoding.py): draft decoding to what the preprocessing needs, EXIF
orientation, ICC profiles to sRGB, HEIC and AVIF, the per-image and per-request limits, and every kind of bad
input. Fast: images are made in memory, no servers."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageFile

from lookalike.catalogs.rows import Catalog, CatalogRow
from lookalike.core.decoding import ImageError, ImageLimits, PixelBudget, decode_image, decode_images
from lookalike.core.preprocessing import PreprocessSpec, preprocess

PHONE = (4032, 3024)  # a 12-MP phone photo
ORIENTATIONS = range(1, 9)
# The transpose that turns the upright picture into what a camera stores with each EXIF orientation (the
# inverse of what a viewer applies).
_STORED = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
           7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}
QUADRANTS = {"top left": (220, 30, 30), "top right": (30, 200, 30), "bottom left": (30, 30, 220),
             "bottom right": (240, 240, 240)}


def _encode(img: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _quadrants(width: int, height: int) -> Image.Image:
    """An upright picture whose four quadrants have four colours: any rotation or flip shows."""
    img = Image.new("RGB", (width, height))
    w2, h2 = width // 2, height // 2
    boxes = {"top left": (0, 0, w2, h2), "top right": (w2, 0, width, h2), "bottom left": (0, h2, w2, height),
             "bottom right": (w2, h2, width, height)}
    for where, box in boxes.items():
        img.paste(QUADRANTS[where], box)
    return img


def _assert_upright(img: Image.Image) -> None:
    arr = np.asarray(img, dtype=np.int16)
    h, w = arr.shape[:2]
    centres = {"top left": (h // 4, w // 4), "top right": (h // 4, 3 * w // 4),
               "bottom left": (3 * h // 4, w // 4), "bottom right": (3 * h // 4, 3 * w // 4)}
    for where, (y, x) in centres.items():
        assert np.abs(arr[y, x] - QUADRANTS[where]).max() <= 12, (where, arr[y, x].tolist())


def _as_camera_stores_it(upright: Image.Image, orientation: int, fmt: str = "JPEG", **kwargs) -> bytes:
    stored = upright.transpose(_STORED[orientation]) if _STORED[orientation] is not None else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(stored, fmt, exif=exif.tobytes(), **kwargs)


def _sample_photos() -> list[Image.Image]:
    data = pytest.importorskip("skimage.data")
    return [Image.fromarray(f()).convert("RGB") for f in
            (data.astronaut, data.coffee, data.chelsea, data.rocket, data.brick,
             data.grass, data.gravel, data.camera)]


def _phone_like_photo() -> Image.Image:
    """4032x3024 of real photographic detail: scikit-image's sample photos tiled at their own resolution
    (an upscaled photo would be smoother than a phone's, and flatter the draft decode)."""
    photos = _sample_photos()
    canvas = Image.new("RGB", PHONE)
    x = y = row_h = k = 0
    while y < PHONE[1]:
        tile = photos[k % len(photos)]
        k += 1
        canvas.paste(tile, (x, y))
        x, row_h = x + tile.width, max(row_h, tile.height)
        if x >= PHONE[0]:
            x, y, row_h = 0, y + row_h, 0
    return canvas


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (the classic decompression bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A real 16x16 JPEG whose frame header is edited to claim width x height: ~630 bytes."""
    data = bytearray(_encode(Image.new("RGB", (16, 16), (120, 90, 60)), quality=75))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _rgb_profile(description: str, red, green, blue, gamma: float = 2.2) -> bytes:
    """An ICC v2 matrix/TRC display profile (what Adobe RGB or Display P3 profiles are), built byte by byte."""
    def s15(v: float) -> bytes:
        return struct.pack(">i", round(v * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ \0\0\0\0" + s15(x) + s15(y) + s15(z)

    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"
    text = description.encode() + b"\0"
    desc = (b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + struct.pack(">IIHB", 0, 0, 0, 0) +
            b"\0" * 67)
    d50 = (0.9642, 1.0, 0.8249)
    tags = [(b"desc", desc), (b"cprt", b"text\0\0\0\0public domain\0"), (b"wtpt", xyz(*d50)),
            (b"rXYZ", xyz(*red)), (b"gXYZ", xyz(*green)), (b"bXYZ", xyz(*blue)),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    start = 128 + 4 + 12 * len(tags)
    table, body = struct.pack(">I", len(tags)), b""
    for sig, tag in tags:
        table += sig + struct.pack(">II", start + len(body), len(tag))
        body += tag + b"\0" * (-len(tag) % 4)
    header = (struct.pack(">I", start + len(body)) + b"\0" * 4 + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ " +
              b"\0" * 12 + b"acsp" + b"\0" * 24 + b"\0" * 4 + s15(d50[0]) + s15(d50[1]) + s15(d50[2]) +
              b"\0" * 48)
    assert len(header) == 128
    return header + table + body


# Adobe RGB (1998) primaries, adapted to D50 as in its ICC profile; sRGB's, as lcms's built-in sRGB has them.
ADOBE_RGB = ((0.6097, 0.3111, 0.0195), (0.2053, 0.6257, 0.0609), (0.1492, 0.0632, 0.7446))
SRGB_D50 = ((0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141))


def _adobe_to_srgb(rgb) -> np.ndarray:
    """The colour conversion done by hand: Adobe RGB values -> linear -> XYZ (D50) -> linear sRGB -> sRGB."""
    linear = (np.asarray(rgb, np.float64) / 255) ** (round(2.2 * 256) / 256)
    xyz = np.asarray(ADOBE_RGB).T @ linear
    srgb = np.clip(np.linalg.solve(np.asarray(SRGB_D50).T, xyz), 0, 1)
    encoded = np.where(srgb <= 0.0031308, 12.92 * srgb, 1.055 * srgb ** (1 / 2.4) - 0.055)
    return encoded * 255


# ---- what comes out: size, orientation, colour, formats ----------------------------------------------------

@pytest.mark.parametrize("upright_size", [PHONE, PHONE[::-1], (1001, 667), (640, 480), (300, 200)])
def test_draft_keeps_the_shorter_side_at_least_min_side_in_every_orientation(upright_size):
    upright = _quadrants(*upright_size)
    for orientation in ORIENTATIONS:
        data = _as_camera_stores_it(upright, orientation, quality=90)
        full = decode_image(data)
        assert full.size == upright_size and full.mode == "RGB"
        _assert_upright(full)
        for min_side in (80, 224, 256):
            img = decode_image(data, min_side=min_side)
            short = min(img.size)
            assert min_side <= short or short == min(upright_size), (orientation, min_side, img.size)
            if min(upright_size) >= 8 * min_side:
                assert short < 4 * min_side, (orientation, min_side, img.size)  # it was reduced
            assert (img.width > img.height) == (upright_size[0] > upright_size[1])
            _assert_upright(img)
    if max(upright_size) == max(PHONE):  # a 12-MP JPEG for a 256-px resize: 1/8 scale in the DCT domain
        assert decode_image(_as_camera_stores_it(upright, 6), min_side=256).size == (upright_size[0] // 8,
                                                                                     upright_size[1] // 8)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "HEIF", "AVIF"])
def test_other_formats_are_reduced_by_an_integer_factor_keeping_min_side(fmt):
    data = _encode(_quadrants(1001, 667), fmt, **({} if fmt == "PNG" else {"quality": 90}))
    assert decode_image(data).size == (1001, 667)
    # Reduced by short // (2 x min_side): the bicubic resize that follows keeps antialiasing.
    for min_side, expected in ((80, (251, 167)), (160, (501, 334)), (224, (1001, 667)), (1000, (1001, 667))):
        img = decode_image(data, min_side=min_side)
        assert img.size == expected and img.mode == "RGB", (fmt, min_side)
        _assert_upright(img)


def test_exif_orientation_6_comes_back_upright():
    upright = _quadrants(60, 40)
    data = _as_camera_stores_it(upright, 6, quality=95)
    assert Image.open(io.BytesIO(data)).size == (40, 60)  # stored on its side, as a phone held upright does
    img = decode_image(data)
    assert img.size == (60, 40)
    _assert_upright(img)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "AVIF", "HEIF"])
def test_exif_orientation_is_applied_in_every_format(fmt):
    img = decode_image(_as_camera_stores_it(_quadrants(64, 48), 6, fmt, **({} if fmt == "PNG" else {"quality": 95})))
    assert img.size == (64, 48)
    _assert_upright(img)


def test_heic_round_trip():
    photo = _sample_photos()[0].resize((640, 640))
    data = _encode(photo, "HEIF", quality=90)
    assert Image.open(io.BytesIO(data)).format == "HEIF"
    img = decode_image(data, name="the iPhone photo")
    assert img.size == (640, 640) and img.mode == "RGB"
    assert np.abs(np.asarray(img, np.float32) - np.asarray(photo, np.float32)).mean() < 6
    assert decode_image(data, min_side=160).size == (320, 320)
    with pytest.raises(ImageError) as err:
        decode_image(data[: len(data) * 2 // 3], name="the iPhone photo")
    assert err.value.status == 400 and "the iPhone photo" in str(err.value)


def test_avif_round_trip():
    photo = _sample_photos()[0].resize((320, 320))
    data = _encode(photo, "AVIF", quality=90)
    img = decode_image(data)
    assert img.size == (320, 320) and img.mode == "RGB"
    assert np.abs(np.asarray(img, np.float32) - np.asarray(photo, np.float32)).mean() < 6


def test_multi_picture_jpegs_decode_their_main_picture_with_draft():
    # Phones write MPO (MPF) JPEGs: Ultra HDR gain maps, depth, stereo; Pillow calls them "MPO".
    main, extra = _quadrants(2000, 1500), Image.new("RGB", (500, 400), (0, 0, 255))
    data = _encode(main, "MPO", save_all=True, append_images=[extra])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert decode_image(data).size == (2000, 1500)
    img = decode_image(data, min_side=200)
    assert img.size == (500, 375)  # 1/4 in the DCT domain
    _assert_upright(img)


def test_an_adobe_rgb_profile_is_converted_to_srgb():
    profile = _rgb_profile("Adobe RGB (1998)-like", *ADOBE_RGB)
    colours = [(120, 160, 100), (200, 60, 40), (40, 90, 200), (128, 128, 128)]
    img = Image.new("RGB", (len(colours), 1))
    img.putdata(colours)
    converted = np.asarray(decode_image(_encode(img, "PNG", icc_profile=profile)), np.float64)[0]
    expected = np.stack([_adobe_to_srgb(c) for c in colours])
    assert np.abs(converted - expected).max() <= 2.5, (converted.tolist(), expected.round(1).tolist())
    assert np.abs(converted - np.asarray(colours)).max() >= 20  # the conversion did something
    # A phone JPEG with the profile, draft-decoded, converts the same way.
    big = img.resize((1600, 1200), Image.Resampling.NEAREST)
    jpeg = decode_image(_encode(big, quality=98, icc_profile=profile), min_side=200)
    assert min(jpeg.size) >= 200
    assert np.abs(np.asarray(jpeg, np.float64)[jpeg.height // 2, jpeg.width // 8] - expected[0]).max() <= 4
    # So does a HEIC with it (iPhones embed Display P3 the same way).
    heic = decode_image(_encode(Image.new("RGB", (64, 64), colours[0]), "HEIF", quality=95, icc_profile=profile))
    assert np.abs(np.asarray(heic, np.float64)[32, 32] - expected[0]).max() <= 4


def test_srgb_broken_and_mismatched_profiles_leave_the_pixels_alone():
    img = _quadrants(64, 48)
    plain = np.asarray(decode_image(_encode(img, "PNG")))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    for profile in (srgb, lab, b"not an icc profile at all", srgb[:100]):
        assert np.array_equal(np.asarray(decode_image(_encode(img, "PNG", icc_profile=profile))), plain)
    gray = img.convert("L")
    assert np.array_equal(np.asarray(decode_image(_encode(gray, "PNG", icc_profile=srgb))),
                          np.asarray(gray.convert("RGB")))


# ---- the same pixels everywhere ----------------------------------------------------------------------------

def test_serving_and_catalog_decode_the_same_bytes_to_the_same_pixels(tmp_path):
    spec = PreprocessSpec(size=224, resize=256)
    photo = _phone_like_photo()
    files = {"phone.jpg": _as_camera_stores_it(photo, 6, quality=90),
             "catalog.png": _encode(photo.resize((1200, 900)), "PNG"),
             "upload.heic": _encode(photo.resize((1200, 900)), "HEIF", quality=80)}
    for file, data in files.items():
        (tmp_path / file).write_bytes(data)
        row = CatalogRow(file, str(tmp_path / file))
        catalog = Catalog.from_rows([row])
        for min_side in (spec.resize, None):
            served = decode_images([data], ImageLimits(), min_side=min_side)[0]
            indexed = catalog.load_image(row, min_side=min_side)
            assert served.size == indexed.size and np.array_equal(np.asarray(served), np.asarray(indexed)), file
            assert np.array_equal(preprocess(served, spec), preprocess(indexed, spec))


def test_draft_decoding_changes_the_model_input_by_under_two_levels():
    photo = _phone_like_photo()
    data = _as_camera_stores_it(photo, 1, quality=90)
    for spec in (PreprocessSpec(size=224, resize=256), PreprocessSpec(size=224, resize=224),
                 PreprocessSpec(size=80, resize=92)):
        full = preprocess(decode_image(data), spec)
        draft = preprocess(decode_image(data, min_side=spec.resize), spec)
        levels = np.abs(full - draft) * np.asarray(spec.std, np.float32)[:, None, None] * 255
        print(f"draft vs full decode, 4032x3024 JPEG q90 -> {spec.size} px (resize {spec.resize}): "
              f"mean |diff| {levels.mean():.2f} levels, 99th percentile {np.percentile(levels, 99):.1f}")
        assert levels.mean() < 2.0


# ---- limits ------------------------------------------------------------------------------------------------

def test_four_phone_photos_fit_the_request_budget():
    data = _encode(_phone_like_photo(), quality=90)
    images = decode_images([data] * 4, ImageLimits(), min_side=256)
    assert [img.size for img in images] == [(504, 378)] * 4


def test_eight_36_mp_photos_are_refused_before_anything_is_decoded(monkeypatch):
    data = _encode(Image.new("RGB", (6000, 6000), (90, 120, 150)), quality=95)  # ~560 KB: 64 px/byte, plausible
    decode_image(data, min_side=256)  # one alone is fine

    def no_decoding(self):
        raise AssertionError("decoded a pixel of a request past its budget")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError) as err:
        decode_images([data] * 8, ImageLimits())
    assert err.value.status == 413
    assert "288,000,000 pixels" in str(err.value) and "50,000,000" in str(err.value)
    assert "per request" in str(err.value)


def test_a_pixel_budget_spans_the_calls_of_one_request():
    limits = ImageLimits(max_request_pixels=3 * 640 * 480)
    data = _encode(_quadrants(640, 480))
    budget = PixelBudget(limits)
    for _ in range(3):
        decode_image(data, limits, budget=budget)
    with pytest.raises(ImageError) as err:
        decode_image(data, limits, "image 3", budget=budget)
    assert err.value.status == 413 and "image 3" in str(err.value) and f"{3 * 640 * 480:,}" in str(err.value)
    assert len(decode_images([data] * 3, limits)) == 3  # a new request, a new budget


def test_too_many_images_in_one_request():
    with pytest.raises(ImageError) as err:
        decode_images([b"x"] * 17)
    assert err.value.status == 413 and "17 images" in str(err.value)


def test_a_631_byte_jpeg_claiming_6000x6000_is_not_a_photo():
    data = _jpeg_claiming(6000, 6000)
    assert 500 < len(data) < 800
    with pytest.raises(ImageError) as err:
        decode_image(data, name="the image")
    assert err.value.status == 400
    assert "claims 6000x6000 = 36,000,000 pixels" in str(err.value) and "not a real photo" in str(err.value)


def test_tiny_6000x6000_pngs_are_not_photos():
    data = _encode(Image.new("1", (6000, 6000)), "PNG")  # the 71 KB request held 16 of these
    assert len(data) < 5_000
    for call in (lambda: decode_image(data), lambda: decode_images([data] * 8)):
        with pytest.raises(ImageError) as err:
            call()
        assert err.value.status == 400 and "not a real photo" in str(err.value)


def test_real_photos_are_far_below_the_pixels_per_byte_bound():
    limits = ImageLimits()
    cases = {"flat colour 12-MP JPEG q95": _encode(Image.new("RGB", PHONE, (200, 180, 160)), quality=95),
             "phone-like 12-MP JPEG q90": _encode(_phone_like_photo(), quality=90)}
    for i, photo in enumerate(_sample_photos()[:3]):
        cases[f"sample photo {i} upscaled to 12 MP, JPEG q90"] = _encode(photo.resize(PHONE), quality=90)
    for what, data in cases.items():
        density = PHONE[0] * PHONE[1] / len(data)
        assert density * 10 < limits.max_pixels_per_byte, (what, density)
        decode_image(data, limits, min_side=256)


def test_truncated_images_fail_cleanly_instead_of_decoding_grey():
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    photo = _phone_like_photo().resize((1008, 756))
    for fmt in ("JPEG", "PNG", "WEBP"):
        data = _encode(photo, fmt)
        for cut in (len(data) // 2, len(data) - 200):
            for min_side in (None, 224):
                with pytest.raises(ImageError) as err:
                    decode_image(data[:cut], min_side=min_side)
                assert err.value.status == 400 and "corrupt or truncated" in str(err.value), (fmt, cut)


@pytest.mark.parametrize("data,status,words", [
    (b"", 400, "empty"),
    (b"hello, this is not a photo", 400, "not an image we can read"),
    (np.random.default_rng(0).bytes(4096), 400, "not an image"),
    (_encode(Image.new("RGB", (8, 8)), "GIF"), 400, "is GIF"),
    (_encode(Image.new("RGB", (8, 8)), "TIFF"), 400, "is TIFF"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 40, 400, "not an image"),
    (_png_claiming(30_000, 30_000), 413, "pixels"),  # 900 MP: Pillow's own bomb guard, before our check
    (_png_claiming(7_000, 7_000), 413, "40,000,000 pixels"),
    (_png_claiming(13_000, 10), 413, "per side"),
    (_png_claiming(0, 10), 400, ""),
])
def test_bad_input_gets_a_clear_error(data, status, words):
    with pytest.raises(ImageError) as err:
        decode_image(data, name="the image")
    assert err.value.status == status and words in str(err.value), str(err.value)
    assert str(err.value).startswith("the image")


def test_too_many_bytes_is_413():
    with pytest.raises(ImageError) as err:
        decode_image(b"\xff" * 2048, ImageLimits(max_bytes=1024))
    assert err.value.status == 413


def test_min_side_must_be_a_positive_size():
    data = _encode(_quadrants(64, 48))
    assert decode_image(data, min_side=np.int64(32)).size == (64, 48)
    with pytest.raises(ValueError):
        decode_image(data, min_side=0)
    with pytest.raises(TypeError):
        decode_image(data, min_side=2.5)


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (333, 1500), (256, 256), (3024, 4032)])
def test_centre_crop_resamples_only_what_survives_the_crop(size):
    """resize_and_crop resamples just the cropped box (Pillow's `box`): within two pixel levels (rounding of the
    8-bit intermediate pass) of resizing the whole photo and cropping it, the rule models were trained with."""
    from lookalike.core.preprocessing import resize_and_crop

    rng = np.random.default_rng(sum(size))
    w, h = size
    photo = Image.fromarray(rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)).resize(
        (w, h), Image.Resampling.BILINEAR)
    spec = PreprocessSpec()
    scale = spec.resize / min(w, h)
    new_w, new_h = max(spec.size, round(w * scale)), max(spec.size, round(h * scale))
    left, top = (new_w - spec.size) // 2, (new_h - spec.size) // 2
    whole = photo.resize((new_w, new_h), Image.Resampling.BICUBIC).crop((left, top, left + spec.size,
                                                                         top + spec.size))
    ours = resize_and_crop(photo, spec)
    assert ours.size == (spec.size, spec.size)
    diff = np.abs(np.asarray(ours, np.int16) - np.asarray(whole, np.int16))
    assert diff.max() <= 2 and diff.mean() < 0.1
