"""Checks of what callers hand the vector index: vectors and integer parameters.

Every check runs before the index is touched, so bad input gets a clear `BadIndexInput` (400) and
changes nothing. Listing ids and labels are checked by the listing table (`lookalike.predictor.index.table`),
which knows which ids exist.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from lookalike.predictor.index.errors import BadIndexInput

NORM_TOLERANCE = 1e-3          # |‖x‖ - 1| allowed: float32 embeddings are normalised far better


def check_vectors(vectors: Any, dim: int | None, what: str = "vectors", allow_empty: bool = False) -> np.ndarray:
    """A C-contiguous float32 [N, D] array of finite, L2-normalised rows; a clear error otherwise.

    A single 1-D vector is taken as a batch of one.
    """
    if type(vectors) is np.ndarray and vectors.dtype.char == "f" and vectors.flags.c_contiguous:
        # One float32 query, the common case, passes with a few attribute reads and one dot product (NaN or
        # inf make it fail): it leads a search that takes ~0.1 ms, which the general checks below cost 3 us of.
        shape = vectors.shape
        if shape == (1, dim) or shape == (dim,):
            if abs(float(np.vdot(vectors, vectors)) - 1.0) <= 2 * NORM_TOLERANCE:
                return vectors if len(shape) == 2 else vectors[None, :]
    arr = vectors if isinstance(vectors, np.ndarray) else np.asarray(vectors)
    if arr.dtype.kind != "f":
        raise BadIndexInput(f"{what} must be floating-point (float32 embeddings), got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise BadIndexInput(f"{what} must be a 2-D array [N, D], got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0 and not allow_empty:
        raise BadIndexInput(f"{what}: got an empty batch (0 vectors)")
    if dim is not None and arr.shape[1] != dim:
        raise BadIndexInput(f"{what} are {arr.shape[1]}-d but this index holds {dim}-d vectors: embed with the "
                            f"model the index was built for")
    if dim is None and arr.shape[1] < 1:
        raise BadIndexInput(f"{what} have no dimensions (shape {tuple(arr.shape)})")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.shape[0] == 0:
        return arr
    # One pass serves both checks: NaN or inf in a row makes its squared norm non-finite too.
    if arr.shape[0] == 1:  # one query, the common case: a dot product, no temporary arrays
        one = float(np.dot(arr[0], arr[0]))
        if abs(one - 1.0) <= 2 * NORM_TOLERANCE:
            return arr
    sq = np.einsum("ij,ij->i", arr, arr)
    if not np.abs(sq - 1.0).max() <= 2 * NORM_TOLERANCE:   # |‖x‖² - 1| ≈ 2·|‖x‖ - 1|; NaN fails too
        bad = ~(np.abs(sq - 1.0) <= 2 * NORM_TOLERANCE)
        finite = np.isfinite(arr).all(axis=1)
        if not finite.all():
            rows = np.flatnonzero(~finite)
            raise BadIndexInput(f"{what} contain NaN or infinite values (rows {rows[:5].tolist()}"
                                f"{' …' if len(rows) > 5 else ''}); nothing was changed")
        rows = np.flatnonzero(bad)
        raise BadIndexInput(f"{what} must be L2-normalised (cosine similarity is the inner product): row "
                            f"{rows[0]} has norm {math.sqrt(float(sq[rows[0]])):.4f} ({len(rows)} such rows). "
                            f"Divide each vector by its norm first")
    return arr


def check_int(value: Any, name: str) -> int:
    """An integer parameter (top_k, nprobe, …); an integral float is accepted, a bool is not."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            return int(value)
        raise BadIndexInput(f"{name} must be an integer, got {value!r}")
    return int(value)
