"""The balanced multitask sampler: every mini-batch holds the same number of samples from each task.

A task's dataset is the rows that carry its label, so a label present on few products (colour,
material) has a small dataset. Drawing `samples_per_task` from each task's dataset per batch keeps such
a task from being drowned by the dense ones: its head sees as many samples per step as any other.
Each task walks through its own shuffled dataset and reshuffles when it runs out, so a small task is
simply revisited more often (an epoch of a sparse task is short).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np


@dataclass(frozen=True)
class BatchPlan:
    """Which samples one batch holds: parallel arrays, task-major (all of task 0, then task 1, …)."""
    task: np.ndarray  # [B] index of the sample's task in `tasks`
    position: np.ndarray  # [B] index into that task's dataset

    def __len__(self) -> int:
        return len(self.task)


class BalancedTaskSampler:
    """Yields BatchPlans of `samples_per_task × n_tasks` samples, `samples_per_task` from every task.

    Deterministic: batch `step` depends only on (seed, step), never on how batches were consumed, so a
    run restarted at step k sees the same batches from k on.
    """

    def __init__(self, task_sizes: dict[str, int], samples_per_task: int, seed: int = 0):
        if samples_per_task <= 0:
            raise ValueError(f"samples_per_task must be positive, got {samples_per_task}")
        empty = [t for t, n in task_sizes.items() if n <= 0]
        if empty:
            raise ValueError(f"tasks with no rows cannot be sampled: {', '.join(empty)}")
        if not task_sizes:
            raise ValueError("the sampler needs at least one task")
        self.tasks = list(task_sizes)
        self.sizes = [int(task_sizes[t]) for t in self.tasks]
        self.samples_per_task = samples_per_task
        self.seed = seed

    @property
    def batch_size(self) -> int:
        return self.samples_per_task * len(self.tasks)

    def _epoch_order(self, task_index: int, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, task_index, epoch])
        return rng.permutation(self.sizes[task_index])

    def plan(self, step: int) -> BatchPlan:
        """The samples of batch number `step` (0-based)."""
        tasks, positions = [], []
        k = self.samples_per_task
        for t, size in enumerate(self.sizes):
            start = step * k  # the task's running sample counter, walking epoch after epoch
            picked = []
            while len(picked) < k:
                epoch, offset = divmod(start + len(picked), size)
                order = self._epoch_order(t, epoch)
                picked.extend(order[offset:offset + k - len(picked)].tolist())
            tasks.append(np.full(k, t, dtype=np.int64))
            positions.append(np.asarray(picked, dtype=np.int64))
        return BatchPlan(np.concatenate(tasks), np.concatenate(positions))

    def __iter__(self) -> Iterator[BatchPlan]:
        step = 0
        while True:
            yield self.plan(step)
            step += 1

    def epochs_per_step(self) -> dict[str, float]:
        """How much of each task's dataset one batch covers (sparse tasks are revisited more often)."""
        return {t: self.samples_per_task / n for t, n in zip(self.tasks, self.sizes)}
