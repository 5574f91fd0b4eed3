"""The phone-photo simulator: seeded, the right size and mode, really different from the catalog image; two
recipes that share no background, seed or cast model (the judge is never the coach); products cut out or
pasted whole; colour casts that keep colour labels true or say so; and the query set built from a catalog."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lookalike.catalogs.rows import Catalog
from lookalike.catalogs.importers import load_fashion_mnist
from lookalike.training.phone_photos import (EVALUATION, SIMULATED_NOTE, STRONG_CAST, TRAINING, background_photos,
                                             foreground_mask, make_phone_queries, recipe_of, simulate,
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


def _studio_shot() -> Image.Image:
    """A red product on a white studio background, as a photo catalog has them."""
    shot = Image.new("RGB", (120, 120), (252, 252, 252))
    shot.paste((200, 30, 30), (30, 30, 90, 90))
    return shot


def test_the_two_recipes_share_no_background_and_no_photo():
    assert not set(TRAINING.backgrounds) & set(EVALUATION.backgrounds)
    assert TRAINING.seed_salt != EVALUATION.seed_salt
    for recipe in ("training", "evaluation"):
        photos = background_photos(256, recipe)
        assert len(photos) == len(recipe_of(recipe).backgrounds) and all(max(p.size) <= 256 for p in photos)
    shot = _studio_shot()
    a = simulate_phone_photo(shot, 3, out_size=96, recipe=TRAINING)
    b = simulate_phone_photo(shot, 3, out_size=96, recipe=EVALUATION)
    assert np.abs(_pixels(a) - _pixels(b)).mean() > 10
    with pytest.raises(ValueError, match="unknown phone-photo recipe"):
        recipe_of("holiday")


def test_the_product_is_cut_out_or_pasted_whole():
    shot = _studio_shot()
    white = []
    for cutout in (True, False):
        photo = _pixels(simulate_phone_photo(shot, 5, out_size=128, cutout=cutout, strength=0.5))
        white.append(float((photo.min(axis=2) > 200).mean()))  # the studio background's near-white pixels
    assert white[1] > white[0] + 0.05  # pasted whole, the white background comes along
    photo, info = simulate(shot, 5, out_size=128, cutout=True)
    assert info.cutout is True


def test_colour_casts_are_mild_in_evaluation_and_reported_in_training():
    shot = _studio_shot()
    evaluation = [simulate(shot, k, out_size=64, recipe=EVALUATION)[1].cast for k in range(40)]
    training = [simulate(shot, k, out_size=64, recipe=TRAINING)[1].cast for k in range(40)]
    assert max(evaluation) <= STRONG_CAST  # an evaluation photo never turns a colour into another
    assert max(training) > STRONG_CAST  # a training view may: training then drops its colour label
    photo = _pixels(simulate_phone_photo(shot, 2, out_size=128, recipe=EVALUATION, cutout=True, strength=0.3))
    red = photo[48:80, 48:80].reshape(-1, 3).mean(0)
    assert red[0] > 1.8 * max(red[1], red[2])  # the red product is still red


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
    assert "simulated" in SIMULATED_NOTE and "evaluation recipe" in SIMULATED_NOTE
    # the queries are the evaluation recipe's: the training recipe makes other photos of the same listings
    trained = make_phone_queries(catalog, 6, seed=5, out_size=96, recipe="training")
    assert [lid for lid, _ in trained] != ids or all(a.tobytes() != b.tobytes()
                                                      for (_, a), (_, b) in zip(queries, trained))


def test_phone_queries_of_a_listing_with_several_photos_use_one_of_them(tmp_path, products):
    photos = []
    for k in range(3):
        products[k].save(tmp_path / f"v{k}.png")
        photos.append({"uri": f"v{k}.png", "photo_id": f"v{k}"})
    (tmp_path / "catalog.jsonl").write_text(json.dumps({"listing_id": "L", "images": photos,
                                                        "labels": {"category": "x"}}) + "\n")
    queries = make_phone_queries(Catalog.open(tmp_path / "catalog.jsonl"), 5, seed=1, out_size=64)
    assert [lid for lid, _ in queries] == ["L"]  # one query per listing, not per photo
