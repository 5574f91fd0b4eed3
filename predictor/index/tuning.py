"""How big an IVF index should be, and how many lists a query should visit.

The nlist rule
--------------
`choose_nlist(n)` = the power of two nearest to 8·sqrt(n), capped so that the training sample holds
at least `MIN_POINTS_PER_CENTROID` (FAISS's own floor, 39) vectors per list, and at most 65,536.
8·sqrt(n) is inside FAISS's guideline (4..16·sqrt(n)): on 1M 256-d vectors it gives 8,192 lists of
~122 vectors. A query's time goes to the vectors it scans, and finer lists reach the same recall
scanning fewer: on the 1M yardstick, 4,096 lists needed ~1,500 scanned vectors for recall@10 0.95
(the lists nearest a query are its dense region's, 2.7 times the average), 8,192 lists ~1,100. What
made finer lists expensive, comparing each query with every centroid and a k-means over all of them,
is gone from 4,096 lists on: an HNSW graph finds the nearest centroids and the centroids are trained
in two levels (`lookalike.predictor.index.factory`, `lookalike.predictor.index.clustering`). Below
`MIN_NLIST` lists (fewer than 39 × 32 = 1,248 vectors) IVF is not worth training and the index falls
back to exact search.

Tuning
------
`tune_nprobe` holds out a sample of the indexed vectors as queries and measures recall@10 against
exact search leave-one-out: each query's own photo is removed from both the exact and the
approximate answer, so the sample stands for unseen photos of catalogued products. Recall counts
listings, as search answers them: where listings have several photos, both answers are the first 10
distinct listings of the photo ranking (a listing's other photos still find it). The sweep stops a
little past the first nprobe that reaches the target; the smallest such nprobe becomes the default.
`tune_held_out` picks the sample and its exact answers; `tune_nprobe` sweeps.

Recall@k against exact search
-----------------------------
`recall_at_k` is the project's one definition, used by tuning and by `benchmarks/ann.py`: the mean
fraction of each query's exact top-k found in its returned top-k. It is FAISS's own
`faiss.contrib.evaluation.knn_intersection_measure`, with one care: a missing result (-1) matches
nothing, not even a -1 that pads a short truth row. (The retrieval recall of training/evaluate.py is
another measure: whether the photographed listing comes back.)
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

MIN_POINTS_PER_CENTROID = 39   # FAISS warns below this many training points per centroid
NLIST_PER_SQRT_N = 8           # nlist ~ 8·sqrt(n) (see the module doc)
MIN_NLIST = 32
MAX_NLIST = 65_536
TRAIN_POINTS_PER_LIST = 50     # training sample per list: a little above FAISS's floor
MIN_TRAIN_POINTS = 10_000      # 8-bit PQ codebooks (256 centroids) need 39 × 256 points too
TUNE_QUERIES = 500
RECALL_K = 10
NPROBE_SWEEP = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512,
                768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 32768, 65536)
_NO_RESULT = -2                # a missing result in recall_at_k: unlike any id and any -1 padding of the truth
EXTRA_POINTS = 2               # curve points measured past the target, to show the trade-off


def choose_nlist(n: int) -> int:
    """The number of IVF lists for n vectors (0: too few, use exact search). See the module doc."""
    if n < MIN_POINTS_PER_CENTROID * MIN_NLIST:
        return 0
    nlist = 2 ** round(math.log2(NLIST_PER_SQRT_N * math.sqrt(n)))
    cap = 2 ** int(math.log2(n // MIN_POINTS_PER_CENTROID))
    return int(max(MIN_NLIST, min(nlist, cap, MAX_NLIST)))


def training_sample_size(n: int, nlist: int) -> int:
    return int(min(n, max(TRAIN_POINTS_PER_LIST * nlist, MIN_TRAIN_POINTS)))


def exact_neighbours(queries: np.ndarray, base: np.ndarray, k: int) -> np.ndarray:
    """Row numbers of the exact top-k by inner product (FAISS brute force, no copy of `base`)."""
    import faiss

    _, idx = faiss.knn(queries, base, k, metric=faiss.METRIC_INNER_PRODUCT)
    return idx


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = RECALL_K) -> float:
    """Mean fraction of each query's true top-k found in its returned top-k (ids may be -1: none)."""
    from faiss.contrib.evaluation import knn_intersection_measure

    found = _columns(np.asarray(found, np.int64)[:, :k], k, _NO_RESULT)
    truth = _columns(np.asarray(truth, np.int64)[:, :k], k, -1)
    # -1 in both tables would count as a hit in FAISS's measure: a missing result is another value.
    return float(knn_intersection_measure(np.where(found >= 0, found, _NO_RESULT), truth))


def _columns(table: np.ndarray, k: int, fill: int) -> np.ndarray:
    """`table` padded to k columns with `fill` (a short row means fewer results)."""
    if table.shape[1] >= k:
        return table
    return np.pad(table, ((0, 0), (0, k - table.shape[1])), constant_values=fill)


