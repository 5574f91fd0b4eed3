"""The re-ranking copy of an IVF-PQ index: a second, finer encoding of every vector that re-scores the
PQ search's short list.

4-bit fast-scan PQ codes are small and fast to scan but coarse: the search asks them for
`k_factor`·top_k candidates, then re-scores those from this copy (8-bit scalar-quantized by default,
D bytes per vector; fp16 or exact float32 on request) and keeps the best top_k. The step is ours
rather than FAISS's IndexRefine so that it keeps working with 64-bit ids, removals and filters: the
copy holds one code row per photo, in the listing table's row order, and follows its appends and
deletions. Re-scoring a short list is one compiled call (`lookalike.predictor.index.kernels`) for SQ8 and
Flat copies, numpy for SQfp16; decoding is numpy, not FAISS's sa_decode, which opens an OpenMP region per
call (milliseconds per query on a busy machine).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from lookalike.predictor.index import kernels
from lookalike.predictor.index.factory import ADD_CHUNK

if TYPE_CHECKING:
    from lookalike.predictor.index.table import ListingTable

KINDS = ("SQ8", "SQfp16", "Flat")


def refine_codec(kind: str, dim: int) -> Any:
    """An untrained FAISS codec for the re-ranking copy: SQ8, SQfp16 or Flat (exact float32)."""
    import faiss

    if kind == "SQ8":
        return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    if kind == "SQfp16":
        return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    return faiss.IndexFlatIP(dim)


def _sq8_range(codec: Any) -> tuple[np.ndarray, np.ndarray]:
    """(vmin, vdiff/255) of a trained 8-bit scalar quantizer: code c decodes to vmin + (c + 0.5)·vdiff/255."""
    import faiss

    trained = faiss.vector_to_array(codec.sq.trained).astype(np.float32)
    return trained[:codec.d], trained[codec.d:] / 255.0


def _decoder(codec: Any, kind: str) -> Callable[[np.ndarray], np.ndarray]:
    if kind == "SQ8":
        vmin, vdiff = _sq8_range(codec)
        return lambda c: vmin + (c.astype(np.float32) + 0.5) * vdiff  # faiss's 8-bit rule
    if kind == "SQfp16":
        return lambda c: c.view(np.float16).astype(np.float32)
    return lambda c: c.view(np.float32)


def _affine(codec: Any, kind: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, centre) with decoded = centre + code * scale, for the compiled re-ranking; None for SQfp16,
    which numba cannot read (no float16), and which re-ranks in numpy."""
    if kind == "SQ8":
        vmin, vdiff = _sq8_range(codec)
        return vdiff, (vmin + 0.5 * vdiff).astype(np.float32)
    if kind == "Flat":
        return np.ones(codec.d, np.float32), np.zeros(codec.d, np.float32)
    return None


class RefineCopy:
    """A trained codec and the codes [N, code size] of the index's vectors, row i = listing table row i."""

    def __init__(self, codec: Any, codes: np.ndarray, kind: str, k_factor: int) -> None:
        self.codec = codec
        self.codes = codes
        self.kind = kind
        self.k_factor = int(k_factor)
        self._decode = _decoder(codec, kind)
        self._affine = _affine(codec, kind)

    @classmethod
    def train(cls, kind: str, k_factor: int, xt: np.ndarray, x: np.ndarray) -> RefineCopy:
        """Train a `kind` codec on the sample xt and encode every vector of x."""
        codec = refine_codec(kind, x.shape[1])
        codec.train(xt)
        copy = cls(codec, np.zeros((0, codec.sa_code_size()), np.uint8), kind, k_factor)
        copy.codes = copy.encode(x)
        return copy

    @property
    def describe(self) -> dict[str, Any]:
        """What the index card records: {"codec": kind, "k_factor": k}."""
        return {"codec": self.kind, "k_factor": self.k_factor}

    # ---- following the table ------------------------------------------------------------------
    def encode(self, x: np.ndarray) -> np.ndarray:
        """The codes of x, in chunks of `ADD_CHUNK` vectors (encode before changing anything)."""
        codes = np.empty((len(x), self.codec.sa_code_size()), np.uint8)  # filled in place: no second copy
        for i in range(0, len(x), ADD_CHUNK):
            codes[i:i + ADD_CHUNK] = self.codec.sa_encode(x[i:i + ADD_CHUNK])
        return codes

    def append(self, codes: np.ndarray) -> None:
        self.codes = np.concatenate([self.codes, codes])

    def delete(self, rows: np.ndarray) -> None:
        self.codes = np.delete(self.codes, rows, axis=0)

    # ---- search -------------------------------------------------------------------------------
    def short_list(self, k: int, n_allowed: int) -> int:
        """How many candidates the PQ search should return for a final top k."""
        return max(1, min(k * self.k_factor, n_allowed))

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Code rows -> float32 vectors."""
        return self._decode(codes)

    def rerank(self, q: np.ndarray, cand: np.ndarray, table: ListingTable, k: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Re-score candidate photo keys [N, k'] (-1: none) from this copy and keep the best k: (scores, keys,
        table rows) [N, k], best first; -inf / -1 / -1 where a query had fewer than k candidates. Ties keep the
        short list's order."""
        if self._affine is not None:  # SQ8 and Flat: one compiled call (see lookalike.predictor.index.kernels)
            codes = self.codes if self.kind == "SQ8" else self.codes.view(np.float32)
            return kernels.rerank(q, *self._affine, cand, table.lookup, codes, k)
        rows = table.rows_of(cand)
        scores = np.full(cand.shape, -np.inf, np.float32)
        for i in range(len(cand)):
            valid = rows[i] >= 0
            scores[i, valid] = self._decode(np.take(self.codes, rows[i, valid], axis=0)) @ q[i]
        if cand.shape[1] < k:  # fewer candidates than k (tiny filtered sets): pad
            pad = ((0, 0), (0, k - cand.shape[1]))
            scores = np.pad(scores, pad, constant_values=-np.inf)
            cand, rows = np.pad(cand, pad, constant_values=-1), np.pad(rows, pad, constant_values=-1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top_s = np.take_along_axis(scores, order, axis=1)
        missing = ~np.isfinite(top_s)
        top_i, top_r = np.take_along_axis(cand, order, axis=1), np.take_along_axis(rows, order, axis=1)
        top_i[missing], top_r[missing] = -1, -1
        return top_s, top_i, top_r
