"""The FAISS vector index: build and tune, filtered search, incremental updates, drift, persistence through
a real S3 server, and bad input that must leave the index unchanged. Small data: a few thousand
clustered 32-d vectors, so the whole file runs in well under a minute.

Why this file is long: the index is one front door (`VectorIndex`) over many parts, and its tests build
and share the same clustered data and published folders through module-scoped fixtures.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from lookalike.predictor.index import tuning as tuning
from lookalike.predictor.index import (PQ_FACTORY, BadIndexInput, CorruptIndex, IndexMismatch, VectorIndex, gpu_count,
                                       listing_key, listing_keys)
from lookalike.core.artifacts import index_repo
from lookalike.core.errors import InputError, UnavailableError
from lookalike.core.index_card import IndexCard, IndexCardError

D = 32
N = 3000
MODEL = "20261124T010203Z-aaaaaa"
COLORS = ("red", "blue", "green")


def clustered(n: int, seed: int, d: int = D, clusters: int = 40) -> np.ndarray:
    """Unit vectors around `clusters` centres: neighbourhoods IVF can find, like real embeddings."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).standard_normal((clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def ids_for(n: int, prefix: str = "fmnist-train") -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(n)]


def labels_for(n: int, offset: int = 0) -> dict[str, list]:
    # "rare" marks 2% of the listings: a filter on it must still fill top_k.
    return {"category": ["rare" if (i + offset) % 50 == 0 else "common" for i in range(n)],
            "color": [None if (i + offset) % 7 == 0 else COLORS[(i + offset) % 3] for i in range(n)]}


def exact_top(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]


@pytest.fixture(scope="module")
def data():
    return clustered(N, seed=0)


@pytest.fixture(scope="module")
def built(data):
    return VectorIndex.build(data, ids_for(N), labels_for(N), model_version=MODEL, seed=0)


@pytest.fixture
def index(data):
    """A fresh index per test that changes it."""
    return VectorIndex.build(data, ids_for(N), labels_for(N), model_version=MODEL, seed=0)


def snapshot(idx: VectorIndex, queries: np.ndarray):
    res = idx.search(queries, 10)
    info = idx.info
    info.pop("updated_at", None)
    return len(idx), res.listing_ids, res.scores.copy(), info


# ---- keys, nlist rule ----------------------------------------------------------------------------

def test_listing_key_is_stable_non_negative_63_bit():
    import hashlib

    key = listing_key("fmnist-train-00042")
    expected = int.from_bytes(hashlib.blake2b(b"fmnist-train-00042", digest_size=8).digest(), "little") & (2**63 - 1)
    assert key == expected
    keys = {listing_key(s) for s in ids_for(5000)}
    assert len(keys) == 5000 and all(0 <= k < 2**63 for k in keys)


def test_rows_of_finds_keys_through_buckets_for_hashes_and_for_keys_that_are_not_hashes():
    """The table maps FAISS ids to rows through buckets of the (hashed, uniform) key space; keys bunched in one
    bucket are found all the same, and a key not in the table (or -1, "no result") maps to -1."""
    from lookalike.predictor.index.table import ListingTable

    rng = np.random.default_rng(3)
    for keys in (np.unique(rng.integers(0, 2**63 - 1, 50_000, dtype=np.int64)),   # hashes: ~2 keys a bucket
                 np.arange(5_000, dtype=np.int64) * 7):                             # bunched: one bucket
        rng.shuffle(keys)
        table = ListingTable()
        table.keys, table.owners = keys, keys.copy()
        table._reindex()
        rows = rng.integers(0, len(keys), (7, 40))
        np.testing.assert_array_equal(table.rows_of(keys[rows]), rows)
        np.testing.assert_array_equal(table.rows_of(keys[rows[0]]), rows[0])
        np.testing.assert_array_equal(table.rows_of(keys[[0, len(keys) - 1]]), [0, len(keys) - 1])
        absent = np.setdiff1d(np.array([3, 2**62 + 11, 2**63 - 1], np.int64), keys)
        np.testing.assert_array_equal(table.rows_of(np.r_[absent, -1, keys[5]]), [-1] * (len(absent) + 1) + [5])
    empty = ListingTable()
    np.testing.assert_array_equal(empty.rows_of(np.array([5, -1], np.int64)), [-1, -1])


def test_nlist_rule_and_training_floor():
    assert tuning.choose_nlist(1_000_000) == 8192
    assert tuning.choose_nlist(100_000) == 2048
    assert tuning.choose_nlist(3000) == 64          # capped by the 39-per-list floor
    assert tuning.choose_nlist(1000) == 0           # too small: exact search
    for n in (1300, 3000, 50_000, 1_000_000):
        nlist = tuning.choose_nlist(n)
        assert tuning.training_sample_size(n, nlist) >= min(n, 39 * nlist) and n >= 39 * nlist


# ---- build, tune, search -------------------------------------------------------------------------

def test_build_tunes_nprobe_and_describes_itself(built, data):
    info = built.info
    assert info["kind"] == "ivf" and info["factory"] == "IVF64,Flat" and info["nlist"] == 64
    assert info["model_version"] == MODEL and info["dim"] == D and info["metric"] == "inner_product"
    assert info["count"] == N and info["trained_count"] == N and info["exact_fallback"] is None
    curve = info["recall_curve"]
    assert curve and curve[0]["nprobe"] == 1 and all({"nprobe", "recall_at_10"} <= set(c) for c in curve)
    # the default is the smallest swept nprobe that reaches the target
    reaching = [c["nprobe"] for c in curve if c["recall_at_10"] >= 0.95]
    assert info["target_reached"] and info["nprobe"] == reaching[0]
    assert info["recall_at_10"] >= 0.95
    # and it holds on unseen queries
    queries = clustered(200, seed=99)
    res = built.search(queries, 10)
    truth = exact_top(data, queries, 10)
    found = [[int(s.rsplit("-", 1)[1]) for s in row] for row in res.listing_ids]
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
    assert recall >= 0.93