def drop_self(neighbours: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """Per row, the first k entries that are not the query's own id (pads with -1)."""
    out = np.full((len(neighbours), k), -1, np.int64)
    for i, (row, me) in enumerate(zip(neighbours, self_ids)):
        kept = row[row != me][:k]
        out[i, :len(kept)] = kept
    return out


def tune_held_out(search: Callable[[np.ndarray, int, int], np.ndarray], x: np.ndarray, keys: np.ndarray,
                  n_queries: int, rng: np.random.Generator, nlist: int, target: float, progress: bool = False, *,
                  owners_of: Callable[[np.ndarray], np.ndarray] | None = None, per_listing: int = 1,
                  truth_cache: dict | None = None) -> tuple[int, list[dict], bool]:
    """Tune nprobe on `n_queries` of the indexed vectors x (row i has FAISS id keys[i]), leave-one-out
    against exact search (see the module doc); returns what `tune_nprobe` returns.

    `owners_of` maps photo ids to their listings' ids when listings have several photos: recall is then
    measured on listings, each search asking for `per_listing` photos per listing wanted. Tunings that draw
    the same held-out queries (the same rng state) may share one `truth_cache` dict: exact search runs once."""
    rows = np.sort(rng.choice(len(x), n_queries, replace=False))
    queries = x[rows]
    cache = truth_cache if truth_cache is not None else {}
    if owners_of is None:
        if "truth" not in cache:
            exact = exact_neighbours(queries, x, RECALL_K + 1)
            cache["truth"] = drop_self(np.where(exact >= 0, keys[exact.clip(0)], -1), keys[rows], RECALL_K)
        return tune_nprobe(search, queries, keys[rows], cache["truth"], nlist, target, progress)

    def exact_search(q: np.ndarray, m: int, nprobe: int) -> np.ndarray:
        found = exact_neighbours(q, x, m)
        return np.where(found >= 0, keys[found.clip(0)], -1)

    def listings(photo_search, q: np.ndarray, k: int, nprobe: int, me: np.ndarray) -> np.ndarray:
        """The first k distinct listings of the photo ranking, the query's own photo left out."""
        from lookalike.predictor.index.listings import first_distinct

        out = np.full((len(q), k), -1, np.int64)
        todo, m = np.arange(len(q)), min(len(x), (k + 1) * per_listing)
        while len(todo):
            found = photo_search(q[todo], m, nprobe)
            owners = owners_of(found)
            cols = first_distinct(owners, k, skip=found == me[todo, None])
            out[todo] = np.where(cols >= 0, np.take_along_axis(owners, cols.clip(0), axis=1), -1)
            if m >= len(x):
                break
            todo, m = todo[(cols < 0).any(axis=1)], min(len(x), m * 4)
        return out

    mine = keys[rows]
    if "truth" not in cache:
        cache["truth"] = listings(exact_search, queries, RECALL_K, 0, mine)
    truth = cache["truth"]

    def listing_search(q: np.ndarray, k: int, nprobe: int) -> np.ndarray:  # tune_nprobe passes `queries` whole
        return listings(search, q, k, nprobe, mine)

    # the listings already left out their query's own photo: nothing for tune_nprobe to drop (-1 matches none)
    return tune_nprobe(listing_search, queries, np.full(len(rows), -1, np.int64), truth, nlist, target, progress)


def tune_nprobe(search: Callable[[np.ndarray, int, int], np.ndarray], queries: np.ndarray,
                query_keys: np.ndarray, truth_keys: np.ndarray, nlist: int, target: float,
                progress: bool = False) -> tuple[int, list[dict], bool]:
    """Sweep nprobe; return (default nprobe, curve [{nprobe, recall_at_10}], whether target was reached).

    `search(queries, k, nprobe)` returns FAISS ids [N, k]; `truth_keys` holds each query's exact
    top-10 ids without itself. When no nprobe reaches the target (e.g. a PQ index without re-ranking),
    the default is the smallest nprobe within 0.005 of the best recall measured.
    """
    sweep = [p for p in NPROBE_SWEEP if p < nlist] + [nlist]
    curve: list[dict] = []
    chosen, extra = None, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(sweep), desc="tuning nprobe", unit="nprobe")
    try:
        for nprobe in sweep:
            found = drop_self(search(queries, RECALL_K + 1, nprobe), query_keys, RECALL_K)
            recall = recall_at_k(found, truth_keys)
            curve.append({"nprobe": int(nprobe), "recall_at_10": round(float(recall), 4)})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(nprobe=nprobe, recall=f"{recall:.3f}")
            if chosen is None and recall >= target:
                chosen = nprobe
            elif chosen is not None:
                extra += 1
            if chosen is not None and extra >= EXTRA_POINTS:
                break
            if len(curve) >= 3 and curve[-1]["recall_at_10"] >= 0.9995:
                break
            if len(curve) >= 4 and curve[-1]["recall_at_10"] - curve[-4]["recall_at_10"] < 0.002:
                break  # a plateau (e.g. PQ codes without re-ranking): more probes will not help
    finally:
        if bar is not None:
            bar.close()
    if chosen is not None:
        return int(chosen), curve, True
    best = max(c["recall_at_10"] for c in curve)
    chosen = next(c["nprobe"] for c in curve if c["recall_at_10"] >= best - 0.005)
    return int(chosen), curve, False


def seconds_per_query(search: Callable[[np.ndarray], object], queries: np.ndarray, rounds: int = 2) -> float:
    """Seconds one query takes, searched one at a time on one FAISS thread (as a server runs them): the
    best of `rounds` passes over `queries`, so a burst of other work on the machine does not decide it."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        search(queries[:1])
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            for i in range(len(queries)):
                search(queries[i:i + 1])
            best = min(best, (time.perf_counter() - start) / max(len(queries), 1))
        return best
    finally:
        faiss.omp_set_num_threads(before)
