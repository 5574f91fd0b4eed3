"""A seeded "phone photo" simulator: a catalog image as a shopper's phone might capture the product.

Real shopper photos are not available here, so queries and augmentation are *simulated* from catalog
images: the product is cut out of its plain studio background, pasted onto a crop of a real photo
(scikit-image's bundled pictures: a table with coffee, a cat, a person, a rocket launch, a street scene,
brick, grass and gravel), then seen through a phone: scale and position jitter, rotation and
perspective, a lighting gradient and colour cast, defocus and motion blur, sensor noise and a JPEG round
trip at quality 35-70. The same seed gives the same photo. The product keeps its catalog appearance
(Fashion-MNIST's negated intensities included): a query must match its own listing's catalog image.

Any metric computed on these photos must be printed with SIMULATED_NOTE beside it.

Run `python -m training.phone_photos grid docs/images/phone_photos.png` for a picture of originals
beside their simulations, and `python -m training.phone_photos bench` for its speed.
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFilter

if TYPE_CHECKING:
    from training.catalog import Catalog

SIMULATED_NOTE = ("simulated phone photos: catalog images pasted on real background photos with perspective, "
                  "lighting, blur, noise and JPEG 35-70; not real shopper photos")

# Photos of real scenes and surfaces bundled with scikit-image (no download needed).
BACKGROUND_PHOTOS = ("coffee", "chelsea", "astronaut", "rocket", "camera", "brick", "grass", "gravel")
_BACKGROUND_SIDE = 384  # backgrounds are kept at most this large: crops are resized from them per call

# Foreground mask: a pixel whose largest channel difference from the background colour exceeds
# _MASK_LOW starts to be product, fully so at _MASK_LOW + _MASK_RAMP.
_MASK_LOW, _MASK_RAMP = 15.0, 35.0
# A plain studio background covers at least this fraction of the border (garments may touch the edges);
# otherwise the whole image is pasted as a rectangle (like a photo of a printed picture).
_PLAIN_BORDER_FRACTION = 0.5


@lru_cache(maxsize=4)
def background_photos(side: int = _BACKGROUND_SIDE) -> tuple[Image.Image, ...]:
    """The background photos as RGB, at most `side` pixels across, loaded once per process and size."""
    import skimage.data

    photos = []
    for name in BACKGROUND_PHOTOS:
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
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


def simulate_phone_photo(img: Image.Image, rng: np.random.Generator | int, *, strength: float = 1.0,
                         out_size: int = 320) -> Image.Image:
    """`img` (a catalog image, any mode) as a simulated phone photo: RGB, `out_size` square.

    `strength` scales every distortion: 0 returns the image merely resized (no background, no
    distortion), 1 is the full range described in the module docstring, up to 2 is harsher still.
    Deterministic for a given seed (or a Generator in a given state).
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    s = float(np.clip(strength, 0.0, 2.0))
    src = img.convert("RGB")
    if s == 0.0:
        return src.resize((out_size, out_size), Image.Resampling.BICUBIC)
    m = min(s, 1.0)
    size = out_size

    # -- the scene: a random crop of a real photo, sometimes mirrored
    photos = background_photos(max(2 * size, 128))
    bg = photos[int(rng.integers(len(photos)))]
    side = rng.uniform(0.35, 1.0) * min(bg.size)
    x0 = rng.uniform(0, bg.size[0] - side)
    y0 = rng.uniform(0, bg.size[1] - side)
    canvas = bg.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    if rng.random() < 0.5:
        canvas = canvas.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    # -- the product: scale, position, rotation and perspective, as one projective warp
    w, h = src.size
    extent = size * rng.uniform(0.85 - 0.35 * m, 0.85)  # the product's longest side on the photo
    half = np.array([w, h], dtype=np.float64) * (extent / max(w, h)) / 2
    centre = size / 2 + rng.uniform(-1, 1, 2) * (size / 2 - half.max()) * 0.8 * m
    angle = np.deg2rad(rng.uniform(-25, 25) * s)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * half
    corners = corners @ rot.T + centre
    corners += rng.uniform(-1, 1, (4, 2)) * 0.12 * s * extent  # a phone held at an angle
    # A shopper frames the product: move it back into the picture, letting at most a sliver be cut off.
    lo, hi, margin = corners.min(0), corners.max(0), 0.03 * size
    shift = np.maximum(0.0, -margin - lo) - np.maximum(0.0, hi - (size + margin))
    corners += np.where(hi - lo > size + 2 * margin, size / 2 - (lo + hi) / 2, shift)
    src_corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    # Warp only the product's bounding box on the photo: the rest of the output would be transparent.
    left, top = np.floor(np.clip(corners.min(0), 0, size)).astype(int)
    right, bottom = np.ceil(np.clip(corners.max(0), 0, size)).astype(int)
    if right - left >= 2 and bottom - top >= 2:
        coeffs = _perspective_coeffs(corners - [left, top], src_corners)
        product = src.convert("RGBA")
        product.putalpha(foreground_mask(src))
        warped = product.transform((int(right - left), int(bottom - top)), Image.Transform.PERSPECTIVE, coeffs,
                                   Image.Resampling.BILINEAR, fillcolor=(0, 0, 0, 0))
        if rng.random() < 0.7 * m:  # a soft shadow, as of a product lying on a surface under a lamp
            shadow = warped.getchannel("A").filter(ImageFilter.GaussianBlur(2.5 * size / 160))
            opacity = rng.uniform(0.25, 0.5)
            shadow = shadow.point(lambda v: int(v * opacity))
            dx, dy = (rng.uniform(-1, 1, 2) * 0.03 * size).round().astype(int)
            canvas.paste((0, 0, 0), (int(left + dx), int(top + dy)), shadow)
        canvas.paste(warped, (int(left), int(top)), warped)

    # -- optics: defocus, then (sometimes) motion blur
    radius = rng.uniform(0.0, 1.6) * s * size / 160
    if radius > 0.15:
        canvas = canvas.filter(ImageFilter.GaussianBlur(radius))
    arr = np.asarray(canvas, dtype=np.float32)
    if rng.random() < 0.5 * m:
        arr = _motion_blur(arr, rng.uniform(2.0, 6.0) * s * size / 160, rng.uniform(0, np.pi))

    # -- light and sensor: a gradient across the scene, a colour cast, exposure, noise
    theta = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    gradient = 1.0 + rng.uniform(0.1, 0.35) * s * (np.cos(theta) * ramp[None, :] + np.sin(theta) * ramp[:, None]) / 1.4
    gains = (1.0 + rng.uniform(-0.12, 0.12, 3) * s) * rng.uniform(1 - 0.2 * m, 1 + 0.1 * m)
    arr = arr * gradient[:, :, None] * gains.astype(np.float32)
    ny, nx = rng.integers(0, size, 2)
    arr += _noise_bank(size)[ny:ny + size, nx:nx + size] * np.float32(rng.uniform(2.0, 8.0) * s)
    canvas = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))

    # -- the phone's JPEG encoder
    quality = int(rng.integers(round(95 - 60 * m), round(95 - 25 * m) + 1))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