def test_search_maps_ids_and_returns_cosine(built, data):
    res = built.search(data[:5], 3)
    assert [row[0] for row in res.listing_ids] == ids_for(5)
    assert res.ids.shape == (5, 3) and res.ids.dtype == np.int64 and res.ids[0, 0] == listing_key(ids_for(1)[0])
    rows = [[int(s.rsplit("-", 1)[1]) for s in row] for row in res.listing_ids]
    expected = np.array([[data[i] @ data[j] for j in r] for i, r in enumerate(rows)])
    np.testing.assert_allclose(res.scores, expected, atol=1e-5)
    assert (np.diff(res.scores, axis=1) <= 1e-6).all()
    one = built.search(data[7], 1)  # a single 1-D vector is a batch of one
    assert one.listing_ids == [[ids_for(8)[7]]]


def test_small_catalog_falls_back_to_exact_search_visibly(caplog):
    x = clustered(500, seed=3)
    with caplog.at_level(logging.WARNING, logger="lookalike.predictor.index"):
        idx = VectorIndex.build(x, ids_for(500), model_version=MODEL)
    info = idx.info
    assert info["kind"] == "exact" and info["factory"] == "Flat" and info["nlist"] is None
    assert "too few" in info["exact_fallback"] and "exact search" in caplog.text
    q = clustered(20, seed=4)
    res = idx.search(q, 5, nprobe=3)  # nprobe means nothing to exact search
    assert [[int(s.rsplit("-", 1)[1]) for s in row] for row in res.listing_ids] == exact_top(x, q, 5).tolist()
    allowed = ids_for(500)[::10]
    res = idx.search(q, 5, allowed_ids=allowed)
    assert all(len(row) == 5 and set(row) <= set(allowed) for row in res.listing_ids)
    assert idx.remove(allowed[:2]) == 2 and len(idx) == 498 and allowed[0] not in idx
    assert idx.drift()["rebuild_due"] is False


def test_factory_setting():
    x = clustered(2000, seed=5)
    idx = VectorIndex.build(x, ids_for(2000), model_version=MODEL, factory="IVF16,Flat")
    assert idx.nlist == 16 and idx.info["factory_setting"] == "IVF16,Flat"
    with pytest.raises(BadIndexInput, match="at least 9984 training vectors"):
        VectorIndex.build(x, ids_for(2000), model_version=MODEL, factory="IVF256,Flat")
    with pytest.raises(BadIndexInput, match="not supported"):
        VectorIndex.build(x, ids_for(2000), model_version=MODEL, factory="HNSW32")


def test_large_nlist_gets_an_hnsw_coarse_quantizer(data, tmp_path, monkeypatch):
    """From 4,096 lists on, the chosen nlist is found through an HNSW graph over the centroids (a flat
    quantizer would cost nlist·D per query and per vector added), trained in two levels; it trains, tunes,
    updates and saves like any IVF, and queries search the graph less deep than adds."""
    import faiss

    from lookalike.predictor.index import build as index_build
    from lookalike.predictor.index import factory as index_factory

    assert index_factory.plan(None, 256, 10_000_000).base == "IVF32768_HNSW32,Flat"
    assert index_factory.plan(index_factory.PQ_FACTORY, 256, 10_000_000).base == "IVF32768_HNSW32,PQ128x4fsr"
    assert index_factory.plan(None, 256, 1_000_000).base == "IVF8192_HNSW32,Flat"
    assert index_factory.plan(None, 256, 100_000).base == "IVF2048,Flat"   # below the threshold: flat
    monkeypatch.setattr(index_factory, "HNSW_QUANTIZER_MIN_NLIST", 64)      # the same path at test size
    monkeypatch.setattr(index_build, "TWO_LEVEL_MIN_NLIST", 64)
    idx = VectorIndex.build(data, ids_for(N), model_version=MODEL)
    assert idx.info["factory"] == "IVF64_HNSW32,Flat" and idx.info["target_reached"]
    graph = faiss.downcast_index(idx._ivf.quantizer)
    assert graph.ntotal == 64 and graph.hnsw.efConstruction == index_factory.HNSW_QUANTIZER_EF_CONSTRUCTION
    res = idx.search(data[:20], 5)
    assert [row[0] for row in res.listing_ids] == ids_for(N)[:20]   # each vector finds itself first
    depths = []
    real_add = faiss.IndexIVF.add_with_ids
    monkeypatch.setattr(faiss.IndexIVF, "add_with_ids",
                        lambda self, *a: (depths.append(graph.hnsw.efSearch), real_add(self, *a))[1])
    idx.add(clustered(10, seed=77), ids_for(10, prefix="new"))
    assert depths and set(depths) == {index_factory.HNSW_QUANTIZER_EF}   # adds look deeper than queries
    loaded = VectorIndex.load(idx.save(tmp_path / "hnsw"), model_version=MODEL)
    assert len(loaded) == N + 10 and loaded.search(data[:5], 5).listing_ids == idx.search(data[:5], 5).listing_ids
    graph = faiss.downcast_index(loaded._ivf.quantizer)   # the file keeps the query depth the tuning chose
    assert isinstance(graph, faiss.IndexHNSW) and graph.hnsw.efSearch in index_build.QUERY_DEPTHS


