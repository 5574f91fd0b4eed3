"""Box geometry: reading a box off an objectness map, the context crop, the input window, app boxes."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lookalike.core.boxes import (MAX_AREA, MIN_CONFIDENCE, Localisation, box_from_objectness, context_box,
                                  crop_to_box, from_input_box, parse_box)
from lookalike.core.errors import InputError
from lookalike.core.preprocessing import PreprocessSpec, crop_window, resize_and_crop


def test_a_block_of_sure_cells_is_boxed_where_it_is():
    prob = np.zeros((7, 7), np.float32)
    prob[1:4, 4:7] = 0.95  # rows 1-3, columns 4-6: the top right
    found = box_from_objectness(prob)
    assert found is not None
    x0, y0, x1, y1 = found.box
    assert 4 / 7 - 0.1 < x0 < 4 / 7 + 0.05 and x1 == pytest.approx(1.0, abs=0.02)
    assert 1 / 7 - 0.1 < y0 < 1 / 7 + 0.05 and 4 / 7 - 0.05 < y1 < 4 / 7 + 0.1
    assert found.confidence > 0.7 and found.usable


def test_nothing_sure_is_no_box_and_a_vague_map_is_not_usable():
    assert box_from_objectness(np.full((7, 7), 0.2, np.float32)) is None
    assert box_from_objectness(np.full((7, 7), np.nan, np.float32)) is None
    vague = box_from_objectness(np.full((7, 7), 0.55, np.float32))
    assert vague is not None and vague.area > MAX_AREA and not vague.usable  # the whole photo: no crop
    unsure = Localisation((0.1, 0.1, 0.5, 0.5), MIN_CONFIDENCE - 0.01)
    assert not unsure.usable


def test_the_context_box_is_square_holds_the_box_and_stays_in_the_photo():
    for box, (w, h) in [((0.1, 0.2, 0.3, 0.9), (400, 300)), ((0.8, 0.8, 1.0, 1.0), (300, 400)),
                        ((0.0, 0.0, 1.0, 0.3), (200, 200))]:
        crop = context_box(box, w, h)
        assert 0 <= crop[0] <= box[0] and 0 <= crop[1] <= box[1]
        assert box[2] <= crop[2] <= 1 and box[3] <= crop[3] <= 1
        side_w, side_h = (crop[2] - crop[0]) * w, (crop[3] - crop[1]) * h
        if max(box[2] - box[0], box[3] - box[1]) < 0.6:  # room to be square
            assert side_w == pytest.approx(side_h, abs=1.0)


def test_a_box_on_the_model_input_maps_back_through_the_centre_crop():
    spec = PreprocessSpec(size=64, resize=64, crop="center")
    w, h = 200, 100  # a wide photo: its input shows the centre 100 x 100
    window = crop_window(w, h, spec)
    assert window == pytest.approx((50.0, 0.0, 150.0, 100.0))
    assert from_input_box((0.0, 0.0, 1.0, 1.0), w, h, window) == pytest.approx((0.25, 0.0, 0.75, 1.0))
    assert from_input_box((0.5, 0.5, 1.0, 1.0), w, h, window) == pytest.approx((0.5, 0.5, 0.75, 1.0))
    # the window is what resize_and_crop shows: a marked pixel lands where the window says
    img = Image.new("RGB", (w, h))
    img.putpixel((60, 10), (255, 255, 255))
    arr = np.asarray(resize_and_crop(img, PreprocessSpec(size=100, resize=100, crop="center",
                                                         interpolation="nearest")))
    assert arr[10, 10].max() == 255


def test_app_boxes_are_parsed_and_refused_with_what_to_send():
    assert parse_box("0.1,0.2,0.5,0.6") == (0.1, 0.2, 0.5, 0.6)
    assert parse_box(None) is None and parse_box("") is None
    for bad in ("0.5,0.5,0.4,0.9", "1,2,3", "a,b,c,d", "0.1,0.1,1.5,0.9"):
        with pytest.raises(InputError, match="box"):
            parse_box(bad)
    assert crop_to_box(Image.new("RGB", (100, 50)), (0.5, 0.0, 1.0, 1.0)).size == (50, 50)


def _two_objects() -> np.ndarray:
    """A bright product top left (the peak) and a dimmer second thing bottom right."""
    prob = np.zeros((14, 14), np.float32)
    prob[1:6, 1:6] = 1.0
    prob[10:13, 10:13] = 0.7
    return prob


def test_the_peak_rule_boxes_one_object_where_cells_box_both():
    both = box_from_objectness(_two_objects())
    one = box_from_objectness(_two_objects(), rule="peak")
    assert both is not None and one is not None
    assert both.box[2] > 0.85 and both.box[3] > 0.85  # the box of every hot cell reaches the second thing
    assert one.box[2] < 0.5 and one.box[3] < 0.5 and one.box[0] < 0.15  # the peak's object alone
    assert one.confidence > both.confidence


def test_the_otsu_rule_cuts_where_the_map_separates_not_at_one_half():
    prob = np.full((14, 14), 0.1, np.float32)
    prob[4:10, 3:8] = 0.4  # a dim product: nothing reaches one half
    assert box_from_objectness(prob) is None
    found = box_from_objectness(prob, rule="otsu")
    assert found is not None
    assert found.box[0] == pytest.approx(3 / 14, abs=0.05) and found.box[2] == pytest.approx(8 / 14, abs=0.05)
    assert found.box[1] == pytest.approx(4 / 14, abs=0.05) and found.box[3] == pytest.approx(10 / 14, abs=0.05)


def test_the_mass_rule_fits_a_uniform_block_and_every_rule_refuses_a_bad_map():
    prob = np.zeros((7, 7), np.float32)
    prob[2:5, 1:4] = 1.0
    found = box_from_objectness(prob, rule="mass")
    assert found is not None  # mean ± sqrt(3) std of a uniform block is that block (blurred a little)
    assert found.box[0] == pytest.approx(1 / 7, abs=0.06) and found.box[2] == pytest.approx(4 / 7, abs=0.06)
    assert found.box[1] == pytest.approx(2 / 7, abs=0.06) and found.box[3] == pytest.approx(5 / 7, abs=0.06)
    for rule in ("cells", "otsu", "peak", "mass"):
        assert box_from_objectness(np.full((7, 7), np.nan, np.float32), rule=rule) is None
        assert box_from_objectness(np.zeros((7, 7), np.float32), rule=rule) is None
    with pytest.raises(ValueError, match="box rule"):
        box_from_objectness(prob, rule="guess")
