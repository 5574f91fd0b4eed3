"""The balanced multitask sampler: exact per-task counts, coverage of sparse tasks, determinism."""
from __future__ import annotations

import numpy as np
import pytest

from training.sampler import BalancedTaskSampler


def test_every_batch_holds_exactly_samples_per_task_of_each_task():
    sizes = {"fine_category": 1000, "category": 1000, "shade": 37}
    sampler = BalancedTaskSampler(sizes, samples_per_task=8, seed=3)
    assert sampler.batch_size == 24
    for step in range(60):
        plan = sampler.plan(step)
        assert len(plan) == 24
        counts = np.bincount(plan.task, minlength=3)
        assert counts.tolist() == [8, 8, 8]
        for t, size in enumerate(sizes.values()):
            positions = plan.position[plan.task == t]
            assert positions.min() >= 0 and positions.max() < size


def test_sparse_task_is_revisited_epoch_after_epoch_without_repeats_within_an_epoch():
    sampler = BalancedTaskSampler({"dense": 10_000, "sparse": 12}, samples_per_task=4, seed=0)
    drawn = np.concatenate([sampler.plan(s).position[sampler.plan(s).task == 1] for s in range(6)])
    # 24 draws of a 12-row task: two full epochs, each a permutation of all 12 rows
    assert sorted(drawn[:12].tolist()) == list(range(12))
    assert sorted(drawn[12:].tolist()) == list(range(12))
    assert drawn[:12].tolist() != drawn[12:].tolist()  # reshuffled between epochs


def test_deterministic_per_seed_and_step():
    a = BalancedTaskSampler({"x": 50, "y": 9}, 5, seed=1)
    b = BalancedTaskSampler({"x": 50, "y": 9}, 5, seed=1)
    c = BalancedTaskSampler({"x": 50, "y": 9}, 5, seed=2)
    assert all(np.array_equal(a.plan(s).position, b.plan(s).position) for s in range(20))
    assert not all(np.array_equal(a.plan(s).position, c.plan(s).position) for s in range(20))
    it = iter(a)
    assert np.array_equal(next(it).position, a.plan(0).position)
    assert np.array_equal(next(it).position, a.plan(1).position)


def test_refuses_empty_tasks_and_bad_sizes():
    with pytest.raises(ValueError, match="no rows"):
        BalancedTaskSampler({"x": 10, "color": 0}, 4)
    with pytest.raises(ValueError, match="at least one task"):
        BalancedTaskSampler({}, 4)
    with pytest.raises(ValueError, match="positive"):
        BalancedTaskSampler({"x": 10}, 0)