def test_index_saved_with_a_deeper_query_graph_keeps_it(data, tmp_path, monkeypatch):
    """Indexes saved before queries searched the graph less deep than adds (at 64 for both) load and
    search as they were saved; an add leaves their depth as it found it."""
    import faiss

    from lookalike.predictor.index import factory as index_factory

    monkeypatch.setattr(index_factory, "HNSW_QUANTIZER_MIN_NLIST", 64)
    idx = VectorIndex.build(data, ids_for(N), model_version=MODEL)
    faiss.downcast_index(idx._ivf.quantizer).hnsw.efSearch = 64   # as the index file of an older build
    loaded = VectorIndex.load(idx.save(tmp_path / "old"), model_version=MODEL)
    loaded.add(clustered(10, seed=78), ids_for(10, prefix="new"))
    assert faiss.downcast_index(loaded._ivf.quantizer).hnsw.efSearch == 64
    assert [row[0] for row in loaded.search(data[:10], 5).listing_ids] == ids_for(N)[:10]


def test_two_level_centroids_are_even_and_complete():
    from lookalike.predictor.index.clustering import split_counts, two_level_centroids

    counts = split_counts(np.array([500, 1, 0, 99]), 10)
    assert counts.sum() == 10 and counts[1] == 1 and counts[2] == 0 and counts[0] > counts[3] >= 1
    assert split_counts(np.array([3, 3]), 6).tolist() == [3, 3]
    x = clustered(2000, seed=5)
    centroids = two_level_centroids(x, 64, seed=0)
    assert centroids.shape == (64, D) and centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-4)   # on the sphere
    _, assign = faiss_knn(x, centroids)
    sizes = np.bincount(assign.ravel(), minlength=64)
    assert sizes.max() <= 6 * len(x) / 64   # no list swallows a dense region


def faiss_knn(x, centroids):
    import faiss

    return faiss.knn(x, centroids, 1, metric=faiss.METRIC_INNER_PRODUCT)


def test_ivf_pq_with_re_ranking(data, tmp_path):
    idx = VectorIndex.build(data, ids_for(N), model_version=MODEL, factory=PQ_FACTORY, target_recall=0.9)
    info = idx.info
    assert info["factory"] == "IVF64,PQ16x4fsr,Refine(SQ8)" and info["refine"]["codec"] == "SQ8"
    assert info["recall_at_10"] >= 0.9
    codes = idx._refine.codes[:50]  # the numpy decoder is FAISS's 8-bit rule
    np.testing.assert_allclose(idx._refine.decode(codes), idx._refine.codec.sa_decode(codes), atol=1e-6)
    res = idx.search(data[:20], 1)
    assert [r[0] for r in res.listing_ids] == ids_for(20)  # re-ranking puts each vector first
    batch = idx.search(data[:8], 10)   # one query at a time (the re-ranking's short path) ranks alike
    for i in range(8):
        one = idx.search(data[i], 10)
        assert one.listing_ids[0] == batch.listing_ids[i]
        np.testing.assert_allclose(one.scores[0], batch.scores[i], atol=1e-6)
    loaded = VectorIndex.load(idx.save(tmp_path / "pq"), model_version=MODEL)
    again = loaded.search(data[:20], 10)
    assert again.listing_ids == idx.search(data[:20], 10).listing_ids


@pytest.mark.parametrize("kind", ["SQ8", "SQfp16", "Flat"])
def test_re_ranking_keeps_the_best_candidates_by_their_decoded_codes(data, kind):
    """The re-ranking (compiled for SQ8 and Flat copies, numpy for SQfp16) keeps the k candidates whose decoded
    codes have the largest inner product with the query, best first, with their table rows; -1 candidates
    are skipped and a query with fewer than k candidates is padded with -1 / -inf."""
    from lookalike.predictor.index.refine import RefineCopy
    from lookalike.predictor.index.table import ListingTable

    table = ListingTable()
    keys = listing_keys(ids_for(N))
    table.keys, table.owners = keys, keys.copy()
    table._reindex()
    copy = RefineCopy.train(kind, 10, data[:1000], data)
    rng = np.random.default_rng(5)
    queries = data[rng.choice(N, 4, replace=False)] + 0.01
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    cand = keys[rng.choice(N, (4, 30), replace=False)]
    cand[1, [3, 7]] = -1
    scores, found, rows = copy.rerank(queries, cand, table, 10)
    decoded = copy.decode(copy.codes)
    for i in range(4):
        given = cand[i][cand[i] >= 0]
        exact = decoded[table.rows_of(given)] @ queries[i]
        best = np.argsort(-exact, kind="stable")[:10]
        np.testing.assert_array_equal(found[i], given[best])
        np.testing.assert_array_equal(rows[i], table.rows_of(given[best]))
        np.testing.assert_allclose(scores[i], exact[best], rtol=1e-5, atol=1e-5)
    scores, found, rows = copy.rerank(queries[:1], cand[:1, :4], table, 10)
    assert (found[0, 4:] == -1).all() and (rows[0, 4:] == -1).all() and np.isneginf(scores[0, 4:]).all()
    assert sorted(found[0, :4]) == sorted(cand[0, :4])


def test_the_compiled_kernels_are_ready_once_an_index_exists(built):
    """Making an index compiles the search's kernels (or loads them from numba's disk cache), so a predictor's
    first query does not pay seconds of compiling: the key lookup and both re-ranking variants (8-bit and
    float32 codes) are compiled by then."""
    from lookalike.predictor.index import kernels

    assert len(kernels._find_rows.signatures) >= 1
    assert {str(sig[8]) for sig in kernels._rerank.signatures} >= {"array(uint8, 2d, C)", "array(float32, 2d, C)"}


# ---- filters -------------------------------------------------------------------------------------

