"""A seeded "phone photo" simulator: a catalog image as a shopper's phone might capture the product.

Real shopper photos are not available here, so queries and augmentation are *simulated* from catalog
images: the product is cut out of its plain studio background (or, as when a shopper photographs a
printed picture or a screen, the whole image is pasted), put on a crop of a real photograph, then seen
through a phone: scale and position jitter, rotation and perspective, a soft shadow, light falling off
across the scene and a colour cast, defocus and motion blur, sensor noise, a lower resolution and a JPEG
round trip. The same seed gives the same photo. The product keeps its catalog appearance (Fashion-MNIST's
negated intensities included): a query must match its own listing's catalog image.

Two recipes, so the judge is never the coach: `TRAINING` augments training, `EVALUATION` makes every query
that measures a model (evaluation, early stopping, the gates, the index step, the demo). They share no
background photo, draw from differently salted seeds, and differ in their transforms: training casts
colour with free per-channel gains and clean lens; evaluation shifts white balance along the warm-cool
axis, darkens the corners (vignetting) and loses resolution (a downscaled sensor crop). A model that
learnt the training recipe's look gains nothing on the evaluation's.

Colour labels stay true: evaluation casts are mild (a white-balance shift a phone leaves in), and a
training view whose cast is strong reports it (`PhoneInfo.cast`), so training drops that view's colour
label (`STRONG_CAST`) instead of teaching that a tinted product is another colour.

Any metric computed on these photos must be printed with SIMULATED_NOTE beside it.

Run `python -m lookalike.training.phone_photos grid docs/images/phone_photos.png` for a picture of originals beside
their simulations (`--recipe evaluation` for the other recipe), and `python -m lookalike.training.phone_photos bench`
for its speed.
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFilter

if TYPE_CHECKING:
    from lookalike.catalogs.rows import Catalog

SIMULATED_NOTE = ("simulated phone photos (evaluation recipe): catalog images cut out or pasted whole on real "
                  "background photos, with perspective, light, colour cast, blur, noise and JPEG; not real "
                  "shopper photos")

_BACKGROUND_SIDE = 384  # backgrounds are kept at most this large: crops are resized from them per call
# Foreground mask: a pixel whose largest channel difference from the background colour exceeds
# _MASK_LOW starts to be product, fully so at _MASK_LOW + _MASK_RAMP.
_MASK_LOW, _MASK_RAMP = 15.0, 35.0
# A plain studio background covers at least this fraction of the border (garments may touch the edges);
# otherwise the whole image is pasted as a rectangle (like a photo of a printed picture).
_PLAIN_BORDER_FRACTION = 0.5
# A view whose colour cast moves a channel more than this (relative to the others) may turn a white
# product cream or pink: training drops the colour label of such a view.
STRONG_CAST = 0.1


@dataclass(frozen=True)
class Recipe:
    """How one family of simulated photos is made; every range is at strength 1."""
    name: str
    backgrounds: tuple[str, ...]  # "skimage:<name>" or "matplotlib:<sample file>"
    seed_salt: int  # mixed into every seed `make_phone_queries` draws, so recipes never share a stream
    cutout_p: float  # the product cut out of a plain background (else the whole image is pasted)
    extent: tuple[float, float]  # the product's longest side, as a fraction of the photo
    rotation: float  # degrees, either way
    perspective: float  # corner jitter, as a fraction of the product's extent
    shadow_p: float
    defocus: float  # the largest Gaussian blur radius, in pixels of a 160-px photo
    motion_p: float
    light: tuple[float, float]  # strength of the light gradient across the scene
    cast: float  # per-channel gains (training) or the white-balance shift (evaluation), either way
    white_balance: bool  # the cast moves along the warm-cool axis only (as a phone's auto white balance)
    exposure: tuple[float, float]
    vignette: float  # corner darkening
    downscale: tuple[float, float]  # resolution kept by the sensor crop (1: none lost)
    noise: tuple[float, float]  # sensor noise sigma, in 8-bit levels
    jpeg: tuple[int, int]  # JPEG quality range


TRAINING = Recipe(
    "training", ("skimage:coffee", "skimage:chelsea", "skimage:astronaut", "skimage:brick", "skimage:grass"),
    seed_salt=0x7A11, cutout_p=0.7, extent=(0.5, 0.85), rotation=25.0, perspective=0.12, shadow_p=0.7,
    defocus=1.6, motion_p=0.5, light=(0.1, 0.35), cast=0.12, white_balance=False, exposure=(0.8, 1.1),
    vignette=0.0, downscale=(1.0, 1.0), noise=(2.0, 8.0), jpeg=(35, 70))
EVALUATION = Recipe(
    "evaluation", ("skimage:rocket", "skimage:camera", "skimage:gravel", "skimage:coins",
                   "matplotlib:grace_hopper.jpg"),
    seed_salt=0xE7A1, cutout_p=0.5, extent=(0.45, 0.8), rotation=15.0, perspective=0.15, shadow_p=0.5,
    defocus=1.2, motion_p=0.3, light=(0.05, 0.25), cast=0.06, white_balance=True, exposure=(0.85, 1.15),
    vignette=0.35, downscale=(0.5, 1.0), noise=(1.0, 6.0), jpeg=(50, 85))
RECIPES = {r.name: r for r in (TRAINING, EVALUATION)}


@dataclass(frozen=True)
class PhoneInfo:
    """What a simulated photo went through, where training needs to know it.

    `box` and `mask` are where the simulator put the product: free localisation labels for every view
    (the locator head learns from `mask`; the benchmarks score crops against `box`)."""
    cutout: bool  # the product was cut out of its background (else pasted whole)
    cast: float  # the largest relative channel change of the colour cast (see STRONG_CAST)
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1 as fractions of the photo
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)  # [size, size] float32 in [0, 1]


def recipe_of(recipe: Recipe | str) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        from lookalike.core.errors import InputError

        raise InputError(f"unknown phone-photo recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    return RECIPES[recipe]


def _load_background(ref: str) -> Image.Image:
    source, _, name = ref.partition(":")
    if source == "skimage":
        import skimage.data

        return Image.fromarray(getattr(skimage.data, name)())
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data(name) as f:
        return Image.open(f).convert("RGB")


@lru_cache(maxsize=8)
def background_photos(side: int = _BACKGROUND_SIDE, recipe: str = "training") -> tuple[Image.Image, ...]:
    """A recipe's background photos (grey ones kept grey, tinted per photo), at most `side` pixels across,
    loaded once per process, size and recipe."""
    photos = []
    for ref in recipe_of(recipe).backgrounds:
        img = _load_background(ref)
        img = img.convert("L" if img.mode in ("L", "I", "F", "1") else "RGB")
        img.thumbnail((side, side), Image.Resampling.LANCZOS)
        photos.append(img)
    return tuple(photos)


@lru_cache(maxsize=4)
def _noise_bank(size: int) -> np.ndarray:
    """Unit Gaussian noise, twice the photo's size: each photo takes a seeded window of it, which is
    several times cheaper than drawing fresh noise and just as good for sensor noise."""
    return np.random.default_rng(0x5EED).standard_normal((2 * size, 2 * size, 3), dtype=np.float32)


def foreground_mask(img: Image.Image) -> Image.Image:
    """An 'L' mask of the product: 255 on the product, 0 on a plain background.

    The background colour is the median of the border pixels: black for Fashion-MNIST (its stored
    intensities are negated, so the studio background is 0), near-white for ordinary product shots.
    A busy border means there is no plain background to remove: the mask is then all product.
    """
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    bg = np.median(border, axis=0)
    if (np.abs(border - bg).max(axis=1) < _MASK_LOW + _MASK_RAMP / 2).mean() < _PLAIN_BORDER_FRACTION:
        return Image.new("L", img.size, 255)
    diff = np.abs(arr - bg).max(axis=2)
    alpha = np.clip((diff - _MASK_LOW) / _MASK_RAMP, 0.0, 1.0)
    return Image.fromarray((alpha * 255).astype(np.uint8))


def _perspective_coeffs(dst: np.ndarray, src: np.ndarray) -> tuple[float, ...]:
    """PIL's PERSPECTIVE coefficients mapping output points `dst` (4x2) to input points `src` (4x2)."""
    a = np.zeros((8, 8))
    b = np.zeros(8)
    for i, ((x, y), (u, v)) in enumerate(zip(dst, src)):
        a[2 * i] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * i + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
        b[2 * i], b[2 * i + 1] = u, v
    return tuple(np.linalg.solve(a, b))


