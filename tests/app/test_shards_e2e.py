"""The sharded stack on loopback: an embedding predictor, two shard predictors and the transformer that
fans out and merges answer what the one-predictor stack answers; a shard that stops answering yields a
flagged partial answer within the deadline, never a silently short list."""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from lookalike.core.artifacts import sharded_index_repo
from tests.app.test_serving import _matches, _rest_infer, _server_env, pair  # noqa: F401 - the fixture

SHARD_TIMEOUT_S = 2.0
TOP_K = 8


@pytest.fixture(scope="module")
def stacks(pair, tmp_path_factory):  # noqa: F811 - pair is the imported fixture
    """The one-predictor stack and a 2-shard stack over the same vectors (the shards split from the very
    index the one predictor serves)."""
    from lookalike.app.serving_stack import ServingStack
    from lookalike.predictor.index import VectorIndex
    from lookalike.predictor.index.shards import ShardedIndex

    full = VectorIndex.fetch(pair["store"], pair["model_version"], pair["index_version"])
    ShardedIndex.from_index(full, 2).publish(pair["store"], alias="production")
    env = _server_env(pair)
    one = ServingStack(env, log_dir=tmp_path_factory.mktemp("one"), index_version=pair["index_version"])
    two = ServingStack(env, log_dir=tmp_path_factory.mktemp("two"), index_version="production", shards=2,
                       predictor_timeout_s=SHARD_TIMEOUT_S)
    try:
        one.start()
        two.start()
        yield one, two
    finally:
        two.stop()
        one.stop()


def _answer(stack, photos, **params):
    response = _rest_infer(stack.endpoints["transformer_rest"], photos, parameters={"top_k": TOP_K, **params})
    assert response.status_code == 200, response.text
    return response.json()["parameters"], [[m["listing_id"] for m in doc["matches"]] for doc in _matches(response)]


@pytest.mark.slow
def test_two_shards_answer_what_one_index_answers(stacks, pair):  # noqa: F811
    one, two = stacks
    photos = [pair["photos"][r.listing_id] for r in pair["catalog"].rows[:6]]
    for params in ({}, {"nprobe": 1}, {"filter": "category=predicted"}):
        _, want = _answer(one, photos, **params)
        got_params, got = _answer(two, photos, **params)
        assert got == want, params
        assert got_params["partial"] is False and got_params["shards_missing"] == ""
    # the listings' metadata comes from the catalogs the sharded version's card names
    titles = [[(m["listing_id"], m["title"]) for m in d["matches"]] for d in _matches(_rest_infer(
        two.endpoints["transformer_rest"], photos[:2], parameters={"top_k": TOP_K}))]
    rows = {r.listing_id: r for r in pair["catalog"].rows}
    assert all(title == rows[lid].title for row in titles for lid, title in row)
    assert got_params["index_version"] == sharded_index_repo(pair["store"], pair["model_version"]).resolve("production")
    bad = _rest_infer(two.endpoints["transformer_rest"], photos[:1], parameters={"filter": "category=no-such"})
    assert bad.status_code == 400 and "no category" in bad.json()["error"]


