"""Run a pipeline on this machine with `kfp.local`, against the configured (embedded) store.

The same pipeline spec that compiles for Kubeflow runs here with `SubprocessRunner(use_venv=False)`:
each task is a subprocess of this Python, so the project is already installed (nothing is fetched)
and the `LOOKALIKE_S3_*` settings reach every task through the inherited environment. Artifacts pass
between tasks through a local pipeline root; publishing to S3 is done by the components themselves.

What differs from a cluster, on purpose:

- kfp-kubernetes settings (GPU pool, Secret, images) and resource requests have no meaning here and are
  ignored by kfp.local; the warnings saying so are folded into one line.
- KFP retries are dropped: on one machine a failed step is not a preempted node, and retrying a
  deterministic failure (a bad catalog, a failed gate) only delays the message. The store client
  retries its own requests.
- Loops run one item at a time: kfp.local runs a loop's items in threads, and each swaps
  `builtins.print` for an indenting one while its task runs; concurrent swaps interleave the tasks'
  output and can leave `print` indented for the rest of the process. The items here are small.
- The console shows one line per step ([3/9] train-model ...) with the steps' own output and progress
  bars; a step run once per item of a loop (a confusion matrix per head) shows as one line per item
  beneath, uncounted. KFP's executor chatter is hidden unless `verbose`. When a step fails, the error
  names the step and carries its message.

Errors: a run that fails raises `PipelineFailed` and a pipeline or parameter that does not exist an
`InputError`, both of the `lookalike.core.errors` family, so the command line prints them as one line.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from lookalike.core.settings import home
from lookalike.pipelines.steps import STEP_FAILED
from lookalike.core.errors import InputError, LookalikeError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXECUTING = re.compile(r"Executing task '([^']+)'")
_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
_CACHE_HIT = re.compile(r"Task '([^']+)' cache hit")


class PipelineFailed(LookalikeError):
    """A local run failed; the message names the step and says why (and what to do)."""

    def __init__(self, message: str, step: str | None = None, run_dir: Path | None = None):
        super().__init__(message)
        self.step = step
        self.run_dir = run_dir


@dataclass
class LocalRun:
    pipeline: str
    outputs: dict[str, Any]
    run_dir: Path
    seconds: float
    steps: list[tuple[str, float]] = field(default_factory=list)  # (task, seconds), in order


def default_root() -> Path:
    return home() / "pipeline-runs"


def run_local(name: str, params: dict[str, Any] | None = None, *, root: str | Path | None = None,
              verbose: bool = False, caching: bool = False, out: TextIO | None = None) -> LocalRun:
    """Run pipeline `name` (train, index, update, train-and-index) locally; return its outputs.

    Raises PipelineFailed naming the failed step and its message, InputError for a pipeline or a
    parameter that does not exist or a required parameter that is missing.
    """
    from kfp import local
    from kfp.local import pipeline_orchestrator

    from lookalike.pipelines.definitions import PIPELINES

    if name not in PIPELINES:
        raise InputError(f"unknown pipeline {name!r}; choose one of {', '.join(PIPELINES)}")
    pipeline = PIPELINES[name]
    params = dict(params or {})
    unknown = sorted(set(params) - set(pipeline.component_spec.inputs or {}))
    if unknown:
        raise InputError(f"pipeline {name} has no parameter {', '.join(unknown)}; "
                         f"see `lookalike pipeline run {name} --help`")
    missing = [p for p in pipeline.required_inputs if p not in params]
    if missing:
        raise InputError(f"pipeline {name} needs {', '.join(missing)}: pass --param {missing[0]}=...")
    root = Path(root or default_root()).resolve()
    root.mkdir(parents=True, exist_ok=True)
    spec = _for_one_machine(pipeline.pipeline_spec)
    out = out or sys.stdout
    steps, each = _steps(spec)
    console = _Console(out, total=steps, verbose=verbose, each=each)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True,
               enable_caching=caching)
    env = {"TQDM_MININTERVAL": os.environ.get("TQDM_MININTERVAL", "5"), "PYTHONUNBUFFERED": "1",
           # Sleeping OpenMP workers: spinning ones starve the other processes of a small shared machine.
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    started = time.perf_counter()
    before = set(root.iterdir())
    print(f"running pipeline {name} locally ({console.total} steps); artifacts under {root}", file=out, flush=True)
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(max(level, logging.WARNING))  # kfp.local's own INFO lines outside its log context
    try:
        with _environ(env), warnings.catch_warnings(), contextlib.redirect_stdout(console):
            # kfp.local warns for each task that its image, resources and display name are not used here.
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.filterwarnings("ignore", message=r".*no effect in the current local runner.*")
            outputs = pipeline_orchestrator.run_local_pipeline(pipeline_spec=spec, arguments=params)
    except RuntimeError as exc:
        console.flush()
        run_dir = _new_dir(root, before)
        step = console.failed_step
        reason = console.failure or _ANSI.sub("", str(exc))
        raise PipelineFailed(f"pipeline {name} failed at step {step or '?'}: {reason}"
                             f"{_nothing_published(console)}", step, run_dir) from None
    finally:
        root_logger.setLevel(level)
    console.flush()
    seconds = time.perf_counter() - started
    print(f"pipeline {name} finished in {seconds:.0f} s", file=out, flush=True)
    return LocalRun(name, _plain(outputs), _new_dir(root, before) or root, seconds, console.durations)


def _nothing_published(console: _Console) -> str:
    published = [s for s in console.done if s.startswith("publish")]
    if published:
        return f" (already published by {', '.join(published)})"
    return ". Nothing was published; the production aliases are unchanged"


def _for_one_machine(spec):
    """A copy of the pipeline spec without retry policies, whose loops run one item at a time (see the
    module note)."""
    copy = type(spec)()
    copy.CopyFrom(spec)
    dags = [copy.root.dag] + [component.dag for component in copy.components.values() if component.HasField("dag")]
    for dag in dags:
        for task in dag.tasks.values():
            task.ClearField("retry_policy")
            if task.WhichOneof("iterator"):
                task.iterator_policy.parallelism_limit = 1
    return copy


def _steps(spec) -> tuple[int, set[str]]:
    """The number of steps a run shows as [n/total], and the names of the tasks inside loops, which run
    once per item and show beneath the steps without being counted."""
    each = {name for component in spec.components.values() if component.HasField("dag")
            for name in component.dag.tasks}
    steps = sum(1 for task in spec.root.dag.tasks.values()
                if not spec.components[task.component_ref.name].HasField("dag"))
    return steps, each


def _plain(outputs: Any) -> dict[str, Any]:
    if outputs is None:
        return {}
    if isinstance(outputs, dict):
        return dict(outputs)
    return {"Output": outputs}


def _new_dir(root: Path, before: set[Path]) -> Path | None:
    fresh = sorted((p for p in root.iterdir() if p not in before and p.is_dir()), key=lambda p: p.stat().st_mtime)
    return fresh[-1] if fresh else None


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _Console(io.TextIOBase):
    """Stands in for stdout while kfp.local runs: shows step progress, hides the executor's chatter,
    and remembers the marked failure message of the step that failed."""

    def __init__(self, out: TextIO, total: int, verbose: bool, each: set[str] = frozenset()):
        self.out, self.total, self.verbose, self.each = out, total, verbose, set(each)
        self._lock = threading.Lock()  # kfp.local runs the items of a loop in threads, writing at once
        self._buffer = ""
        self._skipping_json = False
        self._skipping_outputs = False
        self.started = 0
        self.current: str | None = None
        self._step_started = 0.0
        self.durations: list[tuple[str, float]] = []
        self.done: list[str] = []
        self.failed_step: str | None = None
        self.failure: str | None = None
        self._failure_lines: list[str] | None = None

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            self._buffer += text
            while "\n" in self._buffer:
                line, self._buffer = self._buffer.split("\n", 1)
                self._line(line)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._buffer:
                line, self._buffer = self._buffer, ""
                self._line(line)
        self.out.flush()

    def _emit(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def _line(self, raw: str) -> None:
        line = _ANSI.sub("", raw)
        text = line.strip()
        if self._failure_lines is not None:  # continuation lines of a marked failure message
            if raw.startswith("        ") and text:
                self._failure_lines.append(text)
                self.failure = "\n  ".join(self._failure_lines)
                self._emit(line)
                return
            self._failure_lines = None
        if (m := _EXECUTING.search(line)) and m.group(1) in self.each:
            self.current = m.group(1)  # one item of a loop: uncounted, but a failure inside it is its own
            return
        if (m := _EXECUTING.search(line)):
            self.started += 1
            self.current, self._step_started = m.group(1), time.perf_counter()
            self._emit(f"[{self.started}/{self.total}] {self.current} ...")
            return
        if (m := _CACHE_HIT.search(line)):
            self.done.append(m.group(1))
            self.durations.append((m.group(1), 0.0))
            self._emit(f"    {m.group(1)}: cached")
            return
        if (m := _FINISHED.search(line)) and m.group(1) in self.each:
            self._skipping_outputs = False  # an item that worked said so itself ("confusion matrix of …: done")
            if m.group(2) != "SUCCESS":
                self.failed_step = self.failed_step or m.group(1)
                self._emit(f"    {m.group(1)}: FAILED")
            return
        if (m := _FINISHED.search(line)):
            self._skipping_outputs = False
            task, state = m.group(1), m.group(2)
            took = time.perf_counter() - self._step_started
            if state == "SUCCESS":
                self.done.append(task)
                self.durations.append((task, took))
                self._emit(f"    {task}: ok ({took:.0f} s)")
            else:
                self.failed_step = self.failed_step or task
                self._emit(f"    {task}: FAILED ({took:.0f} s)")
            return
        if STEP_FAILED in line:
            message = line.split(STEP_FAILED, 1)[1].strip()
            self._emit("    error: " + message)
            if self.failure is None:  # the first failure is the run's; independent steps may fail after it
                self.failed_step = self.failed_step or self.current
                self._failure_lines = [message]
                self.failure = message
            return
        if self.verbose:
            self._emit(line)
            return
        # Hidden: the executor's own log lines and its executor_input JSON dump, kfp's separators,
        # per-task output listings (the summary at the end says what was published).
        if "[KFP Executor" in line:
            self._skipping_json = "Got executor_input" in line
            return
        if self._skipping_json:
            if line.startswith("    }"):
                self._skipping_json = False
            return
        if text.endswith(" outputs:"):
            self._skipping_outputs = True
            return
        if self._skipping_outputs:
            if text and set(text) <= {"-"}:
                self._skipping_outputs = False
            return
        if not text or set(text) <= {"-"} or re.match(r"^\d\d:\d\d:\d\d\.\d+ - ", text):
            return
        if text.startswith(("Streamed logs", "Task '", "Pipeline '", "Running pipeline")):
            return
        if not line.startswith("    "):  # outputs listings of finished tasks are not indented by 4
            return
        self._emit(line)