def test_label_filter_returns_full_top_k(built, data):
    rare = [i for i, c in enumerate(labels_for(N)["category"]) if c == "rare"]
    queries = clustered(10, seed=11)
    res = built.search(queries, 20, nprobe=1, label_filter={"category": "rare"})
    assert all(len(row) == 20 for row in res.listing_ids)  # 60 rare listings exist: never fewer than 20
    assert all(built.labels_of(lid)["category"] == "rare" for row in res.listing_ids for lid in row)
    truth = np.array(rare)[exact_top(data[rare], queries, 20)]
    found = [[int(s.rsplit("-", 1)[1]) for s in row] for row in res.listing_ids]
    assert np.mean([len(set(f) & set(t)) / 20 for f, t in zip(found, truth)]) >= 0.9
    both = built.search(queries, 5, label_filter={"category": "common", "color": "blue"})
    assert all(built.labels_of(lid) == {"category": "common", "color": "blue"} for row in both.listing_ids
               for lid in row)


def test_allowed_ids_and_fewer_matches_than_top_k(built, data):
    allowed = ids_for(N)[1000:1015]
    res = built.search(data[:3], 10, nprobe=1, allowed_ids=allowed)
    assert all(len(row) == 10 and set(row) <= set(allowed) for row in res.listing_ids)
    few = built.search(data[:2], 10, allowed_ids=ids_for(N)[:4] + ["delisted-1"])
    assert [len(row) for row in few.listing_ids] == [4, 4]
    assert (few.ids[:, 4:] == -1).all() and np.isnan(few.scores[:, 4:]).all()
    none = built.search(data[:1], 5, label_filter={"category": "never-seen"})
    assert none.listing_ids == [[]]
    with pytest.raises(BadIndexInput, match="cannot filter on 'material'"):
        built.search(data[:1], 5, label_filter={"material": "cotton"})



def test_one_query_answers_as_its_row_of_a_batch_does(built, data, listings_index):
    """One query takes a shorter path after the list scan (fewest numpy calls): the same listings, photos and ids
    as its row of a batch, also when fewer than top_k pass a filter and when photos are not each listing's "0"."""
    multi, x, _, _ = listings_index
    cases = [(built, data[:3], {}), (built, data[:3], {"allowed_ids": ids_for(N)[:4]}), (multi, x[:6:2], {})]
    for index, queries, kwargs in cases:
        batch = index.search(queries, 10, **kwargs)
        for i, q in enumerate(queries):
            one = index.search(q, 10, **kwargs)
            assert one.listing_ids == batch.listing_ids[i:i + 1] and one.photo_ids == batch.photo_ids[i:i + 1]
            np.testing.assert_array_equal(one.ids, batch.ids[i:i + 1])
    assert built.search(data[0], 10, allowed_ids=ids_for(N)[:4]).photo_ids == [["0"] * 4]
    assert {p for row in multi.search(x[:6:2], 10).photo_ids for p in row} > {"0"}

# ---- incremental updates, drift ------------------------------------------------------------------

def test_add_without_retraining(data):
    cut = 2700
    idx = VectorIndex.build(data[:cut], ids_for(cut), labels_for(cut), model_version=MODEL)
    centroids = idx._ivf.quantizer.reconstruct_n(0, idx.nlist)
    assert idx.add(data[cut:], ids_for(N)[cut:], labels_for(N - cut, offset=cut)) == N - cut
    assert len(idx) == N and idx.info["count"] == N and idx.info["added_since_training"] == N - cut
    np.testing.assert_array_equal(idx._ivf.quantizer.reconstruct_n(0, idx.nlist), centroids)
    res = idx.search(data[cut:cut + 20], 1)
    assert [r[0] for r in res.listing_ids] == ids_for(N)[cut:cut + 20]
    assert idx.labels_of(ids_for(N)[cut]) == {"category": "rare", "color": "red"}  # 2700: % 50 == 0, % 3 == 0
    assert idx.drift()["rebuild_due"] is False


def test_remove_and_replace(index, data):
    gone = ids_for(N)[:10]
    assert index.remove(gone) == 10 and len(index) == N - 10 and index.info["removed_since_training"] == 10
    res = index.search(data[:10], 10)
    assert not set(gone) & {lid for row in res.listing_ids for lid in row}
    assert gone[0] not in index and ids_for(N)[10] in index

    target = ids_for(N)[100:105]
    before = [index.labels_of(t) for t in target]
    fresh = clustered(5, seed=77)
    assert index.replace(fresh, target) == 5 and len(index) == N - 10
    res = index.search(fresh, 1)
    assert [r[0] for r in res.listing_ids] == target
    assert [index.labels_of(t) for t in target] == before  # labels kept unless given
    index.replace(fresh[:1], target[:1], labels={"color": ["green"]})
    assert index.labels_of(target[0]) == {"category": before[0]["category"], "color": "green"}


def test_drift_says_when_a_rebuild_is_due(data):
    idx = VectorIndex.build(data[:2400], ids_for(2400), model_version=MODEL)
    assert idx.drift()["rebuild_due"] is False
    idx.add(data[2400:], ids_for(N)[2400:])  # 25% more than trained on
    drift = idx.drift()
    assert drift["rebuild_due"] is True and drift["added_since_training"] == 600
    assert any("added since training" in r for r in drift["reasons"])
    # vectors unlike anything trained on (random directions) fit the trained centroids worse
    other = VectorIndex.build(data[:2400], ids_for(2400), model_version=MODEL)
    novel = np.random.default_rng(8).standard_normal((100, D))
    other.add((novel / np.linalg.norm(novel, axis=1, keepdims=True)).astype(np.float32), ids_for(100, "new"))
    drift = other.drift()
    assert drift["rebuild_due"] is True and drift["centroid_fit_added"] < drift["centroid_fit_at_training"] - 0.05
    assert any("fit the trained centroids worse" in r for r in drift["reasons"])


# ---- persistence ---------------------------------------------------------------------------------

