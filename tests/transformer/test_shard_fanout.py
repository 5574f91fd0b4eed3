"""The transformer's fan-out to index shards, against stand-in shards: the merge, a late shard named in a
partial answer, mixed index versions refused, a bad request passed on as the client's error, and
"predicted" filters made concrete per photo before they reach the shards."""
from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from kserve.protocol.infer_type import InferRequest, InferResponse
from lookalike.serving.errors import Timeout, Unavailable, V2Error
from lookalike.serving.protocol import output
from lookalike.transformer.shards import ShardFanout, concrete_filters


def _reply(ids, scores, version="v1", model="m1"):
    k = max(len(r) for r in ids)
    table = np.array([[s.encode() for s in r + [""] * (k - len(r))] for r in ids], dtype=object)
    score = np.array([list(r) + [np.nan] * (k - len(r)) for r in scores], np.float32)
    return InferResponse(response_id="r", model_name="lookalike", parameters={
        "index_version": version, "model_version": model, "search_us": 5},
        infer_outputs=[output("listing_ids", table, "BYTES", True), output("photo_ids", table, "BYTES", True),
                       output("scores", score, "FP32", True)]).to_grpc()


class Shard:
    def __init__(self, reply=None, error=None):
        self.reply, self.error, self.seen = reply, error, []

    async def ModelInfer(self, message, timeout=None, metadata=None):  # noqa: N802 - the gRPC stub's name
        self.seen.append(InferRequest.from_grpc(message))
        if self.error is not None:
            raise grpc.aio.AioRpcError(self.error, grpc.aio.Metadata(), grpc.aio.Metadata(), details="no")
        return self.reply


def _fanout(*shards):
    fanout = ShardFanout([f"shard{i}:1" for i in range(len(shards))], timeout_s=1.0, model_name="lookalike")
    fanout._stubs = list(shards)
    return fanout


def _embedded(n=2):
    outs = [output("embeddings", np.ones((n, 4), np.float32), "FP32", True),
            output("label_category", np.array([b"shoe", b"bag"][:n], dtype=object), "BYTES", True)]
    return InferResponse.from_grpc(InferResponse(response_id="e", model_name="lookalike", infer_outputs=outs,
                                                 parameters={"model_version": "m1"}).to_grpc())


def _run(fanout, params=None, n=2):
    request = InferRequest(model_name="lookalike", infer_inputs=[], request_id="q",
                           parameters={"top_k": 3, **(params or {})})
    answer = asyncio.run(fanout.search(_embedded(n), request))
    out = {o.name: o for o in answer.outputs}
    ids = [[v.decode() for v in row if v] for row in out["listing_ids"].as_numpy()]
    params = {k: v for k, v in answer.parameters.items()}
    return ids, out, params


def test_answers_merge_by_score_and_labels_pass_through():
    a = Shard(_reply([["a1", "a2"], ["a3"]], [[0.9, 0.5], [0.4]]))
    b = Shard(_reply([["b1", "b2"], ["b3", "b4"]], [[0.8, 0.7], [0.6, 0.1]]))
    ids, out, params = _run(_fanout(a, b))
    assert ids == [["a1", "b1", "b2"], ["b3", "a3", "b4"]]
    np.testing.assert_allclose(out["scores"].as_numpy(), [[0.9, 0.8, 0.7], [0.6, 0.4, 0.1]], rtol=1e-6)
    assert [v.decode() for v in out["label_category"].as_numpy()] == ["shoe", "bag"]
    assert "embeddings" not in out and params["partial"].bool_param is False


def test_a_late_shard_is_named_and_the_rest_answers():
    a = Shard(_reply([["a1"], ["a2"]], [[0.9], [0.2]]))
    ids, _, params = _run(_fanout(a, Shard(error=grpc.StatusCode.DEADLINE_EXCEEDED)))
    assert ids == [["a1"], ["a2"]]
    assert params["partial"].bool_param is True and params["shards_missing"].string_param == "1"
    with pytest.raises(Timeout):
        _run(_fanout(Shard(error=grpc.StatusCode.UNAVAILABLE), Shard(error=grpc.StatusCode.DEADLINE_EXCEEDED)))


def test_mixed_versions_are_refused_and_bad_requests_passed_on():
    a = Shard(_reply([["a1"], ["a2"]], [[0.9], [0.2]], version="v1"))
    b = Shard(_reply([["b1"], ["b2"]], [[0.8], [0.1]], version="v2"))
    with pytest.raises(Unavailable, match="different versions"):
        _run(_fanout(a, b))
    other_model = Shard(_reply([["b1"], ["b2"]], [[0.8], [0.1]], model="m0"))
    with pytest.raises(Unavailable):
        _run(_fanout(Shard(_reply([["a1"], ["a2"]], [[0.9], [0.2]])), other_model))
    with pytest.raises(V2Error) as bad:
        _run(_fanout(a, Shard(error=grpc.StatusCode.INVALID_ARGUMENT)))
    assert bad.value.status == 400


