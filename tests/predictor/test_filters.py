"""Label filters of a search, parsed and checked against the model's heads."""
from __future__ import annotations

import pytest


def test_filter_parameters_are_parsed_and_checked():
    from lookalike.predictor.service import parse_filters

    tasks = {"category": ["bags", "footwear", "tops"], "fine_category": ["Sandal", "Sneaker"]}
    assert parse_filters({"filter": "category=footwear"}, tasks) == {"category": "footwear"}
    assert parse_filters({"filter": "predicted:category, fine_category=Sneaker"}, tasks) == {
        "category": "predicted", "fine_category": "Sneaker"}
    assert parse_filters({"filter_category": "bags"}, tasks) == {"category": "bags"}
    assert parse_filters({"filter": "category=Tops"}, tasks) == {"category": "tops"}  # case does not matter
    with pytest.raises(ValueError, match="this model's tasks are category, fine_category"):
        parse_filters({"filter": "colour=red"}, tasks)
    with pytest.raises(ValueError, match="not understood"):
        parse_filters({"filter": "category"}, tasks)
    with pytest.raises(ValueError, match="no category is called 'spaceships': the category labels are bags"):
        parse_filters({"filter": "category=spaceships"}, tasks)
