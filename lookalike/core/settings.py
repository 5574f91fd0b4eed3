"""Settings read from the environment, in one place: each variable, its default and what it sets.

The S3 connection (`LOOKALIKE_S3_*`, `AWS_*`) is `lookalike.core.s3.S3Settings`, and each server's
flags take their `LOOKALIKE_*` defaults in its `__main__` (they are that server's command line, set by
the InferenceService's env); everything else the project reads from the environment is here.

    LOOKALIKE_HOME            .lookalike        local state: the embedded store (s3/), pipeline runs,
                                                models, logs, the emoji sources, the demo's output
    LOOKALIKE_CACHE           ~/.cache/lookalike  downloaded artifacts and decoded catalog images
    LOOKALIKE_PROGRESS        1                 0: log lines instead of progress bars in pipeline steps
    LOOKALIKE_ORT_THREADS     0 (all cores)     ONNX Runtime threads of the CPU embedder
    LOOKALIKE_ORT_SPIN        0                 1: let ONNX Runtime's idle threads spin (latency over CPU)
    LOOKALIKE_DECODE_THREADS  0 (the CPU limit) the transformer's decode and preprocess threads
    LOOKALIKE_MANIFESTS       manifests/        the Kustomize tree `lookalike manifests` checks
    LOOKALIKE_KSERVE_SCHEMAS  (found beside it) KServe CRD schemas the manifest checks validate against
    LOOKALIKE_KUBECTL         (found on PATH)   the kubectl binary that renders the overlays
"""
from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """$LOOKALIKE_HOME, default `.lookalike` in the working directory."""
    return Path(os.environ.get("LOOKALIKE_HOME", ".lookalike"))


def cache_dir() -> Path:
    """$LOOKALIKE_CACHE, default ~/.cache/lookalike."""
    return Path(os.environ.get("LOOKALIKE_CACHE") or Path.home() / ".cache" / "lookalike")


def progress_bars() -> bool:
    return os.environ.get("LOOKALIKE_PROGRESS", "1") != "0"


def ort_threads() -> int:
    """ONNX Runtime threads asked for (0: all the cores the process may use)."""
    return env_int("LOOKALIKE_ORT_THREADS", 0)


def ort_spin() -> bool:
    return os.environ.get("LOOKALIKE_ORT_SPIN", "0") == "1"


def decode_threads() -> int:
    """The transformer's decode threads asked for (0: as many as the CPU limit allows)."""
    return env_int("LOOKALIKE_DECODE_THREADS", 0)


def manifests_override() -> Path | None:
    value = os.environ.get("LOOKALIKE_MANIFESTS")
    return Path(value) if value else None


def kserve_schemas_override() -> Path | None:
    value = os.environ.get("LOOKALIKE_KSERVE_SCHEMAS")
    return Path(value) if value else None


def kubectl_override() -> str | None:
    return os.environ.get("LOOKALIKE_KUBECTL") or None


def env_int(name: str, default: int) -> int:
    """An integer variable; a value that is not one is an error that names the variable."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        from lookalike.core.errors import InputError

        raise InputError(f"{name} must be an integer, got {value!r}") from None


def cpu_limit() -> int:
    """The CPUs this process may use: the container's CPU quota (cgroup v2 `cpu.max`, or v1's quota and
    period) when it has one, else the CPUs it is scheduled on. Pools sized by `os.cpu_count()` would take
    every core of the node, whatever the pod's limit says."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    if quota:
        cpus = min(cpus, max(1, int(quota + 0.999)))
    return max(1, cpus)


def _cgroup_quota() -> float | None:
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None
