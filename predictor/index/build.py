"""A new FAISS index from a plan: the training sample, spherical k-means, filling with 64-bit ids, the
re-ranking copy, and the first index card.

`VectorIndex.build` checks its input, resolves the factory (`lookalike.predictor.index.factory.plan`), calls
`train_index`, then tunes nprobe. Kept apart so the build's FAISS mechanics read top to bottom:

- exact search (nlist 0): an `IndexIDMap(IndexFlatIP)`, nothing to train;
- IVF: k-means on a sample of at least 39·nlist vectors (`index_tuning.training_sample_size`), with
  centroids on the unit sphere like the vectors, on the GPU when asked (`index_gpu.train_and_add`);
  from `TWO_LEVEL_MIN_NLIST` lists on, a CPU build trains the centroids in two levels
  (`lookalike.predictor.index.clustering`) and FAISS trains only the codes; how well the sample fits its
  centroids is recorded as the drift baseline;
- IVF-PQ with ``Refine(...)``: the re-ranking copy is trained on the same sample.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from lookalike.predictor.index import drift as drift
from lookalike.predictor.index import tuning as tuning
from lookalike.predictor.index.errors import BadIndexInput
from lookalike.predictor.index.clustering import TWO_LEVEL_MIN_NLIST, two_level_centroids
from lookalike.predictor.index.factory import (DEFAULT_FACTORY, HNSW_QUANTIZER_EF, HNSW_QUANTIZER_EF_CONSTRUCTION,
                                               HNSW_QUANTIZER_SEARCH_EF, METRIC, Plan)
from lookalike.predictor.index.gpu import add_chunks, train_and_add
from lookalike.predictor.index.refine import RefineCopy
from lookalike.core.index_card import IndexCard


def now() -> str:
    """The card's timestamps: UTC, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def graph_of(index):
    """The HNSW coarse quantizer of an IVF index, or None (a flat quantizer, exact search)."""
    import faiss

    try:
        quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    except RuntimeError:  # not an IVF index
        return None
    return quantizer if isinstance(quantizer, faiss.IndexHNSW) else None


@contextmanager
def graph_widened(index) -> Iterator[None]:
    """While vectors are added: an HNSW coarse quantizer searches `HNSW_QUANTIZER_EF` deep (each vector stays
    in the list it is assigned to), then goes back to the depth its queries use (see index_factory)."""
    graph = graph_of(index)
    if graph is None:
        yield
        return
    query_depth = graph.hnsw.efSearch
    graph.hnsw.efSearch = max(query_depth, HNSW_QUANTIZER_EF)
    try:
        yield
    finally:
        graph.hnsw.efSearch = query_depth


def deepen_graph_build(index) -> None:
    """Before the centroids go into an HNSW coarse quantizer: build its graph `HNSW_QUANTIZER_EF_CONSTRUCTION`
    deep (see index_factory)."""
    graph = graph_of(index)
    if graph is not None:
        graph.hnsw.efConstruction = HNSW_QUANTIZER_EF_CONSTRUCTION


# The depths the nprobe tuning tries for queries: it keeps the fastest that reaches the target recall. Not
# below 32: the held-out queries are indexed vectors, which the graph placed at depth 64, and a shallow
# search finds their lists more easily than a new photo's (1M yardstick, depth 16 at nprobe 10: held-out
# recall@10 0.950, new queries 0.936).
QUERY_DEPTHS = (2 * HNSW_QUANTIZER_SEARCH_EF, HNSW_QUANTIZER_EF)


def set_query_depth(index) -> None:
    """A new index's HNSW coarse quantizer searches `HNSW_QUANTIZER_SEARCH_EF` deep for queries: the depth
    the index file keeps and the nprobe tuning measures. (k-means trains at FAISS's default.)"""
    graph = graph_of(index)
    if graph is not None:
        graph.hnsw.efSearch = HNSW_QUANTIZER_SEARCH_EF


def prefill_centroids(index, xt: np.ndarray, nlist: int, seed: int) -> None:
    """Put centroids trained in two levels into the untrained index's coarse quantizer, so that FAISS's
    train() trains only what encodes the vectors (FAISS skips a quantizer that already holds nlist)."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    centroids = two_level_centroids(xt, nlist, seed=seed, spherical=True)
    quantizer = ivf.quantizer
    if not quantizer.is_trained:
        quantizer.train(centroids)
    quantizer.add(centroids)


@dataclass
class TrainedIndex:
    """A filled FAISS index, its re-ranking copy (IVF-PQ only) and its card (nprobe not tuned yet)."""

    index: Any
    refine: RefineCopy | None
    card: IndexCard
    started: float             # perf_counter() when training began: the card's build_seconds


def train_index(x: np.ndarray, keys: np.ndarray, built: Plan, *, model_version: str, factory: str | None,
                vocab: dict[str, list[str]], catalogs: Sequence[str] | None, target_recall: float,
                refine_k_factor: int, rng: np.random.Generator, seed: int, gpu: bool,
                progress: bool) -> TrainedIndex:
    """Train and fill the index `built` describes with x (row i has FAISS id keys[i])."""
    import faiss

    n, d = x.shape
    started = time.perf_counter()
    refine = fit = None
    built_on, train_sample = "cpu", 0
    if built.nlist == 0:
        index = faiss.IndexIDMap(faiss.IndexFlatIP(d))
        add_chunks(index, x, keys, progress, "adding (exact)")
    else:
        try:
            index = faiss.index_factory(d, built.base, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise BadIndexInput(f"FAISS cannot build factory {built.base!r} for {d}-d vectors: "
                                f"{str(exc).splitlines()[0]}") from exc
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
        ivf.cp.spherical = True  # centroids on the unit sphere, like the vectors
        sample = np.sort(rng.choice(n, tuning.training_sample_size(n, built.nlist), replace=False))
        xt = x[sample]
        train_sample = len(xt)
        deepen_graph_build(index)
        if not gpu and built.nlist >= TWO_LEVEL_MIN_NLIST:
            prefill_centroids(index, xt, built.nlist, seed)
        with graph_widened(index):
            index, built_on = train_and_add(index, xt, x, keys, gpu, progress)
        set_query_depth(index)
        ivf = faiss.extract_index_ivf(index)
        fit = drift.centroid_fit(ivf, xt)
        if built.refine:
            refine = RefineCopy.train(built.refine, refine_k_factor, xt, x)
    exact = built.nlist == 0
    card = IndexCard(
        model_version=model_version, dim=d, metric=METRIC, factory=built.factory,
        factory_setting=factory or DEFAULT_FACTORY, kind="exact" if exact else "ivf",
        exact_fallback=built.fallback, nlist=built.nlist or None, nprobe=None, count=n,
        recall_at_10=1.0 if exact else None, target_recall=float(target_recall),
        target_reached=True if exact else None, recall_curve=[], tune_queries=0,
        refine=refine.describe if refine else None, labels=vocab,
        catalogs=list(catalogs) if catalogs is not None else None, seed=int(seed),
        train_sample=train_sample, built_on=built_on, built_at=now(),
        trained_count=n,  # vectors in the index when its centroids were trained
        imbalance_at_training=None if exact else drift.imbalance(ivf),
        centroid_fit_at_training=fit, faiss_version=faiss.__version__)
    return TrainedIndex(index, refine, card, started)