class PhonePhotoAugment:
    """Training augmentation: with probability `p`, replace an image by a simulated phone photo."""

    def __init__(self, p: float = 0.5, strength: float = 1.0, out_size: int = 224):
        self.p, self.strength, self.out_size = p, strength, out_size

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        if rng.random() >= self.p:
            return img
        return simulate_phone_photo(img, rng, strength=self.strength, out_size=self.out_size)

    def __repr__(self) -> str:
        return f"PhonePhotoAugment(p={self.p}, strength={self.strength}, out_size={self.out_size})"


def make_phone_queries(catalog: "Catalog", n: int, seed: int, *, strength: float = 1.0, out_size: int = 320,
                       workers: int = 8) -> list[tuple[str, Image.Image]]:
    """`n` seeded catalog listings (distinct, at most all of them), each as a simulated phone photo.

    Returns (listing_id, photo) pairs; the match of each query is its own listing. Label any metric
    computed on them with SIMULATED_NOTE.
    """
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(catalog.rows), size=min(n, len(catalog.rows)), replace=False)
    rows = [catalog.rows[int(i)] for i in picks]

    def one(k: int) -> tuple[str, Image.Image]:
        row = rows[k]
        photo = simulate_phone_photo(catalog.load_image(row), np.random.default_rng([seed, k]),
                                     strength=strength, out_size=out_size)
        return row.listing_id, photo

    with ThreadPoolExecutor(max(1, workers)) as pool:  # image reads from S3 overlap
        return list(pool.map(one, range(len(rows))))


# ---- a picture and a speed measurement -------------------------------------------------------------

def _sample_images(count: int, seed: int = 0) -> list[Image.Image]:
    """`count` Fashion-MNIST test images, cycling over the classes."""
    from training.importers import load_fashion_mnist

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

    parser = argparse.ArgumentParser(prog="python -m training.phone_photos",
                                     description="Look at the phone-photo simulator, or time it.")
    sub = parser.add_subparsers(dest="action", required=True)
    g = sub.add_parser("grid", help="save 16 Fashion-MNIST originals beside their simulated phone photos")
    g.add_argument("out", help="PNG file to write")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--strength", type=float, default=1.0)
    b = sub.add_parser("bench", help="time the simulator on 28x28 images (one core)")
    b.add_argument("--size", type=int, default=160)
    b.add_argument("-n", type=int, default=300)
    args = parser.parse_args(argv)
    if args.action == "grid":
        originals = _sample_images(16, args.seed)
        photos = [simulate_phone_photo(img, np.random.default_rng([args.seed, k]), strength=args.strength)
                  for k, img in enumerate(originals)]
        save_grid(originals, photos, args.out)
        print(f"wrote {args.out} ({SIMULATED_NOTE})")
        return 0
    images = _sample_images(50)
    background_photos()
    # Baseline in the same run: the bare minimum any pipeline does to such an image (resize + JPEG).
    def baseline(img: Image.Image) -> None:
        buf = io.BytesIO()
        img.convert("RGB").resize((args.size, args.size), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=50)

    timings = {}
    for name, fn in (("resize+jpeg", baseline),
                     ("simulate", lambda img, k: simulate_phone_photo(img, k, out_size=args.size))):
        started = time.perf_counter()
        for k in range(args.n):
            fn(images[k % len(images)], k) if name == "simulate" else fn(images[k % len(images)])
        timings[name] = (time.perf_counter() - started) / args.n * 1000
    print(f"phone photo 28->{args.size}px: simulate {timings['simulate']:.2f} ms/img, resize+jpeg "
          f"{timings['resize+jpeg']:.2f} ms/img, ratio {timings['simulate'] / timings['resize+jpeg']:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
