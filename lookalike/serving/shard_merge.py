"""Merging the answers of index shards: one ranked list of listings per query, as one index would give.

A sharded index version holds each listing in exactly one shard (`lookalike.predictor.index.shards`) and
every shard shares the same IVF centroids, so a query visits the same lists in every shard: each shard's
top-k listings are its part of the whole index's ranking, and the whole top-k is the best k of their
union, ranked by each listing's best photo. No listing can come twice (it lives in one shard), so the
merge is a sort by score, ties broken by shard then rank so the answer is deterministic.

Used twice: in-process by `ShardedIndex.search`, and by the transformer after its fan-out to the shard
predictors (`lookalike.transformer.shards`), which is why it lives here, importing nothing of the project.

The version words both sides speak live here too: a shard holds versions named `model_version/index_version`
(`shard_version`), answers the one a request names in `SHARD_VERSION` and lists those it holds in
`SHARD_VERSIONS` (oldest first), so the transformer can move every shard to a new version together.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SHARD_VERSION = "shard_version"    # request: the version to answer from; response: the one answered from
SHARD_VERSIONS = "shard_versions"  # response: every version the shard holds, oldest first, comma-separated


def shard_version(model_version: str, index_version: str) -> str:
    """What a shard serves, named whole: an index version only means something under its model."""
    return f"{model_version}/{index_version}"


@dataclass
class ShardAnswer:
    """One shard's answer to a batch of queries: per query its listings, best first, with the photo that
    matched and its score (rows may be shorter than top_k when the shard holds fewer that pass)."""

    listing_ids: list[list[str]]
    photo_ids: list[list[str]]
    scores: np.ndarray          # [N, k] float32; NaN (or anything past a row's listings) is ignored


@dataclass
class MergedAnswer:
    listing_ids: list[list[str]]
    photo_ids: list[list[str]]
    scores: np.ndarray          # [N, top_k] float32, NaN past a row's listings
    shard_of: list[list[int]]   # which shard each listing came from


def merge_answers(answers: Sequence[ShardAnswer | None], top_k: int) -> MergedAnswer:
    """The top_k listings per query across the shards' answers (None: a shard that did not answer)."""
    present = [(s, a) for s, a in enumerate(answers) if a is not None]
    n = len(present[0][1].listing_ids) if present else 0
    scores = np.full((n, top_k), np.nan, np.float32)
    out_ids: list[list[str]] = []
    out_photos: list[list[str]] = []
    out_shards: list[list[int]] = []
    for q in range(n):
        rows = []
        for s, a in present:
            ids, photos = a.listing_ids[q], a.photo_ids[q]
            for r, (lid, pid) in enumerate(zip(ids, photos)):
                if not lid:
                    continue
                score = float(a.scores[q, r])
                if score != score:  # NaN: padding
                    continue
                rows.append((-score, s, r, lid, pid))
        rows.sort()
        best = rows[:top_k]
        out_ids.append([b[3] for b in best])
        out_photos.append([b[4] for b in best])
        out_shards.append([b[1] for b in best])
        scores[q, :len(best)] = [-b[0] for b in best]
    return MergedAnswer(out_ids, out_photos, scores, out_shards)
