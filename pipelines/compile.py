"""Compile every pipeline to Kubeflow's IR YAML; the results are checked in under pipelines/compiled/.

`python -m pipelines.compile [OUT_DIR]` or `lookalike pipeline compile` rewrites them; a test fails when
the checked-in files are stale.
"""
from __future__ import annotations

import sys
from pathlib import Path

COMPILED_DIR = Path(__file__).resolve().parent / "compiled"


def compiled_path(name: str, out_dir: str | Path = COMPILED_DIR) -> Path:
    return Path(out_dir) / f"{name}.yaml"


def compile_pipeline(name: str, out_dir: str | Path = COMPILED_DIR) -> Path:
    """Compile one pipeline (`train`, `index`, `update`, `train-and-index`) to OUT_DIR/NAME.yaml."""
    from kfp import compiler

    from pipelines.definitions import PIPELINES

    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; choose one of {', '.join(PIPELINES)}")
    path = compiled_path(name, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(PIPELINES[name], str(path))
    return path


def compile_all(out_dir: str | Path = COMPILED_DIR) -> list[Path]:
    """Compile every pipeline into `out_dir`; return the files written."""
    from pipelines.definitions import PIPELINES

    return [compile_pipeline(name, out_dir) for name in PIPELINES]


if __name__ == "__main__":
    for written in compile_all(sys.argv[1] if len(sys.argv) > 1 else COMPILED_DIR):
        print(written)
