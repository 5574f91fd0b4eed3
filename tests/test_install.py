"""The install: timm imports on CPU torch through the torchvision shim, and every verb has --help."""
from __future__ import annotations

import subprocess
import sys

import pytest


def test_timm_imports_and_builds_efficientnet_lite_on_cpu_torch():
    code = ("import torch, timm, torchvision; "
            "m = timm.create_model('tf_efficientnet_lite0', pretrained=False, num_classes=0); "
            "print(torch.__version__, torch.cuda.is_available(), m.num_features)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    version, cuda, features = out.stdout.split()
    assert version.startswith("2.13.0") and features == "1280"


def test_torchvision_detection_ops_fail_loudly_not_silently():
    # The shim only declares schemas; calling an op must still raise, never return a wrong answer.
    import torch
    import torchvision

    with pytest.raises(RuntimeError):
        torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)


def _verbs(parser, prefix=()):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,)
                yield from _verbs(sub, prefix + (name,))


def test_every_verb_has_help(capsys):
    from lookalike.cli.main import build_parser, main

    verbs = list(_verbs(build_parser()))
    assert ("store", "up") in verbs
    for verb in verbs:
        try:  # argparse's help exits; verbs whose help lists per-pipeline parameters return instead
            code = main([*verb, "--help"])
        except SystemExit as exit_info:
            code = exit_info.code
        assert code == 0, verb
        out = capsys.readouterr().out
        assert "usage: lookalike " + " ".join(verb) in out, verb
