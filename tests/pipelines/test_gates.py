"""The index gates judge recall only on a sample large enough to mean something."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from lookalike.pipelines.steps.gates import MIN_GATE_SAMPLE, check_index_gates
from lookalike.pipelines.steps.runner import GateFailed


def _metrics(tmp_path, name: str, values: dict):
    path = tmp_path / name
    path.write_text(json.dumps(values))
    return SimpleNamespace(path=str(path), metadata={})


def test_a_recall_over_one_photo_is_not_gated_but_a_real_sample_is(tmp_path, capsys):
    build = _metrics(tmp_path, "build", {"index_recall@10": 0.99})
    one = _metrics(tmp_path, "one", {"phone_recall@10": 0.0, "phone_queries": 1})
    assert check_index_gates(build, one, 0.9, 0.2) == {"passed": True}
    assert "too small a sample to judge" in capsys.readouterr().out
    many = _metrics(tmp_path, "many", {"phone_recall@10": 0.0, "phone_queries": MIN_GATE_SAMPLE})
    with pytest.raises(GateFailed, match="phone_recall@10"):
        check_index_gates(build, many, 0.9, 0.2)
    low = _metrics(tmp_path, "low", {"index_recall@10": 0.5})
    with pytest.raises(GateFailed, match="index_recall@10"):
        check_index_gates(low, one, 0.9, 0.2)  # the IVF-vs-exact recall is gated whatever the sample