def test_save_load_round_trip(built, data, tmp_path):
    folder = built.save(tmp_path / "idx")
    info = json.loads((folder / "index.json").read_text())
    for field in ("model_version", "dim", "metric", "factory", "nlist", "nprobe", "count", "recall_curve", "files"):
        assert field in info
    loaded = VectorIndex.load(folder, model_version=MODEL, dim=D)
    rare = {"category": "rare"}
    a, b = built.search(data[:30], 10, label_filter=rare), loaded.search(data[:30], 10, label_filter=rare)
    assert a.listing_ids == b.listing_ids
    np.testing.assert_allclose(a.scores, b.scores)
    assert loaded.info["recall_curve"] == built.info["recall_curve"] and loaded.nprobe == built.nprobe


def test_publish_and_fetch_through_the_store(store, data):
    idx = VectorIndex.build(data[:2000], ids_for(2000), labels_for(2000), model_version=MODEL)
    first = idx.publish(store, alias="production")
    repo = index_repo(store, MODEL)
    assert repo.versions() == [first] and repo.resolve("production") == first
    assert {"index.json", "index.faiss", "listings.npz", "listing_ids.json"} <= set(repo.manifest(first)["files"])

    fetched = VectorIndex.fetch(store, MODEL, ref="production", dim=D)
    assert fetched.version == first and len(fetched) == 2000
    assert fetched.search(data[:5], 5).listing_ids == idx.search(data[:5], 5).listing_ids

    fetched.add(data[2000:], ids_for(N)[2000:])  # an update is a new version; the old one is untouched
    second = fetched.publish(store)
    assert second != first and set(repo.versions()) == {first, second}
    newest = VectorIndex.fetch(store, MODEL)
    assert newest.version == second and len(newest) == N and newest.info["parent_version"] == first
    assert len(VectorIndex.fetch(store, MODEL, ref=first)) == 2000


def test_load_refuses_another_model_or_dimension(built, tmp_path, store):
    folder = built.save(tmp_path / "idx")
    with pytest.raises(IndexMismatch) as err:
        VectorIndex.load(folder, model_version="20261201T000000Z-bbbbbb")
    assert MODEL in str(err.value) and "20261201T000000Z-bbbbbb" in str(err.value)
    with pytest.raises(IndexMismatch, match="32-d"):
        VectorIndex.load(folder, model_version=MODEL, dim=64)
    version = built.publish(store)
    with pytest.raises(IndexMismatch, match="64-d"):
        VectorIndex.fetch(store, MODEL, ref=version, dim=64)


