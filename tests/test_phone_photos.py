"""The phone-photo simulator: seeded, the right size and mode, really different from the catalog image,
and the query set built from a catalog."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from training.catalog import Catalog
from training.importers import load_fashion_mnist
from training.phone_photos import (SIMULATED_NOTE, PhonePhotoAugment, foreground_mask, make_phone_queries,
                                   simulate_phone_photo)


@pytest.fixture(scope="module")
def products() -> list[Image.Image]:
    """Real Fashion-MNIST test images, one per class."""
    images, labels = load_fashion_mnist("test")
    return [Image.fromarray(images[int(np.flatnonzero(labels == c)[0])]) for c in range(10)]


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32)


def test_same_seed_same_photo_other_seed_other_photo(products):
    a = simulate_phone_photo(products[0], 7, out_size=160)
    b = simulate_phone_photo(products[0], np.random.default_rng(7), out_size=160)
    c = simulate_phone_photo(products[0], 8, out_size=160)
    assert a.tobytes() == b.tobytes()
    assert np.abs(_pixels(a) - _pixels(c)).mean() > 5


@pytest.mark.parametrize("out_size", [96, 160, 320])
def test_output_is_rgb_of_the_requested_size(products, out_size):
    white_shot = Image.new("RGB", (60, 40), (255, 255, 255))
    white_shot.paste((180, 20, 20), (15, 10, 45, 30))  # a red product on a white studio background
    for img in (products[7], white_shot, products[3].convert("RGBA")):
        photo = simulate_phone_photo(img, 1, out_size=out_size)
        assert photo.mode == "RGB" and photo.size == (out_size, out_size)


def test_the_photo_is_far_from_the_catalog_image(products):
    for k, img in enumerate(products):
        original = _pixels(img.convert("RGB").resize((160, 160), Image.Resampling.BICUBIC))
        photo = _pixels(simulate_phone_photo(img, k, out_size=160))
        assert np.abs(photo - original).mean() > 20  # a background appeared where the studio was black


def test_strength_zero_is_a_plain_resize_and_any_strength_changes_it(products):
    img = products[1]
    plain = img.convert("RGB").resize((128, 128), Image.Resampling.BICUBIC)
    assert simulate_phone_photo(img, 3, strength=0.0, out_size=128).tobytes() == plain.tobytes()
    weak = simulate_phone_photo(img, 3, strength=0.1, out_size=128)
    strong = simulate_phone_photo(img, 3, strength=1.0, out_size=128)
    assert np.abs(_pixels(weak) - _pixels(plain)).mean() > 5
    # Strength scales the distortions: a weak photo stays closer to the plain image than a strong one.
    assert np.abs(_pixels(strong) - _pixels(plain)).mean() > np.abs(_pixels(weak) - _pixels(plain)).mean()


def test_foreground_mask_on_dark_and_on_white_backgrounds(products):
    mask = np.asarray(foreground_mask(products[0]))
    stored = np.asarray(products[0])
    assert mask[stored == 0].max() == 0 and mask[stored > 60].min() == 255
    shot = Image.new("RGB", (40, 40), (250, 250, 250))
    shot.paste((30, 60, 200), (10, 10, 30, 30))
    mask = np.asarray(foreground_mask(shot))
    assert mask[0, 0] == 0 and mask[20, 20] == 255
    busy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 30, 3), dtype=np.uint8))
    assert np.asarray(foreground_mask(busy)).min() == 255  # no plain background: keep the whole picture


def test_augment_probability(products):
    rng = np.random.default_rng(0)
    assert PhonePhotoAugment(p=0.0)(products[2], rng) is products[2]
    out = PhonePhotoAugment(p=1.0, out_size=64)(products[2], rng)
    assert out.size == (64, 64) and out.mode == "RGB"


def test_phone_queries_from_a_catalog(tmp_path, products):
    lines = []
    for k, img in enumerate(products):
        img.save(tmp_path / f"p{k}.png")
        lines.append(json.dumps({"listing_id": f"p{k}", "image": f"p{k}.png", "labels": {"category": str(k % 2)}}))
    (tmp_path / "catalog.jsonl").write_text("\n".join(lines) + "\n")
    catalog = Catalog.open(tmp_path / "catalog.jsonl")

    queries = make_phone_queries(catalog, 6, seed=5, out_size=96)
    ids = [lid for lid, _ in queries]
    assert len(ids) == 6 and len(set(ids)) == 6 and set(ids) <= {r.listing_id for r in catalog.rows}
    again = make_phone_queries(catalog, 6, seed=5, out_size=96)
    assert [(lid, p.tobytes()) for lid, p in queries] == [(lid, p.tobytes()) for lid, p in again]
    assert len(make_phone_queries(catalog, 50, seed=5, out_size=64)) == len(products)  # at most every listing
    assert "simulated" in SIMULATED_NOTE