def test_predicted_filters_are_made_concrete_per_photo():
    labels = {"category": ["shoe", "bag"]}
    both = concrete_filters({"filter": "category=predicted,color=red"}, labels, 1)
    assert both == {"filter": "category=bag,color=red"}
    assert concrete_filters({"filter": "predicted:category"}, labels, 0) == {"filter": "category=shoe"}
    assert concrete_filters({"filter_category": "predicted"}, labels, 1) == {"filter_category": "bag"}
    a = Shard(_reply([["a1"]], [[0.9]]))
    b = Shard(_reply([["b1"]], [[0.8]]))
    ids, _, _ = _run(_fanout(a, b), {"filter": "category=predicted"})
    assert ids == [["a1", "b1"], ["a1", "b1"]]
    sent = sorted(str(r.parameters["filter"].string_param) for r in a.seen)
    assert sent == ["category=bag", "category=shoe"]  # one fan-out per photo, each with its own label


class VersionedShard:
    """A shard holding several versions (oldest first), answering the one asked for, else its newest."""

    def __init__(self, held: dict[str, list[str]]):
        self.held, self.asked = held, []

    async def ModelInfer(self, message, timeout=None, metadata=None):  # noqa: N802 - the gRPC stub's name
        params = InferRequest.from_grpc(message).parameters or {}
        wanted = params["shard_version"].string_param if "shard_version" in params else None
        self.asked.append(wanted)
        version = wanted if wanted in self.held else list(self.held)[-1]
        reply = InferResponse.from_grpc(_reply([self.held[version]] * 2, [[0.5]] * 2,
                                               version=version.split("/")[1]))
        reply.parameters = {**reply.parameters, "shard_version": version, "shard_versions": ",".join(self.held)}
        return reply.to_grpc()


def test_the_pin_moves_only_once_every_shard_holds_the_new_version():
    a = VersionedShard({"m1/v1": ["a-old"]})
    b = VersionedShard({"m1/v1": ["b-old"]})
    fanout = _fanout(a, b)
    assert _run(fanout)[2]["index_version"].string_param == "v1" and fanout.pinned == "m1/v1"
    a.held["m1/v2"] = ["a-new"]  # shard 0 loaded v2, shard 1 not yet: still v1, never a mix
    ids, _, params = _run(fanout)
    assert ids[0] == ["a-old", "b-old"] and params["index_version"].string_param == "v1"
    b.held["m1/v2"] = ["b-new"]  # both hold v2: this answer is v1 still, the next ones v2
    _run(fanout)
    assert fanout.pinned == "m1/v2"
    assert _run(fanout)[0][0] == ["a-new", "b-new"]
    # shard 1 restarts holding only v3 (the alias moved on): asked again at the newest version both hold
    a.held["m1/v3"], b.held = ["a-v3"], {"m1/v3": ["b-v3"]}
    ids, _, params = _run(fanout)
    assert ids[0] == ["a-v3", "b-v3"] and params["index_version"].string_param == "v3"
    # no version in common (shard 0 dropped v3): refused as a swap under way, never merged
    a.held = {"m1/v2": ["a-new"]}
    with pytest.raises(Unavailable, match="swap is under way"):
        _run(fanout)


def test_an_automatic_crop_is_fanned_out_fused_and_the_whole_photos_vectors_answered_when_asked():
    from lookalike.core.boxes import fuse_embeddings

    a = Shard(_reply([["a1"], ["a2"]], [[0.9], [0.2]]))
    fanout = _fanout(a)
    whole = np.array([[1, 0, 0, 0], [0, 1, 0, 0]], np.float32)
    request = InferRequest(model_name="lookalike", infer_inputs=[], request_id="q",
                           parameters={"top_k": 3, "with_embeddings": True})
    answer = asyncio.run(fanout.search(_embedded(2), request, fuse=whole))
    sent = a.seen[-1].inputs[0].as_numpy()
    assert np.allclose(sent, fuse_embeddings(whole, np.ones((2, 4), np.float32)))
    out = {o.name: o for o in answer.outputs}
    assert np.allclose(out["embeddings"].as_numpy(), np.ones((2, 4)))  # the embedder's own vectors, unfused
    plain = asyncio.run(fanout.search(_embedded(2), InferRequest(model_name="lookalike", infer_inputs=[],
                                                                 request_id="q", parameters={"top_k": 3})))
    assert "embeddings" not in {o.name for o in plain.outputs}