@pytest.mark.parametrize("damage", ["truncate", "flip", "missing", "table"])
def test_load_refuses_a_damaged_index(built, tmp_path, damage):
    folder = built.save(tmp_path / "idx")
    target = folder / ("listings.npz" if damage == "table" else "index.faiss")
    raw = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(raw[: len(raw) // 2])
    elif damage in ("flip", "table"):
        target.write_bytes(raw[:100] + bytes([raw[100] ^ 0xFF]) + raw[101:])
    else:
        target.unlink()
    with pytest.raises(CorruptIndex, match="truncated|checksum|missing"):
        VectorIndex.load(folder, model_version=MODEL)


def test_saving_over_a_published_version_is_refused(built, store, tmp_path):
    version = built.publish(store)
    path = index_repo(store, MODEL).fetch(version, tmp_path / "fetched")
    with pytest.raises(BadIndexInput, match="never edited"):
        built.save(path)


def test_files_are_hashed_once(store, data, tmp_path, monkeypatch):
    """A saved folder is verified against index.json, a published one against MANIFEST.json, a download
    only by the repository that fetched it: every file hashed once per load, never twice."""
    import lookalike.core.artifacts
    import lookalike.core.index_card

    hashed: list[str] = []
    real = lookalike.core.artifacts.sha256_file

    def counting(path):
        hashed.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(lookalike.core.artifacts, "sha256_file", counting)
    monkeypatch.setattr(lookalike.core.index_card, "sha256_file", counting)
    idx = VectorIndex.build(data[:2000], ids_for(2000), model_version=MODEL)
    folder = idx.save(tmp_path / "saved")
    listed = sorted(json.loads((folder / "index.json").read_text())["files"])
    hashed.clear()
    VectorIndex.load(folder, model_version=MODEL)
    assert sorted(hashed) == listed  # not published: against index.json's own checksums

    version = idx.publish(store)
    in_manifest = sorted(index_repo(store, MODEL).manifest(version)["files"])
    hashed.clear()
    VectorIndex.fetch(store, MODEL, version)
    assert sorted(hashed) == in_manifest  # the download's verification only
    hashed.clear()
    VectorIndex.load(index_repo(store, MODEL).fetch(version, tmp_path / "copy"), verified=False)
    assert sorted(hashed) == sorted(2 * in_manifest)  # the fetch into a new folder, then the load: MANIFEST only


def test_a_damaged_published_folder_is_refused_by_its_manifest(built, store, tmp_path):
    version = built.publish(store)
    folder = index_repo(store, MODEL).fetch(version, tmp_path / "copy")
    raw = (folder / "listing_ids.json").read_bytes()
    (folder / "listing_ids.json").write_bytes(raw.replace(b"fmnist", b"fmnisT", 1))
    with pytest.raises(CorruptIndex, match="checksum") as err:
        VectorIndex.load(folder, model_version=MODEL)
    assert "Republish" in str(err.value) or "re-fetch" in str(err.value)


# ---- the index card --------------------------------------------------------------------------------

def test_index_card_round_trip_and_unknown_fields(built, tmp_path):
    folder = built.save(tmp_path / "idx")
    on_disk = json.loads((folder / "index.json").read_text())
    card = IndexCard.read(folder)
    assert card.to_dict() == on_disk and IndexCard.from_dict(card.to_dict()) == card
    assert card.model_version == MODEL and card.dim == D and card.kind == "ivf" and card.count == N
    assert set(card.files) == {"index.faiss", "listings.npz", "listing_ids.json", "photo_ids.json"}
    card.verify_files(folder)
    assert built.info == {k: v for k, v in on_disk.items() if k != "files"}
    later = dict(on_disk, added_by_a_newer_writer={"x": 1})  # kept and written back
    assert IndexCard.from_dict(later).to_dict()["added_by_a_newer_writer"] == {"x": 1}
    assert "catalogs" not in on_disk
    with_catalogs = VectorIndex.build(clustered(200, 3), ids_for(200), model_version=MODEL,
                                      catalogs=["s3://lookalike/catalogs/a/catalog.jsonl"])
    assert with_catalogs.card.catalogs == with_catalogs.info["catalogs"] == ["s3://lookalike/catalogs/a/catalog.jsonl"]


@pytest.mark.parametrize("change, message", [
    ({"format": 2}, "format 2"),
    ({"dim": "32"}, "dim must be an integer"),
    ({"kind": "hnsw"}, "kind must be one of"),
    ({"files": {"index.faiss": {"sha256": "00", "size": 1}}}, "64-hex sha256"),
    ({"labels": {"color": [1, 2]}}, "list of strings"),
])
def test_a_malformed_index_card_is_refused(built, tmp_path, change, message):
    folder = built.save(tmp_path / "idx")
    info = json.loads((folder / "index.json").read_text())
    info.update(change)
    with pytest.raises(IndexCardError, match=message):
        IndexCard.from_dict(info)
    (folder / "index.json").write_text(json.dumps(info))
    with pytest.raises(CorruptIndex, match=message) as err:
        VectorIndex.load(folder)
    assert "rebuild" in str(err.value).lower() or "re-fetch" in str(err.value)
    (folder / "index.json").write_text("{not json")
    with pytest.raises(CorruptIndex, match="JSON"):
        VectorIndex.load(folder)


def test_index_card_imports_neither_torch_nor_faiss():
    code = ("import sys, lookalike.core.index_card; "
            "print(sorted(m for m in ('torch', 'faiss', 'predictor') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


def test_errors_are_in_the_project_family():
    assert issubclass(BadIndexInput, InputError) and issubclass(BadIndexInput, ValueError)
    assert BadIndexInput.status == 400
    for cls in (IndexMismatch, CorruptIndex):
        assert issubclass(cls, UnavailableError) and cls.status == 503
    assert issubclass(CorruptIndex, IndexCardError)


def test_recall_at_k_is_faiss_intersection_measure_with_missing_results():
    from faiss.contrib.evaluation import knn_intersection_measure

    truth = np.array([[1, 2, 3], [4, 5, 6]])
    found = np.array([[3, 9, 1], [5, 7, 8]])
    assert tuning.recall_at_k(found, truth, 3) == knn_intersection_measure(found, truth) == pytest.approx(3 / 6)
    padded = np.array([[1, 2, 3], [4, 5, -1]])  # a short truth row (fewer neighbours than k)
    missing = np.array([[3, 9, -1], [5, -1, -1]])  # a missing result does not match the truth's -1 padding
    assert tuning.recall_at_k(missing, padded, 3) == pytest.approx(2 / 6)
    assert tuning.recall_at_k(missing[:, :2], padded, 3) == pytest.approx(2 / 6)  # short rows: fewer found


# ---- bad input leaves the index unchanged ----------------------------------------------------------

BAD_CASES = {
    "wrong dim": lambda idx, x: idx.add(clustered(3, 1, d=D + 1), ids_for(3, "n")),
    "nan": lambda idx, x: idx.add(np.where(np.arange(D) == 0, np.nan, x[:2]).astype(np.float32), ids_for(2, "n")),
    "not normalised": lambda idx, x: idx.add(x[:2] * 2, ids_for(2, "n")),
    "integer vectors": lambda idx, x: idx.add(np.ones((2, D), np.int64), ids_for(2, "n")),
    "duplicate ids in batch": lambda idx, x: idx.add(x[:2], ["n-1", "n-1"]),
    "id already present": lambda idx, x: idx.add(x[:2], ["n-1", ids_for(1)[0]]),
    "ids and vectors differ": lambda idx, x: idx.add(x[:3], ids_for(2, "n")),
    "bad labels": lambda idx, x: idx.add(x[:2], ids_for(2, "n"), labels={"category": ["a"]}),
    "remove unknown": lambda idx, x: idx.remove([ids_for(1)[0], "never-listed"]),
    "replace unknown": lambda idx, x: idx.replace(x[:2], [ids_for(1)[0], "never-listed"]),
    "replace nan": lambda idx, x: idx.replace(np.full((1, D), np.nan, np.float32), ids_for(1)),
    "top_k zero": lambda idx, x: idx.search(x[:1], 0),
    "top_k above count": lambda idx, x: idx.search(x[:1], N + 1),
    "nprobe zero": lambda idx, x: idx.search(x[:1], 5, nprobe=0),
    "query wrong dim": lambda idx, x: idx.search(np.ones((1, D + 3), np.float32) / np.sqrt(D + 3), 5),
    "query not normalised": lambda idx, x: idx.search(x[:1] * 0.5, 5),
    "query nan": lambda idx, x: idx.search(np.full((1, D), np.nan, np.float32), 5),
    "query empty": lambda idx, x: idx.search(np.zeros((0, D), np.float32), 5),
}


def test_bad_input_gets_a_clear_error_and_changes_nothing(index, data):
    queries = data[:20]
    before = snapshot(index, queries)
    for name, call in BAD_CASES.items():
        with pytest.raises(BadIndexInput) as err:
            call(index, data)
        assert len(str(err.value)) > 20, name  # says what is wrong
        after = snapshot(index, queries)
        assert after[0] == before[0] and after[1] == before[1], name
        np.testing.assert_array_equal(after[2], before[2], err_msg=name)
        assert after[3] == before[3], name
    assert ids_for(1)[0] in index  # the known id of the mixed remove was not removed


def test_build_refuses_bad_input():
    x = clustered(100, seed=1)
    with pytest.raises(BadIndexInput, match="duplicate"):
        VectorIndex.build(x, ids_for(99) + [ids_for(1)[0]], model_version=MODEL)
    with pytest.raises(BadIndexInput, match="normalised"):
        VectorIndex.build(x * 3, ids_for(100), model_version=MODEL)
    with pytest.raises(BadIndexInput, match="model_version"):
        VectorIndex.build(x, ids_for(100), model_version="")


# ---- concurrency, GPU ----------------------------------------------------------------------------

def test_searches_run_safely_alongside_updates(index, data):
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher():
        try:
            while not stop.is_set():
                res = index.search(data[:8], 10)
                assert all(len(row) == 10 for row in res.listing_ids)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    extra = clustered(200, seed=21)
    for i in range(0, 200, 20):
        index.add(extra[i:i + 20], ids_for(200, "extra")[i:i + 20])
        index.remove(ids_for(200, "extra")[i:i + 10])
    stop.set()
    for t in threads:
        t.join()
    assert not errors and len(index) == N + 100


@pytest.mark.skipif(gpu_count() == 0, reason="needs faiss-gpu and a CUDA device")
def test_gpu_search_matches_cpu(data):
    gpu = VectorIndex.build(data, ids_for(N), model_version=MODEL, use_gpu=True)
    cpu = VectorIndex.build(data, ids_for(N), model_version=MODEL, use_gpu=False)
    assert gpu.info["built_on"].startswith("gpu")
    queries = clustered(50, seed=5)
    a, b = gpu.search(queries, 10, nprobe=8), cpu.search(queries, 10, nprobe=8)
    overlap = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a.listing_ids, b.listing_ids)])
    assert overlap >= 0.98
    assert gpu.search(queries, 10, label_filter=None, allowed_ids=ids_for(N)[:500]).ids.shape == (50, 10)