def _motion_blur(arr: np.ndarray, length: float, angle: float) -> np.ndarray:
    """The mean of copies shifted along a line: the smear of a hand moving during the exposure."""
    offsets = {(int(round(t * np.sin(angle))), int(round(t * np.cos(angle))))
               for t in np.linspace(-length / 2, length / 2, max(2, int(np.ceil(length)) + 1))}
    out = np.zeros_like(arr)
    for dy, dx in offsets:
        out += np.roll(arr, (dy, dx), axis=(0, 1))
    return out / np.float32(len(offsets))


def _scene(rng: np.random.Generator, size: int, recipe: Recipe) -> Image.Image:
    """A random crop of one of the recipe's photos, sometimes mirrored; a grey photo gets a tint (a
    coloured table, a wall)."""
    photos = background_photos(max(2 * size, 128), recipe.name)
    bg = photos[int(rng.integers(len(photos)))]
    side = rng.uniform(0.35, 1.0) * min(bg.size)
    x0, y0 = rng.uniform(0, bg.size[0] - side), rng.uniform(0, bg.size[1] - side)
    canvas = bg.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    if canvas.mode == "L":
        tint = rng.uniform(0.6, 1.0, 3)
        canvas = Image.merge("RGB", [canvas.point(lambda v, t=t: int(v * t)) for t in tint])
    if rng.random() < 0.5:
        canvas = canvas.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return canvas


