"""Compiled loops on a search's hot path: photo keys to table rows, and the re-ranking of a short list.

Why compiled (numba): these steps run right after FAISS's list scan, which leaves the core's caches cold,
and in numpy each took several calls (the bucket lookup nine, the re-ranking about a dozen), every one
paying ~2-4 us for its cold code and temporaries. A re-ranked query at 1M vectors spent 124 us there
against 3-12 us of actual work; here each step is one call that touches only the rows it needs.

Both kernels read the listing table's sorted keys through its buckets (`ListingTable.lookup`): keys are
uniform 63-bit hashes, so a key's top bits name a bucket of about two keys, and a binary search inside
the bucket finds it in one or two reads (any keys work; skewed ones only make the buckets' searches longer).
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

# Compiled kernels are cached on disk (first use compiles for ~2 s). Pods run with a read-only root
# filesystem where /tmp is the writable volume, so unless told otherwise the cache goes there, not beside
# this file.
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "lookalike-numba-cache"))
import numba  # noqa: E402  (reads NUMBA_CACHE_DIR when imported)

Lookup = tuple[np.ndarray, np.ndarray, np.ndarray, int]  # (bucket starts, sorted keys, sorter, shift)


@numba.njit(cache=True, nogil=True)
def _find_rows(keys: np.ndarray, starts: np.ndarray, sorted_keys: np.ndarray, sorter: np.ndarray, shift: int,
               rows: np.ndarray) -> int:
    """rows[j] = the table row of keys[j], -1 when it is not in the table (or is -1).

    In stages, each a loop of loads that do not depend on one another, so that the core has many cache
    misses in flight at once: a key at a time, its three dependent misses (bucket start, bucket keys, row)
    and the search's branches on them ran one after another, ~0.3 us a key. Returns a checksum of the
    touched keys, which keeps the compiler from dropping the loads that only bring them into the cache."""
    m = len(keys)
    n = len(sorted_keys)
    lo = np.empty(m, np.int64)
    hi = np.empty(m, np.int64)
    for j in range(m):  # 1: each key's bucket in the sorted keys
        key = keys[j]
        if key < 0:
            lo[j] = 0
            hi[j] = 0
        else:
            b = key >> shift
            lo[j] = starts[b]
            hi[j] = starts[b + 1]
    touched = 0
    for j in range(m):  # 2: bring each bucket's keys into the cache
        if lo[j] < hi[j]:
            touched += sorted_keys[lo[j]]
    for j in range(m):  # 3: search each (small) bucket
        a = lo[j]
        z = hi[j]
        while a < z:
            mid = (a + z) >> 1
            if sorted_keys[mid] < keys[j]:
                a = mid + 1
            else:
                z = mid
        lo[j] = a if a < n and keys[j] >= 0 and sorted_keys[a] == keys[j] else -1
    for j in range(m):  # 4: the rows
        rows[j] = sorter[lo[j]] if lo[j] >= 0 else -1
    return touched


def rows_of(keys: np.ndarray, lookup: Lookup) -> np.ndarray:
    """Table rows of photo keys (any shape), -1 for keys not in the table."""
    flat = np.ascontiguousarray(keys, dtype=np.int64).reshape(-1)
    out = np.empty(len(flat), np.int64)
    _find_rows(flat, *lookup, out)
    return out.reshape(np.shape(keys))


# reassoc lets the dot product run in SIMD lanes; no "nnan"/"ninf", as empty slots are scored -inf
@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _rerank(q: np.ndarray, scale: np.ndarray, centre: np.ndarray, cand: np.ndarray, starts: np.ndarray,
            sorted_keys: np.ndarray, sorter: np.ndarray, shift: int, codes: np.ndarray, line: int,
            out_s: np.ndarray, out_k: np.ndarray, out_r: np.ndarray) -> float:
    nq, m = cand.shape
    d = q.shape[1]
    k = out_s.shape[1]
    w = np.empty(d, np.float32)
    rows = np.empty(m, np.int64)
    touched = 0.0
    for i in range(nq):
        touched += _find_rows(cand[i], starts, sorted_keys, sorter, shift, rows)
        for j in range(m):  # bring every candidate's code row into the cache, all misses in flight at once
            if rows[j] >= 0:
                for t in range(0, d, line):
                    touched += codes[rows[j], t]
        # a decoded code is centre + c * scale, so q . decoded = sum(c * (q * scale)) + q . centre
        base = np.float32(0.0)
        for t in range(d):
            w[t] = q[i, t] * scale[t]
            base += q[i, t] * centre[t]
        n = 0
        for j in range(m):
            row = rows[j]
            if row < 0:
                continue
            s = base
            for t in range(d):
                s += w[t] * np.float32(codes[row, t])
            if n == k and not s > out_s[i, k - 1]:
                continue
            # insert in descending order, after equal scores: ties keep the short list's order
            p = n if n < k else k - 1
            while p > 0 and out_s[i, p - 1] < s:
                out_s[i, p] = out_s[i, p - 1]
                out_k[i, p] = out_k[i, p - 1]
                out_r[i, p] = out_r[i, p - 1]
                p -= 1
            out_s[i, p] = s
            out_k[i, p] = cand[i, j]
            out_r[i, p] = row
            if n < k:
                n += 1
        for p in range(n, k):
            out_s[i, p] = -np.inf
            out_k[i, p] = -1
            out_r[i, p] = -1
    return touched


def rerank(q: np.ndarray, scale: np.ndarray, centre: np.ndarray, cand: np.ndarray, lookup: Lookup,
           codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-score each query's candidate keys [N, m] (-1: none) on `codes` (row i = table row i, uint8 or
    float32 [rows, D], decoded as centre + code * scale) and keep the best k: (scores, keys, rows) [N, k],
    best first, -inf / -1 / -1 where fewer than k candidates were given."""
    nq = len(q)
    out_s = np.empty((nq, k), np.float32)
    out_k = np.empty((nq, k), np.int64)
    out_r = np.empty((nq, k), np.int64)
    line = max(1, 64 // codes.itemsize)  # elements per cache line
    _rerank(q, scale, centre, cand, *lookup, codes, line, out_s, out_k, out_r)
    return out_s, out_k, out_r


_warm = False


def warm_up() -> None:
    """Compile (or load from the disk cache) every kernel for the types searches use, so that a predictor's
    first query does not pay ~2 s of compiling. Cheap after the first call in a process."""
    global _warm
    if _warm:
        return
    lookup: Lookup = (np.array([0, 1, 2], np.int64), np.array([1, 2**62], np.int64), np.array([0, 1], np.int64), 62)
    keys = np.array([[1, 2**62]], np.int64)
    rows_of(keys, lookup)
    q = np.ones((1, 4), np.float32) / 2
    for codes in (np.zeros((2, 4), np.uint8), np.zeros((2, 4), np.float32)):  # SQ8 and Flat copies
        rerank(q, np.ones(4, np.float32), np.zeros(4, np.float32), keys, lookup, codes, 1)
    _warm = True