# ---- listings with several photos ----------------------------------------------------------------

L, PHOTOS = 1000, ("0", "back", "side")


def multi_photo(seed: int = 3) -> tuple[np.ndarray, list[str], list[str], dict[str, list]]:
    """L listings of three photos each: the photos of a listing lie close together, as views of one product do."""
    rng = np.random.default_rng(seed)
    centres = clustered(L, seed=seed)
    x = np.repeat(centres, len(PHOTOS), axis=0) + 0.15 * rng.standard_normal((L * len(PHOTOS), D))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    lids = [f"l{i:04d}" for i in range(L) for _ in PHOTOS]
    pids = [p for _ in range(L) for p in PHOTOS]
    labels = {"category": ["rare" if int(lid[1:]) % 50 == 0 else "common" for lid in lids]}
    return x, lids, pids, labels


@pytest.fixture(scope="module")
def listings_index():
    x, lids, pids, labels = multi_photo()
    return VectorIndex.build(x, lids, labels, photo_ids=pids, model_version=MODEL, seed=0), x, lids, pids


def test_photo_keys_keep_a_single_photo_listing_key():
    from lookalike.predictor.index import photo_key

    assert photo_key("fmnist-train-00042", "0") == listing_key("fmnist-train-00042")  # old indexes stay valid
    keys = {photo_key(f"l{i}", p) for i in range(2000) for p in PHOTOS}
    assert len(keys) == 6000 and all(0 <= k < 2**63 for k in keys)
    assert photo_key("l1", "back") == photo_key("l1", "back") != photo_key("l1", "side")


def test_search_returns_distinct_listings_ranked_by_their_best_photo(listings_index):
    index, x, lids, pids = listings_index
    assert index.count == 3 * L and index.listing_count == L and index.info["listing_count"] == L
    assert index.info["recall_at_10"] >= 0.95  # measured on listings, as search answers them
    queries = x[1::3][:40]  # each listing's "back" photo
    res = index.search(queries, 10)
    for i, (row, photos) in enumerate(zip(res.listing_ids, res.photo_ids)):
        assert len(row) == 10 == len(set(row))  # top_k counts listings, never one twice
        assert row[0] == lids[3 * i + 1] and photos[0] == "back"  # the very photo that matched is named
        assert all(p in PHOTOS for p in photos)
    assert np.allclose(res.scores[:, 0], 1.0, atol=1e-5) and (np.diff(res.scores, axis=1) <= 1e-6).all()
    # a listing's score is its best photo's: exact search over all photos, grouped, agrees at the top
    exact = np.argsort(-(queries @ x.T), axis=1)
    for i, order in enumerate(exact[:10]):
        best = list(dict.fromkeys(lids[j] for j in order))[:5]
        assert res.listing_ids[i][:5] == best


def test_filters_and_nprobe_still_fill_top_k_with_listings(listings_index):
    index, x, lids, _ = listings_index
    queries = clustered(8, seed=41)
    rare = index.search(queries, 15, nprobe=1, label_filter={"category": "rare"})  # 20 rare listings exist
    assert all(len(row) == 15 == len(set(row)) for row in rare.listing_ids)
    assert all(int(lid[1:]) % 50 == 0 for row in rare.listing_ids for lid in row)
    allowed = ["l0003", "l0004", "l0005", "delisted"]
    few = index.search(queries[:2], 10, allowed_ids=allowed)
    assert [sorted(row) for row in few.listing_ids] == [allowed[:3]] * 2  # fewer pass: all of them, once each
    assert (few.ids[:, 3:] == -1).all() and np.isnan(few.scores[:, 3:]).all()
    with pytest.raises(BadIndexInput, match="holds 1000 listings"):
        index.search(queries[:1], L + 1)


