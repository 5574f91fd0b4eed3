"""The balanced multitask sampler: every mini-batch holds the same number of listings from each task,
and, within a task, minority classes are drawn more often than their share.

A task's dataset is the listings that carry its label, so a label present on few products (colour,
material) has a small dataset. Drawing `samples_per_task` listings from each task's dataset per batch
keeps such a task from being drowned by the dense ones: its head sees as many samples per step as any
other. The data loader then shows each drawn listing under several views (P listings x K views: its
other photos, simulated phone photos), which the identity objectives need.

Within a task, classes are balanced by square-root-inverse-frequency sampling (`class_power` 0.5): a
listing of class c is drawn with probability proportional to n_c^(power-1), so class c as a whole gets
a share proportional to n_c^power. Power 1 is the catalog's own mix (a colour on 3 of 66 listings is
seen 3/66 of the time), 0 is every class equally often (its 3 listings would be seen over and over);
the square root sits between, as in long-tail recognition (Mahajan et al., 2018; Kang et al., 2020):
a minority colour is seen about twice as often as its share without repeating its few listings until
they are memorised.

Deterministic: batch `step` depends only on (seed, step), never on how batches were consumed, so a run
restarted at step k sees the same batches from k on. Unweighted tasks walk their own shuffled dataset
epoch after epoch (no repeats within an epoch); weighted tasks draw each batch afresh, without repeats
within the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterator

import numpy as np

from lookalike.core.errors import InputError


@dataclass(frozen=True)
class BatchPlan:
    """Which samples one batch holds: parallel arrays, task-major (all of task 0, then task 1, …)."""
    task: np.ndarray  # [B] index of the sample's task in `tasks`
    position: np.ndarray  # [B] index into that task's dataset

    def __len__(self) -> int:
        return len(self.task)


def class_balanced_weights(targets: np.ndarray, power: float = 0.5) -> np.ndarray | None:
    """Per-sample draw probabilities giving each class a share proportional to (its count)^power.

    None when the result would be the uniform draw anyway (power 1, or every class equally large).
    """
    targets = np.asarray(targets)
    if not 0.0 <= power <= 1.0:
        raise InputError(f"class_power must be in [0, 1], got {power}")
    counts = np.bincount(targets)
    if power == 1.0 or len(set(counts[counts > 0].tolist())) <= 1:
        return None
    weights = counts[targets].astype(np.float64) ** (power - 1.0)
    return weights / weights.sum()


class BalancedTaskSampler:
    """Yields BatchPlans of `samples_per_task × n_tasks` samples, `samples_per_task` from every task.

    `weights[task]` (optional) are per-sample draw probabilities (`class_balanced_weights`).
    """

    def __init__(self, task_sizes: dict[str, int], samples_per_task: int, seed: int = 0,
                 weights: dict[str, np.ndarray | None] | None = None):
        if samples_per_task <= 0:
            raise InputError(f"samples_per_task must be positive, got {samples_per_task}")
        empty = [t for t, n in task_sizes.items() if n <= 0]
        if empty:
            raise InputError(f"tasks with no rows cannot be sampled: {', '.join(empty)}")
        if not task_sizes:
            raise InputError("the sampler needs at least one task")
        self.tasks = list(task_sizes)
        self.sizes = [int(task_sizes[t]) for t in self.tasks]
        self.samples_per_task = samples_per_task
        self.seed = seed
        self.weights = [None if weights is None else weights.get(t) for t in self.tasks]
        for t, (size, w) in enumerate(zip(self.sizes, self.weights)):
            if w is not None and len(w) != size:
                raise InputError(f"task {self.tasks[t]!r}: {len(w)} weights for {size} samples")

    @property
    def batch_size(self) -> int:
        return self.samples_per_task * len(self.tasks)

    def _epoch_order(self, task_index: int, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, task_index, epoch])
        return rng.permutation(self.sizes[task_index])

    def _walk(self, t: int, step: int) -> list[int]:
        k, size = self.samples_per_task, self.sizes[t]
        start = step * k  # the task's running sample counter, walking epoch after epoch
        picked: list[int] = []
        while len(picked) < k:
            epoch, offset = divmod(start + len(picked), size)
            order = self._epoch_order(t, epoch)
            picked.extend(order[offset:offset + k - len(picked)].tolist())
        return picked

    def _weighted(self, t: int, step: int) -> list[int]:
        rng = np.random.default_rng([self.seed, t, 1 << 20, step])
        k, size = self.samples_per_task, self.sizes[t]
        picked = rng.choice(size, size=min(k, size), replace=False, p=self.weights[t]).tolist()
        while len(picked) < k:  # a task smaller than a batch: its listings come round again
            picked += rng.choice(size, size=min(k - len(picked), size), replace=False, p=self.weights[t]).tolist()
        return picked

    def plan(self, step: int) -> BatchPlan:
        """The samples of batch number `step` (0-based)."""
        tasks, positions = [], []
        for t in range(len(self.sizes)):
            picked = self._walk(t, step) if self.weights[t] is None else self._weighted(t, step)
            tasks.append(np.full(self.samples_per_task, t, dtype=np.int64))
            positions.append(np.asarray(picked, dtype=np.int64))
        return BatchPlan(np.concatenate(tasks), np.concatenate(positions))

    def __iter__(self) -> Iterator[BatchPlan]:
        step = 0
        while True:
            yield self.plan(step)
            step += 1
