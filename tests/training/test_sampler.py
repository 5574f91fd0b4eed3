"""The balanced multitask sampler: exact per-task counts, coverage of sparse tasks, determinism, and classes
balanced within a task by square-root sampling."""
from __future__ import annotations

import numpy as np
import pytest

from lookalike.training.sampler import BalancedTaskSampler


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


# ---- classes balanced within a task ---------------------------------------------------------------

def test_square_root_sampling_gives_a_minority_class_its_square_root_share():
    from lookalike.training.sampler import class_balanced_weights

    targets = np.array([0] * 900 + [1] * 100)  # a colour on 10% of the listings
    weights = class_balanced_weights(targets, power=0.5)
    assert weights is not None and np.isclose(weights.sum(), 1.0)
    assert np.isclose(weights[targets == 1].sum(), 10 / (30 + 10))  # sqrt(100) / (sqrt(900) + sqrt(100))
    sampler = BalancedTaskSampler({"color": 1000}, 8, seed=0, weights={"color": weights})
    drawn = np.concatenate([sampler.plan(s).position for s in range(500)])
    share = (targets[drawn] == 1).mean()
    assert 0.22 < share < 0.28  # 25% instead of the catalog's 10%
    for s in range(20):
        assert len(set(sampler.plan(s).position.tolist())) == 8  # no listing twice in one batch
    again = BalancedTaskSampler({"color": 1000}, 8, seed=0, weights={"color": weights})
    assert all(np.array_equal(sampler.plan(s).position, again.plan(s).position) for s in range(10))


def test_class_weights_are_skipped_when_they_change_nothing_and_checked():
    from lookalike.training.sampler import class_balanced_weights

    assert class_balanced_weights(np.array([0, 0, 1, 1]), 0.5) is None  # classes already equal
    assert class_balanced_weights(np.array([0, 0, 0, 1]), 1.0) is None  # the catalog's own mix
    uniform = class_balanced_weights(np.array([0, 0, 0, 1]), 0.0)
    assert np.isclose(uniform[3], 0.5)  # power 0: every class equally often
    with pytest.raises(ValueError, match="class_power"):
        class_balanced_weights(np.array([0, 1]), 1.5)
    with pytest.raises(ValueError, match="weights for"):
        BalancedTaskSampler({"x": 3}, 2, weights={"x": np.ones(5) / 5})


def test_a_weighted_task_smaller_than_a_batch_comes_round_again():
    from lookalike.training.sampler import class_balanced_weights

    weights = class_balanced_weights(np.array([0, 0, 1]), 0.5)
    plan = BalancedTaskSampler({"color": 3}, 5, seed=0, weights={"color": weights}).plan(0)
    assert len(plan) == 5 and set(plan.position.tolist()) == {0, 1, 2}
