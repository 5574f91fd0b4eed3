"""The model card (lookalike/core/model_card.py) and the error family (lookalike/core/errors.py): one home each."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lookalike.core.artifacts import ChecksumMismatch, build_manifest
from lookalike.core.errors import is_user_error, status_of
from lookalike.core.model_card import CARD_FILE, ModelCard, ModelCardError
from lookalike.core.preprocessing import PreprocessSpec


def _card(version: str = "v1") -> ModelCard:
    return ModelCard(model_version=version, architecture="tf_efficientnet_lite0", embedding_dim=32,
                     preprocessing=PreprocessSpec(size=64, resize=72), heads={"category": ["bags", "tops"]},
                     metrics={"acc": 0.5}, lineage={"catalog": "c.jsonl"})


def test_card_round_trips_and_is_found_in_a_model_subfolder(tmp_path):
    card = _card()
    card.write(tmp_path / "model")
    read = ModelCard.read(tmp_path)  # a mounted pair: <dir>/model/ + <dir>/index/
    assert read == card and read.folder == tmp_path / "model"
    assert read.preprocessing == PreprocessSpec(size=64, resize=72)
    assert read.output_names == ["embedding", "probs_category"]
    assert read.replace(metrics={"acc": 0.9}).metrics == {"acc": 0.9} and read.metrics == {"acc": 0.5}


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format=99), "format 99"),
    (lambda d: d.pop("preprocessing"), "lacks preprocessing"),
    (lambda d: d.update(preprocessing={"size": 64, "resize": 32}), "not a valid model card"),
])
def test_a_bad_card_is_refused_with_what_to_do(tmp_path, change, message):
    data = _card().to_dict()
    change(data)
    (tmp_path / CARD_FILE).write_text(json.dumps(data))
    with pytest.raises(ModelCardError, match=message) as caught:
        ModelCard.read(tmp_path)
    assert is_user_error(caught.value) and status_of(caught.value) == 503


def test_no_card_and_a_tampered_published_folder_are_refused(tmp_path):
    with pytest.raises(ModelCardError, match="holds no model.json"):
        ModelCard.read(tmp_path)
    _card().write(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"graph")
    (tmp_path / "MANIFEST.json").write_text(json.dumps(build_manifest(tmp_path, "v1")))
    assert ModelCard.read(tmp_path).model_version == "v1"
    (tmp_path / "model.onnx").write_bytes(b"grapH")
    with pytest.raises(ChecksumMismatch, match="model.onnx"):
        ModelCard.read(tmp_path)
    assert ModelCard.read(tmp_path, verify=False).model_version == "v1"  # for a folder verified just before
    with pytest.raises(ModelCardError, match="never edited"):
        _card().write(tmp_path)


def test_the_card_needs_no_torch():
    code = "import sys, lookalike.core.model_card; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
