"""The predictor's caches of repeated photos (predictor/cache.py, lookalike/serving/photo_cache.py), driven
through the predictor's own request handling in process: a repeated photo skips the embedding and the
search, other parameters never share an answer, a model or index swap never serves an old one, the caches
stay inside their bytes, and every lookup is counted for /metrics. Fast: a stub model, no servers."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np
import pytest

from kserve.protocol.infer_type import InferInput, InferRequest, to_http_parameters
from lookalike.predictor.index import VectorIndex
from lookalike.predictor.server import LookalikePredictor, PredictorSettings
from lookalike.predictor.service import SearchService, ServingPair
from lookalike.serving.metrics import CACHE_LOOKUPS
from lookalike.serving.photo_cache import ByteLRU, RecentKeys, content_key

D, SIZE, N = 16, 8, 300
HEADS = {"category": ["a", "b"]}


@dataclass
class StubEmbedder:
    """A model that embeds an image as its first D pixel values (normalised), counting its calls."""

    model_version: str
    size: int = SIZE
    embedding_dim: int = D
    heads: dict = field(default_factory=lambda: HEADS)
    backend: str = "stub"
    calls: int = 0

    def check_input(self, images):
        return images

    def embed_and_locate(self, images):
        self.calls += 1
        x = np.asarray(images, np.float32).reshape(len(images), -1)[:, :D]
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        return x, {"category": np.tile(np.array([[0.3, 0.7]], np.float32), (len(images), 1))}, None


def _images(rng, n):
    return rng.standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    photos = _images(rng, N)
    vectors = photos.reshape(N, -1)[:, :D] / np.linalg.norm(photos.reshape(N, -1)[:, :D], axis=1, keepdims=True)
    ids = [f"listing-{i:03d}" for i in range(N)]
    labels = {"category": ["a" if i % 2 else "b" for i in range(N)]}

    def index(model, version, skip=0):
        idx = VectorIndex.build(vectors[skip:], ids[skip:], labels={"category": labels["category"][skip:]},
                                model_version=model, factory="Flat")
        idx._card.index_version = version
        return idx

    return {"photos": photos, "ids": ids, "index": index}


def _predictor(pair: ServingPair) -> LookalikePredictor:
    model = LookalikePredictor("lookalike", PredictorSettings(batching="off", cache_bytes=1 << 20))
    model.service = SearchService(pair, batching=False)
    model.ready = True
    return model


def _pair(world, model="m1", version="i1", skip=0):
    return ServingPair.assemble(StubEmbedder(model), world["index"](model, version, skip))


def _ask(model, images=None, keys=None, probe=False, **params):
    if probe:
        tensor = InferInput("photo_key", [len(keys)], "BYTES")
        tensor.set_data_from_numpy(np.array([k.encode() for k in keys], dtype=object), binary_data=True)
    else:
        tensor = InferInput("images", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images, binary_data=True)
        if keys:
            params.setdefault("preprocessed_for", model.service.pair.model_version)
            params["photo_keys"] = ",".join(keys)
    response = asyncio.run(model.predict(InferRequest("lookalike", [tensor], request_id="r", parameters=params)))
    outputs = {o.name: o.as_numpy() for o in response.outputs}
    got = to_http_parameters(response.parameters)
    ids = [v.decode() if isinstance(v, bytes) else v for v in outputs["listing_ids"][0]] if outputs else None
    return ids, got


def _lookups():
    return {(c, r): CACHE_LOOKUPS.labels("predictor", c, r)._value.get()
            for c in ("answer", "embedding") for r in ("hit", "miss")}


def _delta(before):
    return {k: v - before[k] for k, v in _lookups().items() if v != before[k]}


def test_a_repeated_photo_is_answered_without_embedding_and_other_parameters_never_share_an_answer(world):
    pair = _pair(world)
    model = _predictor(pair)
    photo, key = world["photos"][5:6], content_key(b"photo five")
    first, _ = _ask(model, photo, [key], top_k=3)
    assert first[0] == "listing-005" and pair.embedder.calls == 1
    before = _lookups()
    again, _ = _ask(model, keys=[key], probe=True, top_k=3)
    assert again == first and pair.embedder.calls == 1
    assert _delta(before) == {("answer", "hit"): 1}
    # another top_k or filter: its own answer, searched again with the embedding kept
    before = _lookups()
    five, _ = _ask(model, keys=[key], probe=True, top_k=5)
    only_b, _ = _ask(model, keys=[key], probe=True, top_k=3, filter="category=b")
    assert len(five) == 5 and five[:3] == first
    assert only_b != first and not any(int(lid[-3:]) % 2 for lid in only_b)
    assert pair.embedder.calls == 1
    assert _delta(before) == {("answer", "miss"): 2, ("embedding", "hit"): 2}
    # a photo never sent: a miss said in a parameter, not an error
    missing, params = _ask(model, keys=[content_key(b"never sent")], probe=True, top_k=3)
    assert missing is None and params["cache_miss"] is True


def test_a_swap_never_answers_from_the_previous_pair(world):
    model = _predictor(_pair(world))
    photo, key = world["photos"][0:1], content_key(b"photo zero")
    first, params = _ask(model, photo, [key], top_k=3)
    assert first[0] == "listing-000" and params["index_version"] == "i1"
    # a new index without listing 0, same model: the embedding is reused, the answer is not
    model.service.swap(_pair(world, "m1", "i2", skip=1))
    after, params = _ask(model, keys=[key], probe=True, top_k=3)
    assert params["index_version"] == "i2" and "listing-000" not in after and after[:2] == first[1:3]
    # a new model: even the embedding is another's, so the transformer must send the pixels
    model.service.swap(_pair(world, "m2", "i3"))
    missing, params = _ask(model, keys=[key], probe=True, top_k=3)
    assert missing is None and params["cache_miss"] is True and params["model_version"] == "m2"
    # pixels preprocessed for another model are not remembered under their key
    _ask(model, photo, [key], top_k=3, preprocessed_for="m1")
    assert _ask(model, keys=[key], probe=True, top_k=3)[0] is None


def test_the_caches_stay_inside_their_bytes_least_recently_used_out_first():
    lru = ByteLRU(10_000)
    for i in range(100):
        lru.put(i, np.zeros(100, np.float32), 400)
        if i % 10 == 0:
            assert lru.get(0) is not None  # kept warm
    assert lru.bytes <= 10_000 and len(lru) == 10_000 // 600
    assert lru.get(0) is not None and lru.get(1) is None and lru.get(99) is not None
    lru.put("huge", b"", 20_000)  # larger than the whole budget: not kept, nothing else lost
    assert "huge" not in lru and len(lru) == 10_000 // 600
    recent = RecentKeys(2_000)
    recent.add([content_key(bytes([i])) for i in range(100)])
    assert len(recent) < 100 and recent.all_known([content_key(bytes([99]))])
    assert not recent.all_known([content_key(bytes([0]))]) and not recent.all_known([])


def test_content_keys_tell_photos_and_boxes_apart():
    a, b = b"\xff\xd8\xff" + b"a" * 1000, b"\xff\xd8\xff" + b"b" * 1000
    assert content_key(a) == content_key(a) != content_key(b)
    assert content_key(a, (0.0, 0.0, 0.5, 0.5)) != content_key(a) != content_key(a, (0.0, 0.0, 0.5, 0.6))
    assert len(content_key(a)) == 32