@pytest.mark.slow
def test_a_stopped_shard_gives_a_flagged_partial_answer_in_time(stacks, pair):  # noqa: F811
    _, two = stacks
    photos = [pair["photos"][r.listing_id] for r in pair["catalog"].rows[:2]]
    _, whole = _answer(two, photos)
    os.kill(two.shard_procs[1].pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        response = _rest_infer(two.endpoints["transformer_rest"], photos, parameters={"top_k": TOP_K})
        took = time.monotonic() - started
        assert response.status_code == 200, response.text
        assert took < SHARD_TIMEOUT_S + 3
        params = response.json()["parameters"]
        assert params["partial"] is True and params["shards_missing"] == "1"
        docs = _matches(response)
        assert all(d["partial"] is True and d["shards_missing"] == [1] for d in docs)
        for doc, full in zip(docs, whole):  # what came back is shard 0's part, in the whole answer's order
            got = [m["listing_id"] for m in doc["matches"]]
            kept = [x for x in full if x in got]  # shard 0's listings of the whole answer, all still there
            assert got and kept and got[:len(kept)] == kept
    finally:
        os.kill(two.shard_procs[1].pid, signal.SIGCONT)
    params, again = _answer(two, photos)
    assert params["partial"] is False and again == whole


@pytest.mark.slow
def test_a_swap_under_load_moves_every_shard_together(stacks, pair):  # noqa: F811
    """Shards load a new version one after the other while requests flow: every answer comes whole from
    the old version or whole from the new one, none fails, and the rollback moves them all back."""
    import threading

    import httpx

    from lookalike.predictor.index import VectorIndex
    from lookalike.predictor.index.shards import ShardedIndex

    _, two = stacks
    store, model_version = pair["store"], pair["model_version"]
    repo = sharded_index_repo(store, model_version)
    old = repo.resolve("production")
    photos = [pair["photos"][r.listing_id] for r in pair["catalog"].rows[:3]]
    params, before = _answer(two, photos)
    assert params["index_version"] == old
    # The new version: the same index without each photo's best listing (as a takedown would leave it),
    # so an answer that mixed the two versions would differ from both.
    gone = sorted({row[0] for row in before})
    full = VectorIndex.fetch(store, model_version, pair["index_version"])
    full.remove(gone)
    new = ShardedIndex.from_index(full, 2).publish(store, alias="production")

    seen: list[tuple[int, str, list[list[str]]]] = []
    stop = threading.Event()

    def ask() -> None:
        while not stop.is_set():
            r = _rest_infer(two.endpoints["transformer_rest"], photos, parameters={"top_k": TOP_K})
            seen.append((r.status_code, r.json().get("parameters", {}).get("index_version", "") if
                         r.status_code == 200 else r.text, [[m["listing_id"] for m in d["matches"]] for d in
                                                             _matches(r)] if r.status_code == 200 else []))

    def load(shard: int) -> None:
        url = f"{two.endpoints[f'shard{shard}_rest']}/v2/repository/models/lookalike/load"
        assert httpx.post(url, timeout=120).status_code == 200

    def swap_while_asked() -> None:
        seen.clear()
        stop.clear()
        askers = [threading.Thread(target=ask) for _ in range(2)]
        for t in askers:
            t.start()
        try:
            time.sleep(0.5)
            load(0)
            time.sleep(1.0)  # shard 0 holds both versions, shard 1 only the old: still the old answers
            load(1)
            time.sleep(1.5)
        finally:
            stop.set()
            for t in askers:
                t.join()

    swap_while_asked()
    params, after = _answer(two, photos)
    assert params["index_version"] == new and not {x for row in after for x in row} & set(gone)
    assert seen and all(status == 200 for status, _, _ in seen), [s for s in seen if s[0] != 200][:3]
    assert {version for _, version, _ in seen} == {old, new}  # the swap happened under load
    for _, version, ids in seen:
        assert ids == (before if version == old else after), version

    repo.set_alias("production", old)  # a rollback: both versions are still held, the move is immediate
    swap_while_asked()
    params, back = _answer(two, photos)
    assert params["index_version"] == old and back == before
    assert all(status == 200 for status, _, _ in seen)
    for _, version, ids in seen:
        assert ids == (before if version == old else after), version


@pytest.mark.slow
def test_a_new_shard_pod_holds_the_previous_version_too(stacks, pair, monkeypatch):  # noqa: F811
    """A pod started by a rollout (--previous_index_version) holds the version the old pods serve and the
    new one, the new one answering by default; a previous version that is gone does not stop it."""
    from lookalike.predictor.index import VectorIndex
    from lookalike.predictor.index.shards import ShardedIndex
    from lookalike.predictor.parts import ShardPredictor

    for key, value in pair["settings"].to_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LOOKALIKE_CACHE", str(pair["cache"]))
    store, model_version = pair["store"], pair["model_version"]
    repo = sharded_index_repo(store, model_version)
    before = repo.resolve("production")
    full = VectorIndex.fetch(store, model_version, pair["index_version"])
    newer = ShardedIndex.from_index(full, 2).publish(store)  # no alias moved: the stacks keep serving
    pod = ShardPredictor("lookalike", 1, index_ref=newer, previous_index_ref=before)
    assert pod.load() and list(pod.held) == [f"{model_version}/{before}", f"{model_version}/{newer}"]
    assert pod.index is pod.held[f"{model_version}/{newer}"]
    assert pod.held[f"{model_version}/{before}"].mapped and not pod.index.mapped  # one version in memory
    queries = np.stack([pod.index.vector_of(pod.index._table.listing_ids[i])[0] for i in (0, 7)])
    answer = pod.index.search(queries, 5).listing_ids
    # a swap in place (the alias moved, or the reload route): the version served until now is mapped from
    # its files before the next one loads, and answers as it did
    third = ShardedIndex.from_index(full, 2).publish(store)
    pod.index_ref = third
    assert pod.load() and list(pod.held) == [f"{model_version}/{newer}", f"{model_version}/{third}"]
    assert pod.held[f"{model_version}/{newer}"].mapped and not pod.index.mapped
    assert pod.held[f"{model_version}/{newer}"].search(queries, 5).listing_ids == answer
    lone = ShardPredictor("lookalike", 0, index_ref=newer, previous_index_ref="20200101T000000000Z-000000")
    assert lone.load() and list(lone.held) == [f"{model_version}/{newer}"]
