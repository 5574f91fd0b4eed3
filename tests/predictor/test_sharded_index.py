"""A sharded index version answers what the one index answers: same ids, same order, same nprobe; its
shards share one set of centroids, keep a listing's photos together, and publish as one version."""
from __future__ import annotations

import numpy as np
import pytest

from lookalike.core.artifacts import sharded_index_repo
from lookalike.predictor.index import BadIndexInput, CorruptIndex, VectorIndex
from lookalike.predictor.index.shards import ShardedIndex, load_shard, shard_of

D = 32
N = 3000
MODEL = "20261124T010203Z-aaaaaa"


def clustered(n: int, seed: int, clusters: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).standard_normal((clusters, D))
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def catalog():
    """N photos of N/2 listings (two photos each, not adjacent), with a label for filters."""
    x = clustered(N, seed=0)
    listing_ids = [f"listing-{i % (N // 2):05d}" for i in range(N)]
    photo_ids = [str(i // (N // 2)) for i in range(N)]
    labels = {"category": ["rare" if (i % (N // 2)) % 25 == 0 else "common" for i in range(N)]}
    return x, listing_ids, photo_ids, labels


@pytest.fixture(scope="module")
def full(catalog):
    x, ids, photos, labels = catalog
    return VectorIndex.build(x, ids, labels, model_version=MODEL, photo_ids=photos, factory="IVF16,Flat",
                             seed=0, tune_queries=200)


@pytest.fixture(scope="module")
def queries():
    return clustered(60, seed=7)


@pytest.mark.parametrize("k", [2, 4])
def test_sharded_answers_equal_the_unsharded_index(full, queries, k):
    sharded = ShardedIndex.from_index(full, k)
    assert sum(s.count for s in sharded.shards) == full.count
    assert sum(s.listing_count for s in sharded.shards) == full.listing_count
    for nprobe in (1, 3, None):
        want = full.search(queries, top_k=10, nprobe=nprobe)
        got = sharded.search(queries, top_k=10, nprobe=nprobe)
        assert got.listing_ids == want.listing_ids
        assert got.photo_ids == want.photo_ids
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6)
    # Filters apply before the top-k, in every shard: with every list probed the answers are equal; at
    # the tuned nprobe a shard short of a rare label widens its probes on its own (the module doc), so
    # the merge is never worse, rank by rank.
    rare = {"category": "rare"}
    want = full.search(queries, top_k=10, nprobe=16, label_filter=rare)
    got = sharded.search(queries, top_k=10, nprobe=16, label_filter=rare)
    assert got.listing_ids == want.listing_ids and all(len(r) == 10 for r in got.listing_ids)
    want = full.search(queries, top_k=10, label_filter=rare)
    got = sharded.search(queries, top_k=10, label_filter=rare)
    assert all(len(r) == 10 for r in got.listing_ids)
    assert (got.scores >= want.scores - 1e-6).all()
    allowed = [f"listing-{i:05d}" for i in range(0, N // 2, 3)]
    assert sharded.search(queries, 5, allowed_ids=allowed).listing_ids == \
        full.search(queries, 5, allowed_ids=allowed).listing_ids


def test_shards_keep_listings_whole_and_share_centroids(full):
    import faiss

    sharded = ShardedIndex.from_index(full, 4)
    centroids = [faiss.extract_index_ivf(s._index).quantizer.reconstruct_n(0, 16) for s in sharded.shards]
    for c in centroids[1:]:
        np.testing.assert_array_equal(c, centroids[0])
    for s, part in enumerate(sharded.shards):
        listings = set(part._table.listing_ids)
        assert listings and all(shard_of(lid, 4) == s for lid in listings)
        assert all(len(part.photos_of(lid)) == 2 for lid in list(listings)[:20])  # both photos, same shard
        assert part.nprobe == full.nprobe


def test_published_as_one_version_and_loaded_shard_by_shard(full, queries, store):
    sharded = ShardedIndex.from_index(full, 2)
    version = sharded.publish(store, alias="production")
    repo = sharded_index_repo(store, MODEL)
    assert repo.resolve("production") == version
    files = repo.manifest(version)["files"]
    assert "shards.json" in files and "shard-000/index.faiss" in files and "shard-001/index.json" in files
    folder = ShardedIndex.fetch_folder(store, MODEL, "production")
    loaded = ShardedIndex.load(folder, model_version=MODEL, verified=True)
    assert loaded.version == version
    assert loaded.search(queries, 10).listing_ids == full.search(queries, 10).listing_ids
    one = load_shard(folder, 1, model_version=MODEL)
    assert one.card.extra == {"shard": 1, "shards": 2}
    with pytest.raises(BadIndexInput):
        load_shard(folder, 2)
    with pytest.raises(CorruptIndex):
        load_shard(folder, 0, model_version="another-model")


def test_bad_shard_counts_are_refused(full):
    for bad in (0, -1, 1000, "2", True):
        with pytest.raises(BadIndexInput):
            ShardedIndex.from_index(full, bad)
    with pytest.raises(BadIndexInput):
        ShardedIndex.from_index(full, 2).search(np.zeros((1, D), np.float32) + 0.1, top_k=10**6)


def test_updates_touch_only_the_listings_shards_and_keep_the_answer(catalog, queries):
    x, ids, photos, labels = catalog
    half = N // 2
    new_x = clustered(40, seed=11)
    new_ids = [f"new-{i:03d}" for i in range(20)] * 2
    new_photos = ["0"] * 20 + ["1"] * 20
    gone = [f"listing-{i:05d}" for i in range(0, half, 97)]
    full = VectorIndex.build(x, ids, labels, model_version=MODEL, photo_ids=photos, factory="IVF16,Flat",
                             seed=0, tune_queries=200)
    sharded = ShardedIndex.from_index(full, 4)
    new_labels = {"category": ["common"] * 40}
    one_listing = sharded.add(new_x[:1], new_ids[:1], {"category": ["common"]}, photo_ids=new_photos[:1])
    assert one_listing == [shard_of(new_ids[0], 4)]  # one listing: one shard changed
    sharded.add(new_x[1:], new_ids[1:], {"category": new_labels["category"][1:]}, photo_ids=new_photos[1:])
    full.add(new_x, new_ids, new_labels, photo_ids=new_photos)
    assert sorted(sharded.remove(gone)) == sorted({shard_of(g, 4) for g in gone})
    full.remove(gone)
    assert sharded.card["count"] == full.count and sharded.card["listing_count"] == full.listing_count
    assert sharded.search(queries, 10).listing_ids == full.search(queries, 10).listing_ids
    before = [p.count for p in sharded.shards]
    with pytest.raises(BadIndexInput):  # one known listing in the batch: nothing changes anywhere
        sharded.add(new_x[:2], ["brand-new", new_ids[0]])
    with pytest.raises(BadIndexInput):
        sharded.remove(["listing-00001", "no-such-listing"])
    assert [p.count for p in sharded.shards] == before


def test_replace_changes_only_the_listings_shards_and_refuses_unknown_ones_first(full, queries, tmp_path):
    sharded = ShardedIndex.from_index(full, 4)
    one = VectorIndex.load(full.save(tmp_path / "copy"), model_version=MODEL)  # the module's index stays as built
    target = ["listing-00003", "listing-00004"]
    new_x = clustered(3, seed=21)
    photos = ["0", "1", "0"]
    ids = [target[0], target[0], target[1]]
    assert all(lid in sharded for lid in target) and "nope" not in sharded and 7 not in sharded
    before = [p.count for p in sharded.shards]
    with pytest.raises(BadIndexInput):  # one unknown listing in the batch: nothing changes anywhere
        sharded.replace(new_x, [target[0], target[0], "nope"], photo_ids=photos)
    assert [p.count for p in sharded.shards] == before
    changed = sharded.replace(new_x, ids, photo_ids=photos)
    one.replace(new_x, ids, photo_ids=photos)
    assert changed == sorted({shard_of(lid, 4) for lid in target})
    assert sharded.card["count"] == one.count == full.count - 1  # listing-00004 had two photos, now one
    assert sharded.search(queries, 10).listing_ids == one.search(queries, 10).listing_ids
    sharded.record_catalogs(["s3://b/new.jsonl"], shards=changed)
    assert sharded.card["catalogs"][-1] == "s3://b/new.jsonl"
    assert [("s3://b/new.jsonl" in (p.card.catalogs or [])) for p in sharded.shards] == [s in changed for s in range(4)]


def test_lookalike_shard_splits_the_index_its_alias_names_under_that_alias_lease(catalog, store):
    """`lookalike shard --alias A` publishes a split of the index alias A names, under A's lease as the pipelines
    do: a split of an older index (which would bring back a takedown) is refused with nothing moved, and a run
    holding the lease (a pipeline publishing) is waited for, so the split is of the index it published."""
    import threading
    import time

    from lookalike.cli.commands.shard import split_and_publish
    from lookalike.core.artifacts import index_repo
    from lookalike.core.errors import InputError

    model = "20261124T010203Z-cccccc"
    ids = [f"item-{i:04d}" for i in range(1000)]
    index = VectorIndex.build(catalog[0][:1000], ids, model_version=model, factory="IVF16,Flat", seed=0,
                              tune_queries=100)
    first = index.publish(store, alias="production")
    sharded_alias = sharded_index_repo(store, model)
    version, split = split_and_publish(store, model, 2, None, "production")
    assert split.version == first and sharded_alias.resolve("production") == version

    index.remove(["item-0007"])  # a takedown, published as the update pipeline does
    second = index.publish(store, alias="production")
    with pytest.raises(InputError, match=f"names index {second}, not {first}"):
        split_and_publish(store, model, 2, first, "production")
    assert sharded_alias.resolve("production") == version  # nothing moved

    lease = index_repo(store, model).lease("production").acquire()
    released = threading.Event()

    def publish_then_release() -> None:
        time.sleep(1.5)
        released.set()
        lease.release()

    holder = threading.Thread(target=publish_then_release)
    holder.start()
    again, split = split_and_publish(store, model, 2, None, "production")
    holder.join()
    assert released.is_set()  # it waited for the lease
    assert split.version == second and "item-0007" not in split and "item-0008" in split
    assert sharded_alias.resolve("production") == again
    published = ShardedIndex.load(ShardedIndex.fetch_folder(store, model, again), model_version=model, verified=True)
    assert sum(published.card["shard_counts"]) == 999 and published.card["parent_version"] == second