def test_updates_add_remove_and_replace_photos_and_whole_listings():
    x, lids, pids, labels = multi_photo()
    index = VectorIndex.build(x, lids, labels, photo_ids=pids, model_version=MODEL, seed=0)
    assert index.remove(["l0001", "l0002"]) == 6  # every photo of each listing
    assert "l0001" not in index and index.listing_count == L - 2 and index.count == 3 * L - 6
    # replacing a listing replaces all its photos: three become two
    fresh = clustered(2, seed=77)
    assert index.replace(fresh, ["l0010", "l0010"], photo_ids=["front", "detail"]) == 2
    assert index.photos_of("l0010") == ["front", "detail"] and index.labels_of("l0010")["category"] == "common"
    got = index.search(fresh, 1)
    assert got.listing_ids == [["l0010"], ["l0010"]] and got.photo_ids == [["front"], ["detail"]]
    # a new photo of a listing that is there; a single photo removed
    assert index.add(fresh[:1], ["l0020"], photo_ids=["extra"]) == 1
    assert index.photos_of("l0020") == ["0", "back", "side", "extra"]
    assert index.remove(["l0020"], photo_ids=["back"]) == 1 and index.photos_of("l0020") == ["0", "side", "extra"]
    # a new listing of two photos
    assert index.add(fresh, ["new-1", "new-1"], {"category": ["rare", "rare"]}, photo_ids=["a", "b"]) == 2
    assert index.search(fresh[:1], 1, label_filter={"category": "rare"}).listing_ids == [["new-1"]]
    assert index.listing_count == L - 2 + 1


def test_bad_photo_input_is_one_clear_error_and_changes_nothing(listings_index):
    x, lids, pids, labels = multi_photo()
    index = VectorIndex.build(x, lids, labels, photo_ids=pids, model_version=MODEL, seed=0)
    before = snapshot(index, x[:5])
    cases = {
        "photo twice in a batch": (lambda: index.add(x[:2], ["n", "n"], photo_ids=["a", "a"]), "listed twice"),
        "photo already there": (lambda: index.add(x[:1], ["l0005"], photo_ids=["back"]), "already in the index"),
        "listing id twice without photo ids": (lambda: index.add(x[:2], ["n", "n"]), "photo_ids"),
        "unknown photo": (lambda: index.remove(["l0005"], photo_ids=["nope"]), "not in the index"),
        "unknown listing": (lambda: index.replace(x[:1], ["never"], photo_ids=["0"]), "not in the index"),
        "photo ids and vectors differ": (lambda: index.add(x[:2], ["n", "n"], photo_ids=["a"]), "one per vector"),
    }
    for name, (call, message) in cases.items():
        with pytest.raises(BadIndexInput, match=message):
            call()
        after = snapshot(index, x[:5])
        assert after[0] == before[0] and after[1] == before[1], name


def test_an_index_from_before_photo_ids_loads_and_updates(tmp_path):
    """An index folder without photo_ids.json (built when every listing had one photo) loads as it was."""
    data = clustered(200, seed=5)
    old = VectorIndex.build(data, ids_for(200), model_version=MODEL)
    folder = old.save(tmp_path / "old")
    (folder / "photo_ids.json").unlink()
    card = IndexCard.read(folder)
    card.listing_count = None
    card.write(folder, [name for name in card.files if name != "photo_ids.json"])
    loaded = VectorIndex.load(folder, model_version=MODEL)
    assert loaded.listing_count == 200 and loaded.photos_of(ids_for(1)[0]) == ["0"]
    assert loaded.search(data[:3], 3).listing_ids == old.search(data[:3], 3).listing_ids
    assert loaded.remove(ids_for(2)) == 2 and loaded.count == 198


# ---- memory: the compact index chosen by a budget, bytes per vector on the card, mapped lists ----

def test_a_memory_budget_chooses_the_compact_index_and_the_card_says_what_it_costs(tmp_path):
    from lookalike.predictor.index.factory import (DEFAULT_FACTORY, choose_factory, compact_bytes_per_vector,
                                                   flat_bytes_per_vector, parse_bytes)

    assert parse_bytes("8GiB") == 8 * 2**30 and parse_bytes("512 MiB") == 512 * 2**20 and parse_bytes("") is None
    with pytest.raises(BadIndexInput, match="not a size"):
        parse_bytes("lots")
    assert choose_factory(1_000_000, 256, None) == DEFAULT_FACTORY
    assert choose_factory(10_000_000, 256, parse_bytes("8GiB")) == PQ_FACTORY  # IVF-Flat would need 9.6 GiB
    assert compact_bytes_per_vector(256) / flat_bytes_per_vector(256) < 0.35
    with pytest.raises(BadIndexInput, match="even as the compact IVF-PQ index"):
        choose_factory(10_000_000, 256, parse_bytes("1GiB"))

    x = clustered(12_000, seed=5, d=64)
    ids = ids_for(len(x))
    flat_bytes = len(x) * flat_bytes_per_vector(64)
    compact = VectorIndex.build(x, ids, model_version="m", memory_budget=flat_bytes // 2)
    flat = VectorIndex.build(x, ids, model_version="m", memory_budget=flat_bytes * 2)
    assert compact.info["factory"].endswith("Refine(SQ8)") and flat.info["factory"].endswith(",Flat")
    for idx, name in ((compact, "compact"), (flat, "flat")):
        idx.save(tmp_path / name)
    sizes = {name: VectorIndex.load(tmp_path / name).card.bytes_per_vector for name in ("compact", "flat")}
    assert sizes["compact"] < 0.5 * sizes["flat"] and sizes["flat"] >= 4 * 64
    # Mapped from the file instead of read into memory: the same answers.
    mapped = VectorIndex.load(tmp_path / "flat", mmap=True)
    got, want = mapped.search(x[:20], top_k=10), flat.search(x[:20], top_k=10)
    assert got.listing_ids == want.listing_ids
