"""Training settings are declared once (lookalike/training/settings.py): every one is a flag of
`lookalike train` and, unless it belongs to that command's own final evaluation, a parameter of the
train pipelines, with the same name and default."""
from __future__ import annotations

import contextlib
import io
import json
import re

import pytest

from lookalike.cli.main import build_parser, main
from lookalike.core.errors import InputError
from lookalike.training.settings import TrainConfig, default_of, flag, from_arguments, settings


def _help(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(argv)
    return out.getvalue()


def _parameter_lines(pipeline_help: str) -> dict[str, str]:
    """`  name (Type, default X)` lines of `lookalike pipeline run NAME --help`, by name."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^  (\w+) \((.*)\)$", pipeline_help, re.M)}


@pytest.fixture(scope="module")
def helps() -> tuple[str, str]:
    return _help(["train", "--help"]), _help(["pipeline", "run", "train", "--help"])


@pytest.mark.parametrize("f", settings(), ids=lambda f: f.name)
def test_every_setting_is_a_flag_and_a_pipeline_parameter_with_one_default(f, helps):
    train_help, pipeline_help = helps
    default = default_of(f)
    assert flag(f.name) in train_help, f"{flag(f.name)} missing from lookalike train --help"
    parsed = getattr(build_parser().parse_args(["train", "--catalog", "c"]), f.name)
    assert from_arguments(build_parser().parse_args(["train", "--catalog", "c"])).to_dict()[f.name] == default
    if isinstance(default, (list, dict)):
        assert parsed in ("",), parsed  # the empty list/dict, as the command line writes it
    else:
        assert parsed == default
    parameters = _parameter_lines(pipeline_help)
    if f.metadata["pipeline"]:
        assert f.name in parameters, f"{f.name} missing from lookalike pipeline run train --help"
        assert parameters[f.name].endswith(f"default {json.dumps(default)}"), (f.name, parameters[f.name])
    else:
        assert f.name not in parameters
        assert "lookalike train only" in " ".join(train_help.split())


def test_settings_read_back_with_their_declared_types():
    config = TrainConfig.from_settings({"learning_rate": "0.01", "steps": "12", "flip": "false",
                                        "tasks": "category,color", "task_weights": "color=2", "device": "cpu"})
    assert (config.learning_rate, config.steps, config.flip) == (0.01, 12, False)
    assert config.tasks == ["category", "color"] and config.task_weights == {"color": 2.0}
    with pytest.raises(InputError, match="unknown training settings lr"):
        TrainConfig.from_settings({"lr": 0.1})
    with pytest.raises(InputError, match="steps wants a int"):
        TrainConfig.from_settings({"steps": "1.5"})
    with pytest.raises(InputError, match="device must be"):
        TrainConfig(device="tpu")


def test_a_flag_sets_its_setting():
    args = build_parser().parse_args(["train", "--catalog", "c", "--learning-rate", "0.5", "--no-flip",
                                      "--tasks", "color", "--weights", "none"])
    config = from_arguments(args)
    assert config.learning_rate == 0.5 and config.flip is False and config.tasks == ["color"]
    assert config.pretrained is None