def _place_product(canvas: Image.Image, src: Image.Image, rng: np.random.Generator, s: float, recipe: Recipe,
                   cutout: bool) -> Image.Image | None:
    """Scale, position, rotation and perspective as one projective warp; then a shadow and the paste.
    Returns where the product landed: an 'L' image the canvas's size (None when it fell off the photo)."""
    size, m = canvas.size[0], min(s, 1.0)
    w, h = src.size
    lo_extent, hi_extent = recipe.extent
    extent = size * rng.uniform(hi_extent - (hi_extent - lo_extent) * m, hi_extent)
    half = np.array([w, h], dtype=np.float64) * (extent / max(w, h)) / 2
    centre = size / 2 + rng.uniform(-1, 1, 2) * (size / 2 - half.max()) * 0.8 * m
    angle = np.deg2rad(rng.uniform(-recipe.rotation, recipe.rotation) * s)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * half
    corners = corners @ rot.T + centre
    corners += rng.uniform(-1, 1, (4, 2)) * recipe.perspective * s * extent  # a phone held at an angle
    # A shopper frames the product: move it back into the picture, letting at most a sliver be cut off.
    lo, hi, margin = corners.min(0), corners.max(0), 0.03 * size
    shift = np.maximum(0.0, -margin - lo) - np.maximum(0.0, hi - (size + margin))
    corners += np.where(hi - lo > size + 2 * margin, size / 2 - (lo + hi) / 2, shift)
    src_corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    # Warp only the product's bounding box on the photo: the rest of the output would be transparent.
    left, top = np.floor(np.clip(corners.min(0), 0, size)).astype(int)
    right, bottom = np.ceil(np.clip(corners.max(0), 0, size)).astype(int)
    if right - left < 2 or bottom - top < 2:
        return None
    coeffs = _perspective_coeffs(corners - [left, top], src_corners)
    product = src.convert("RGBA")
    product.putalpha(foreground_mask(src) if cutout else Image.new("L", src.size, 255))
    warped = product.transform((int(right - left), int(bottom - top)), Image.Transform.PERSPECTIVE, coeffs,
                               Image.Resampling.BILINEAR, fillcolor=(0, 0, 0, 0))
    if rng.random() < recipe.shadow_p * m:  # a soft shadow, as of a product lying on a surface under a lamp
        shadow = warped.getchannel("A").filter(ImageFilter.GaussianBlur(2.5 * size / 160))
        opacity = rng.uniform(0.25, 0.5)
        shadow = shadow.point(lambda v: int(v * opacity))
        dx, dy = (rng.uniform(-1, 1, 2) * 0.03 * size).round().astype(int)
        canvas.paste((0, 0, 0), (int(left + dx), int(top + dy)), shadow)
    canvas.paste(warped, (int(left), int(top)), warped)
    where = Image.new("L", canvas.size, 0)
    where.paste(warped.getchannel("A"), (int(left), int(top)))
    return where


