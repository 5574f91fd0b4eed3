"""Drift: how far an IVF index has moved since its k-means was trained, and when to rebuild it.

Incremental updates (add, remove, replace) never retrain the centroids. That is fine until the catalog
has changed enough that the lists no longer fit it; then a full rebuild (new k-means) is due. The
measures, all kept as counters on the index card so they survive save and publish:

- vectors added and removed since training, as fractions of the vectors trained on;
- the list-size imbalance factor now against right after training (lists grown uneven);
- how well added vectors fit the trained centroids (mean cosine to the nearest one) against the
  training sample: a drop means the catalog has new kinds of items;
- the nlist the rule would choose for today's count against the one the index has.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from lookalike.predictor.index import tuning as tuning
from lookalike.core.index_card import IndexCard

MAX_ADDED_FRACTION = 0.20      # vectors added since training / vectors trained on
MAX_REMOVED_FRACTION = 0.20
MAX_IMBALANCE_GROWTH = 1.25    # list-size imbalance factor vs right after training
MAX_FIT_DROP = 0.05            # mean cosine to the nearest centroid: added vectors vs the training sample
FIT_SAMPLE = 10_000            # vectors measured per centroid_fit call


def imbalance(ivf: Any) -> float | None:
    """FAISS's imbalance factor of the list sizes: 1.0 when all lists are equal (None: not IVF, or empty)."""
    if ivf is None:
        return None
    invlists = ivf.invlists
    sizes = np.array([invlists.list_size(i) for i in range(ivf.nlist)], np.float64)
    total = sizes.sum()
    return float(len(sizes) * (sizes ** 2).sum() / total ** 2) if total else None


def centroid_fit(ivf: Any, x: np.ndarray, sample: int = FIT_SAMPLE) -> float:
    """Mean cosine of (up to `sample` evenly spaced) vectors to their nearest centroid."""
    step = max(1, len(x) // sample)
    return float(ivf.quantizer.search(np.ascontiguousarray(x[::step]), 1)[0].mean())


def record_added_fit(card: IndexCard, ivf: Any, x: np.ndarray) -> None:
    """Fold how well the vectors x (about to be added) fit the trained centroids into the card's running
    mean over every vector added since training. Call before counting them in added_since_training."""
    prev_n, prev = card.added_since_training, card.centroid_fit_added
    total = (prev * prev_n if prev is not None else 0.0) + centroid_fit(ivf, x) * len(x)
    card.centroid_fit_added = total / (prev_n + len(x))


def drift_report(card: IndexCard, count: int, ivf: Any) -> dict[str, Any]:
    """How far the index has moved since training, and whether a rebuild is due.

    Returns counts and fractions added/removed since training, the list-size imbalance now and at
    training, how well added vectors fit the trained centroids, the nlist the rule would choose now,
    and `rebuild_due` (bool) with `reasons` (list) and `why` (one line).
    """
    trained = max(card.trained_count, 1)
    added, removed = card.added_since_training, card.removed_since_training
    now = imbalance(ivf)
    suggested = tuning.choose_nlist(count)
    nlist = card.nlist or 0
    reasons: list[str] = []
    if ivf is None:
        if card.exact_fallback and suggested:
            reasons.append(f"the catalog has grown to {count} vectors: enough to train an IVF index "
                           f"({suggested} lists)")
    else:
        if added / trained > MAX_ADDED_FRACTION:
            reasons.append(f"{added} vectors added since training ({added / trained:.0%} of the "
                           f"{trained} trained on; limit {MAX_ADDED_FRACTION:.0%})")
        if removed / trained > MAX_REMOVED_FRACTION:
            reasons.append(f"{removed} vectors removed since training ({removed / trained:.0%}; limit "
                           f"{MAX_REMOVED_FRACTION:.0%})")
        base = card.imbalance_at_training
        if now and base and now > base * MAX_IMBALANCE_GROWTH:
            reasons.append(f"list sizes grew uneven: imbalance {now:.2f} vs {base:.2f} at training")
        fit0, fit1 = card.centroid_fit_at_training, card.centroid_fit_added
        if fit0 is not None and fit1 is not None and added >= 0.01 * trained and fit0 - fit1 > MAX_FIT_DROP:
            reasons.append(f"added vectors fit the trained centroids worse (mean cosine {fit1:.3f} vs "
                           f"{fit0:.3f}): the catalog has new kinds of items")
        if "{nlist}" in str(card.factory_setting) and suggested and \
                abs(math.log2(suggested) - math.log2(nlist)) >= 2:
            reasons.append(f"{count} vectors call for {suggested} lists, the index has {nlist}")
    return {
        "count": count,
        "trained_count": card.trained_count,
        "added_since_training": added,
        "removed_since_training": removed,
        "added_fraction": added / trained,
        "removed_fraction": removed / trained,
        "imbalance": now,
        "imbalance_at_training": card.imbalance_at_training,
        "centroid_fit_at_training": card.centroid_fit_at_training,
        "centroid_fit_added": card.centroid_fit_added,
        "nlist": nlist or None,
        "suggested_nlist": suggested or None,
        "rebuild_due": bool(reasons),
        "reasons": reasons,
        "why": "; ".join(reasons) if reasons else "within limits: incremental updates are fine",
    }
