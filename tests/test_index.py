"""The FAISS vector index: build and tune, filtered search, incremental updates, drift, persistence through
a real S3 server, and bad input that must leave the index unchanged. Small data: a few thousand
clustered 32-d vectors, so the whole file runs in well under a minute."""
from __future__ import annotations

import json
import logging
import threading

import faiss
import numpy as np
import pytest

from predictor import index_tuning as tuning
from predictor.index import (PQ_FACTORY, BadIndexInput, CorruptIndex, IndexMismatch, VectorIndex, gpu_count,
                             listing_key)
from storage.artifacts import index_repo

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


def test_nlist_rule_and_training_floor():
    assert tuning.choose_nlist(1_000_000) == 4096
    assert tuning.choose_nlist(100_000) == 1024
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
    with caplog.at_level(logging.WARNING, logger="predictor.index"):
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


def test_ivf_pq_with_re_ranking(data, tmp_path):
    idx = VectorIndex.build(data, ids_for(N), model_version=MODEL, factory=PQ_FACTORY, target_recall=0.9)
    info = idx.info
    assert info["factory"] == "IVF64,PQ8x4fsr,Refine(SQ8)" and info["refine"]["codec"] == "SQ8"
    assert info["recall_at_10"] >= 0.9
    codes = idx._refine_codes[:50]  # the numpy decoder is FAISS's 8-bit rule
    np.testing.assert_allclose(idx._decode(codes), idx._refine_codec.sa_decode(codes), atol=1e-6)
    res = idx.search(data[:20], 1)
    assert [r[0] for r in res.listing_ids] == ids_for(20)  # re-ranking puts each vector first
    loaded = VectorIndex.load(idx.save(tmp_path / "pq"), model_version=MODEL)
    again = loaded.search(data[:20], 10)
    assert again.listing_ids == idx.search(data[:20], 10).listing_ids


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