def _box_of(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """The bounding box (fractions) of the mask's pixels that are at least half product."""
    ys, xs = np.nonzero(mask >= 0.5)
    if len(xs) == 0:
        return None
    h, w = mask.shape
    return (float(xs.min() / w), float(ys.min() / h), float((xs.max() + 1) / w), float((ys.max() + 1) / h))


def _colour_gains(rng: np.random.Generator, s: float, recipe: Recipe) -> np.ndarray:
    """Per-channel gains of the cast: free per channel (training), or a white-balance shift that warms
    (red up, blue down) or cools a scene (evaluation)."""
    if recipe.white_balance:
        t = rng.uniform(-1, 1) * recipe.cast * s
        return np.array([1 + t, 1 + 0.3 * t, 1 - t], dtype=np.float64)
    return 1.0 + rng.uniform(-recipe.cast, recipe.cast, 3) * s


def simulate(img: Image.Image, rng: np.random.Generator | int, *, strength: float = 1.0, out_size: int = 320,
             recipe: Recipe | str = TRAINING, cutout: bool | None = None) -> tuple[Image.Image, PhoneInfo]:
    """`img` (a catalog image, any mode) as a simulated phone photo (RGB, `out_size` square) and what it
    went through. `cutout` forces cutting out (True) or pasting whole (False); by default the recipe draws.

    `strength` scales every distortion: 0 returns the image merely resized (no background, no
    distortion), 1 is the recipe's range, up to 2 is harsher still. Deterministic for a given seed (or
    a Generator in a given state).
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    recipe = recipe_of(recipe)
    s = float(np.clip(strength, 0.0, 2.0))
    src = img.convert("RGB")
    if s == 0.0:
        whole = np.ones((out_size, out_size), np.float32)
        return (src.resize((out_size, out_size), Image.Resampling.BICUBIC),
                PhoneInfo(False, 0.0, (0.0, 0.0, 1.0, 1.0), whole))
    m = min(s, 1.0)
    size = out_size
    cut = bool(rng.random() < recipe.cutout_p) if cutout is None else cutout
    canvas = _scene(rng, size, recipe)
    where = _place_product(canvas, src, rng, s, recipe, cut)
    mask = (np.zeros((size, size), np.float32) if where is None
            else np.asarray(where, dtype=np.float32) / np.float32(255.0))

    # -- optics: defocus, then (sometimes) motion blur
    radius = rng.uniform(0.0, recipe.defocus) * s * size / 160
    if radius > 0.15:
        canvas = canvas.filter(ImageFilter.GaussianBlur(radius))
    arr = np.asarray(canvas, dtype=np.float32)
    if rng.random() < recipe.motion_p * m:
        arr = _motion_blur(arr, rng.uniform(2.0, 6.0) * s * size / 160, rng.uniform(0, np.pi))

    # -- light and sensor: a gradient across the scene, vignetting, a colour cast, exposure, noise
    theta = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    light = rng.uniform(*recipe.light) * s
    shade = 1.0 + light * (np.cos(theta) * ramp[None, :] + np.sin(theta) * ramp[:, None]) / 1.4
    if recipe.vignette > 0:
        shade = shade * (1.0 - recipe.vignette * m * (ramp[None, :] ** 2 + ramp[:, None] ** 2) / 2)
    gains = _colour_gains(rng, s, recipe)
    cast = float(np.max(np.abs(gains / gains.mean() - 1.0)))
    gains = gains * rng.uniform(1 - (1 - recipe.exposure[0]) * m, 1 + (recipe.exposure[1] - 1) * m)
    arr = arr * shade[:, :, None] * gains.astype(np.float32)
    ny, nx = rng.integers(0, size, 2)
    arr += _noise_bank(size)[ny:ny + size, nx:nx + size] * np.float32(rng.uniform(*recipe.noise) * s)
    canvas = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))

    # -- a smaller sensor crop, upscaled by the phone
    keep = rng.uniform(1 - (1 - recipe.downscale[0]) * m, 1.0)
    if keep < 0.97:
        small = max(8, round(size * keep))
        canvas = canvas.resize((small, small), Image.Resampling.BILINEAR).resize((size, size),
                                                                                 Image.Resampling.BICUBIC)
    # -- the phone's JPEG encoder
    lo_q, hi_q = recipe.jpeg
    quality = int(rng.integers(round(95 - (95 - lo_q) * m), round(95 - (95 - hi_q) * m) + 1))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB"), PhoneInfo(cut, cast, _box_of(mask), mask)


def simulate_phone_photo(img: Image.Image, rng: np.random.Generator | int, *, strength: float = 1.0,
                         out_size: int = 320, recipe: Recipe | str = TRAINING,
                         cutout: bool | None = None) -> Image.Image:
    """`simulate` without the info: the photo only (the training recipe unless told otherwise)."""
    return simulate(img, rng, strength=strength, out_size=out_size, recipe=recipe, cutout=cutout)[0]


def make_phone_queries(catalog: Catalog, n: int, seed: int, *, strength: float = 1.0, out_size: int = 320,
                       workers: int = 8, recipe: Recipe | str = EVALUATION) -> list[tuple[str, Image.Image]]:
    """`n` seeded catalog listings (distinct, at most all of them), each photographed once: one of its
    photos as a simulated phone photo of the EVALUATION recipe (the one training never augments with).

    Returns (listing_id, photo) pairs; the match of each query is its own listing. Label any metric
    computed on them with SIMULATED_NOTE.
    """
    recipe = recipe_of(recipe)
    rng = np.random.default_rng([recipe.seed_salt, seed])
    listings = list(catalog.listings().values())
    picks = rng.choice(len(listings), size=min(n, len(listings)), replace=False)
    rows = [listings[int(i)][int(rng.integers(len(listings[int(i)])))] for i in picks]

    def one(k: int) -> tuple[str, Image.Image]:
        row = rows[k]
        photo = simulate_phone_photo(catalog.load_image(row), np.random.default_rng([recipe.seed_salt, seed, k]),
                                     strength=strength, out_size=out_size, recipe=recipe)
        return row.listing_id, photo

    with ThreadPoolExecutor(max(1, workers)) as pool:  # image reads from S3 overlap
        return list(pool.map(one, range(len(rows))))


# ---- a picture and a speed measurement -------------------------------------------------------------

def _sample_images(count: int, seed: int = 0) -> list[Image.Image]:
    """`count` Fashion-MNIST test images, cycling over the classes."""
    from lookalike.catalogs.importers import load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    rng = np.random.default_rng(seed)
    picks = [int(rng.choice(np.flatnonzero(labels == c % 10))) for c in range(count)]
    return [Image.fromarray(images[i]) for i in picks]


def save_grid(originals: list[Image.Image], photos: list[Image.Image], path: str, *, tile: int = 128,
              cols: int = 4) -> None:
    """Originals beside their simulated photos, `cols` pairs per row, as a palette PNG (small file)."""
    rows = -(-len(originals) // cols)
    gap = 4
    grid = Image.new("RGB", (cols * (2 * tile + 3 * gap), rows * (tile + gap) + gap), (255, 255, 255))
    for k, (orig, photo) in enumerate(zip(originals, photos)):
        r, c = divmod(k, cols)
        x, y = c * (2 * tile + 3 * gap) + gap, r * (tile + gap) + gap
        grid.paste(orig.convert("RGB").resize((tile, tile), Image.Resampling.NEAREST), (x, y))
        grid.paste(photo.resize((tile, tile), Image.Resampling.LANCZOS), (x + tile + gap, y))
    grid.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def _main(argv: list[str] | None = None) -> int:
    import argparse
    import time

    parser = argparse.ArgumentParser(prog="python -m lookalike.training.phone_photos",
                                     description="Look at the phone-photo simulator, or time it.")
    sub = parser.add_subparsers(dest="action", required=True)
    g = sub.add_parser("grid", help="save 16 Fashion-MNIST originals beside their simulated phone photos")
    g.add_argument("out", help="PNG file to write")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--strength", type=float, default=1.0)
    g.add_argument("--recipe", choices=sorted(RECIPES), default="training")
    b = sub.add_parser("bench", help="time the simulator on 28x28 images (one core)")
    b.add_argument("--size", type=int, default=160)
    b.add_argument("-n", type=int, default=300)
    args = parser.parse_args(argv)
    if args.action == "grid":
        originals = _sample_images(16, args.seed)
        photos = [simulate_phone_photo(img, np.random.default_rng([args.seed, k]), strength=args.strength,
                                       recipe=args.recipe) for k, img in enumerate(originals)]
        save_grid(originals, photos, args.out)
        print(f"wrote {args.out} ({args.recipe} recipe; {SIMULATED_NOTE})")
        return 0
    images = _sample_images(50)

    # Baseline in the same run: the bare minimum any pipeline does to such an image (resize + JPEG).
    def baseline(img: Image.Image, k: int) -> None:
        buf = io.BytesIO()
        img.convert("RGB").resize((args.size, args.size), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=50)

    timings = {}
    for name, fn in (("resize+jpeg", baseline),
                     *((r, lambda img, k, r=r: simulate_phone_photo(img, k, out_size=args.size, recipe=r))
                       for r in RECIPES)):
        fn(images[0], 0)  # backgrounds loaded outside the timing
        started = time.perf_counter()
        for k in range(args.n):
            fn(images[k % len(images)], k)
        timings[name] = (time.perf_counter() - started) / args.n * 1000
    print(f"phone photo 28->{args.size}px: " + ", ".join(
        f"{name} {ms:.2f} ms/img ({ms / timings['resize+jpeg']:.1f}x resize+jpeg)" for name, ms in timings.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
