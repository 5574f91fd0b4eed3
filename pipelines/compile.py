"""Compile every pipeline to Kubeflow's IR YAML; the results are checked in under pipelines/compiled/.

`python -m lookalike.pipelines.compile [OUT_DIR]` or `lookalike pipeline compile` rewrites them; a test fails when
the checked-in files are stale.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import Any

from lookalike.core.errors import InputError

COMPILED_DIR = Path(__file__).resolve().parent / "compiled"


def compiled_path(name: str, out_dir: str | Path = COMPILED_DIR) -> Path:
    return Path(out_dir) / f"{name}.yaml"


def compile_pipeline(name: str, out_dir: str | Path = COMPILED_DIR) -> Path:
    """Compile one pipeline (`train`, `index`, `update`, `train-and-index`) to OUT_DIR/NAME.yaml."""
    from kfp import compiler

    from lookalike.pipelines.definitions import PIPELINES

    if name not in PIPELINES:
        raise InputError(f"unknown pipeline {name!r}; choose one of {', '.join(PIPELINES)}")
    path = compiled_path(name, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(PIPELINES[name], str(path))
    path.write_text(_stable_header(path.read_text()))
    return path


_DEFAULT_LINE = re.compile(r"^(#\s+\w+: \w+ \[Default: )(.*)(\])$")


def _stable_header(text: str) -> str:
    """The compiler's header comment prints dict defaults in protobuf map order, which changes between
    runs; print them with sorted keys so the same code always compiles to the same bytes."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not line.startswith("#"):
            break
        match = _DEFAULT_LINE.match(line)
        if match:
            try:
                value = ast.literal_eval(match.group(2))
            except (ValueError, SyntaxError):
                continue
            lines[i] = match.group(1) + repr(_sorted(value)) + match.group(3)
    return "\n".join(lines)


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def compile_all(out_dir: str | Path = COMPILED_DIR) -> list[Path]:
    """Compile every pipeline into `out_dir`; return the files written."""
    from lookalike.pipelines.definitions import PIPELINES

    return [compile_pipeline(name, out_dir) for name in PIPELINES]


if __name__ == "__main__":
    for written in compile_all(sys.argv[1] if len(sys.argv) > 1 else COMPILED_DIR):
        print(written)
