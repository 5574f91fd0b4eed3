"""The predictor's caches for repeated photos: content key -> embedding, and -> answer.

The content key of a photo is made by the transformer from the bytes a client sent
(`lookalike.serving.photo_cache.content_key`); the transformer sends it beside the pixels, or alone when
it asks whether the answer is here already (see that module for where each part lives and why).

- embeddings, keyed by (model version, content key): the embedding and the heads' probabilities of the
  pixels that were preprocessed for that very model (`preprocessed_for` equal to the model served), so
  another model never reads them;
- answers, keyed by (model version, index version, content key, top_k, nprobe, filters): one row of the
  `Matches` per photo, so a request with other parameters, or a swapped model or index, never shares one.

The pair is read once per request by the caller and passed in: a swap in the middle of a request cannot
mix the keys of two pairs. Both caches share one byte budget, half each.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lookalike.predictor.service import Matches, ServingPair
from lookalike.serving.photo_cache import ByteLRU, count

UNIT = "predictor"


@dataclass(frozen=True)
class AnswerRow:
    """One photo's answer: what `Matches` holds in its row."""

    listing_ids: tuple[str, ...]
    photo_ids: tuple[str, ...]
    scores: np.ndarray  # [k'] float32, the found listings' only
    labels: tuple[tuple[str, str], ...]  # (task, predicted label)
    probs: tuple[tuple[str, float], ...]
    box: np.ndarray | None = None  # [5] the locator's box (Matches.boxes' row), None without a locator

    @property
    def nbytes(self) -> int:
        texts = sum(len(s) + 50 for s in self.listing_ids + self.photo_ids)
        return texts + self.scores.nbytes + 100 * len(self.labels) + (0 if self.box is None else self.box.nbytes)


def request_key(top_k: int, nprobe: int | None, filters: dict[str, str]) -> tuple:
    """What besides the photo decides an answer (the filters in a canonical order)."""
    return top_k, nprobe, tuple(sorted(filters.items()))


class SearchCache:
    """Embeddings and answers of photos seen before, bounded in bytes (`max_bytes`, 0: off)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.embeddings = ByteLRU(self.max_bytes // 2)
        self.answers = ByteLRU(self.max_bytes // 2)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def answer(self, pair: ServingPair, keys: list[str], request: tuple) -> Matches | None:
        """The whole answer when every photo's is cached (counted per photo), else None."""
        rows = [self.answers.get((pair.model_version, pair.index_version, key, request)) for key in keys]
        hits = sum(r is not None for r in rows)
        count(UNIT, "answer", True, hits)
        count(UNIT, "answer", False, len(rows) - hits)
        if hits < len(rows):
            return None
        return _matches(pair, rows)

    def embedding(self, pair: ServingPair, keys: list[str]
                  ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None] | None:
        """(embeddings [N, D], probabilities per task [N, C], the locator's boxes [N, 5] or None) when every
        photo's is cached, else None."""
        found = [self.embeddings.get((pair.model_version, key)) for key in keys]
        hits = sum(f is not None for f in found)
        count(UNIT, "embedding", True, hits)
        count(UNIT, "embedding", False, len(found) - hits)
        if hits < len(found):
            return None
        emb = np.stack([f[0] for f in found])
        probs = {task: np.stack([f[1][task] for f in found]) for task in found[0][1]}
        boxes = np.stack([f[2] for f in found]) if all(f[2] is not None for f in found) else None
        return emb, probs, boxes

    def embeddings_of(self, pair: ServingPair, keys: list[str]) -> np.ndarray | None:
        """The photos' embeddings [N, D] when every one is cached (not counted: asked beside an answer hit,
        for an automatic crop to fuse with), else None."""
        found = [self.embeddings.get((pair.model_version, key)) for key in keys]
        return None if any(f is None for f in found) else np.stack([f[0] for f in found])

    def keep(self, pair: ServingPair, keys: list[str], request: tuple, matches: Matches,
             emb: np.ndarray | None = None, probs: dict[str, np.ndarray] | None = None) -> None:
        """Remember the answer of each photo (and its embedding, when given)."""
        if not self.enabled:
            return
        for i, key in enumerate(keys):
            row = _row(matches, i)
            self.answers.put((pair.model_version, pair.index_version, key, request), row, row.nbytes)
            if emb is not None and probs is not None:
                value = (emb[i].copy(), {t: p[i].copy() for t, p in probs.items()}, row.box)
                self.embeddings.put((pair.model_version, key), value,
                                    value[0].nbytes + sum(p.nbytes for p in value[1].values()) + 20)


def _row(m: Matches, i: int) -> AnswerRow:
    n = len(m.listing_ids[i])
    return AnswerRow(tuple(m.listing_ids[i]), tuple(m.photo_ids[i]) if m.photo_ids else ("",) * n,
                     np.asarray(m.scores[i, :n], np.float32).copy(),
                     tuple((t, m.labels[t][i]) for t in m.labels), tuple((t, float(m.probs[t][i])) for t in m.probs),
                     None if m.boxes is None else np.asarray(m.boxes[i], np.float32).copy())


def _matches(pair: ServingPair, rows: list[AnswerRow]) -> Matches:
    k = max([len(r.listing_ids) for r in rows] + [0])
    scores = np.zeros((len(rows), k), np.float32)
    for i, r in enumerate(rows):
        scores[i, :len(r.scores)] = r.scores
    tasks = [t for t, _ in rows[0].labels] if rows else []
    labels = {t: [dict(r.labels)[t] for r in rows] for t in tasks}
    probs = {t: np.array([dict(r.probs)[t] for r in rows], np.float32) for t in tasks}
    boxes = np.stack([r.box for r in rows]) if rows and all(r.box is not None for r in rows) else None
    return Matches([list(r.listing_ids) for r in rows], scores, labels, probs, pair.model_version,
                   pair.index_version, {}, [list(r.photo_ids) for r in rows], boxes)


__all__ = ["SearchCache", "request_key"]
