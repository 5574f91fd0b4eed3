"""Search by listing ("more like this"): the listings that look like a listing already in the index.

A listing page's "similar items" needs no photo upload: the listing's vectors are in the index already
(`VectorIndex.vector_of`), so there is no decode, no preprocessing and no model, only a search. The
listing searches with its first photo (the one its catalog lists first, what its page shows), or with
the photo named beside it; it is left out of its own results.

The answer has the shape of a photo search's: top-k listings (each once, with the photo that matched and
its score) and, per task, a label and its probability - here the listing's own catalog label with
probability 1 (0 and "" where it has none), so that `filter="category=predicted"` means "in the same
category as this listing".
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from lookalike.predictor.service import PREDICTED, Matches, ServingPair


def search_by_listing(pair: ServingPair, listing_ids: Sequence[str], photo_ids: Sequence[str | None], *,
                      top_k: int, nprobe: int | None, filters: dict[str, str]) -> Matches:
    """Per listing: the top_k other listings most like it (one photo's stored vector as the query).

    UnknownListing (404) names a listing or photo the served index does not hold."""
    index = pair.index
    tasks = list(pair.heads)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    vectors, own = [], []
    for listing_id, photo_id in zip(listing_ids, photo_ids, strict=True):
        vectors.append(index.vector_of(listing_id, photo_id)[0])
        own.append(index.labels_of(listing_id))
    timings["lookup"] = time.perf_counter() - start
    start = time.perf_counter()
    # the listing itself is almost always its own best match: ask for one more, then leave it out
    ask = min(top_k + 1, index.listing_count)
    rows_ids, rows_photos, rows_scores = [], [], []
    for listing_id, vector, labels in zip(listing_ids, vectors, own):
        wanted = {t: (labels.get(t) if v == PREDICTED else v) for t, v in filters.items()}
        wanted = {t: v for t, v in wanted.items() if v is not None}  # no own label: that task is not filtered
        result = index.search(vector[None], top_k=ask, nprobe=nprobe, label_filter=wanted or None)
        keep = [j for j, found in enumerate(result.listing_ids[0]) if found != listing_id][:top_k]
        rows_ids.append([result.listing_ids[0][j] for j in keep])
        rows_photos.append([result.photo_ids[0][j] for j in keep])
        rows_scores.append(np.asarray(result.scores[0], np.float32)[keep])
    timings["search"] = time.perf_counter() - start
    k = max([len(r) for r in rows_ids] + [0])
    scores = np.zeros((len(rows_ids), k), np.float32)
    for i, row in enumerate(rows_scores):
        scores[i, :len(row)] = row
    labels = {t: [str(o.get(t) or "") for o in own] for t in tasks}
    probs = {t: np.array([1.0 if o.get(t) else 0.0 for o in own], np.float32) for t in tasks}
    return Matches([list(r) for r in rows_ids], scores, labels, probs, pair.model_version, pair.index_version,
                   timings, rows_photos)


__all__ = ["search_by_listing"]
