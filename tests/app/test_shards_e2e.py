"""The sharded stack on loopback: an embedding predictor, two shard predictors and the transformer that
fans out and merges answer what the one-predictor stack answers; a shard that stops answering yields a
flagged partial answer within the deadline, never a silently short list."""
from __future__ import annotations

import os
import signal
import time

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
