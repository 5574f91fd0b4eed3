"""How a step runs: its one marked failure line, the errors it raises, the device it asks for, its metrics.

A KFP component calls `run_step(name, work, **artifacts)`. A failure the project raises on purpose (the
`lookalike.core.errors` family: a bad catalog, a store that does not answer, a failed gate) prints one line
marked with `STEP_FAILED` and its message, without a traceback; `lookalike.pipelines.local` finds that line and
shows it as the run's error. Anything else is a bug: its traceback is printed first, then the same line.
"""
from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any
from collections.abc import Callable

from lookalike.core.settings import progress_bars
from lookalike.core.errors import LookalikeError, is_user_error

STEP_FAILED = "lookalike-step-failed:"  # the marker line a failed step prints (read by lookalike.pipelines.local)

# KFP's executor logs at INFO; FAISS's loader would then list every CPU-specific build it did not find.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)


class StepError(LookalikeError):
    """A step cannot go on; the message says what is wrong and what to do."""


class GateFailed(StepError):
    """The new model or index is not good enough to publish; nothing was published."""


def run_step(name: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Run one step's work. Any failure prints the marked message and exits 1; only a failure that is
    not the user's to fix (a bug) prints its traceback too."""
    started = time.perf_counter()
    try:
        result = fn(**kwargs)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one marked line
        if not is_user_error(exc):
            traceback.print_exc()
        message = str(exc).strip() or type(exc).__name__
        print(f"{STEP_FAILED} {name}: {message}".replace("\n", "\n    "), flush=True)
        raise SystemExit(1) from None
    print(f"{name}: done in {time.perf_counter() - started:.1f} s", flush=True)
    return result


def progress() -> bool:
    """Whether steps draw progress bars (LOOKALIKE_PROGRESS=0 turns them into nothing)."""
    return progress_bars()


def check_device(device: str) -> str:
    """`auto`, `cpu` or `cuda`; asking for CUDA on a machine without it fails with what to do."""
    if device not in ("auto", "cpu", "cuda"):
        raise StepError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise StepError("device=cuda was asked for but this machine has no CUDA GPU: on Kubernetes make "
                            "sure the task landed on the GPU node pool (gpu_node_selector / gpu_toleration), "
                            "locally use device=auto or cpu")
    return device


def read_metrics(artifact) -> dict[str, Any]:
    """The metrics a step logged: the JSON it wrote at the artifact's path, else the artifact's metadata."""
    path = Path(artifact.path)
    if path.is_file() and path.stat().st_size:
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass
    return {k: v for k, v in dict(artifact.metadata).items() if k != "display_name"}


def write_metrics(artifact, values: dict[str, Any]) -> None:
    """Log scalar metrics (shown by the KFP UI) and keep them all as JSON at the artifact's path."""
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            artifact.log_metric(key, float(value))
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(json.dumps(values, indent=2, sort_keys=True))
