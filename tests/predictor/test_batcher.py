"""The micro-batcher survives its callers (the production path on a GPU; run here on CPU with a stand-in
embedder): cancelled requests are skipped and never kill the worker, searches do not queue behind one
thread, the queue is bounded, and a stuck embedding makes it unhealthy, then not alive."""
from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError, wait

import numpy as np
import pytest

from lookalike.predictor.service import MicroBatcher
from lookalike.serving.errors import Overloaded


class _Embedder:
    """Embeds an image as its mean, after `delay_s`; `gate` (an Event), when set, holds the embedding."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.gate: threading.Event | None = None
        self.batches: list[int] = []

    def embed_and_locate(self, images: np.ndarray):
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay_s)
        self.batches.append(len(images))
        return images.reshape(len(images), -1).mean(axis=1, keepdims=True), {}, None


class _Pair:
    def __init__(self, embedder):
        self.embedder = embedder


def _images(n: int, value: float = 1.0) -> np.ndarray:
    return np.full((n, 3, 2, 2), value, np.float32)


def _echo(emb, probs, seconds, located):
    return float(emb[0, 0])


def test_cancelled_requests_are_skipped_and_the_worker_keeps_answering():
    embedder = _Embedder(delay_s=0.01)
    batcher = MicroBatcher(max_batch=2, max_queue=256, search_threads=2)
    pair = _Pair(embedder)
    try:
        embedder.gate = threading.Event()  # hold the first batch so the others queue behind it
        futures = [batcher.submit(pair, _images(1, i), _echo) for i in range(64)]
        cancelled = sum(f.cancel() for f in futures)  # callers that gave up (a client deadline)
        embedder.gate.set()
        embedder.gate = None
        assert cancelled >= 60
        done, _ = wait(futures, timeout=10)
        assert len(done) == 64
        assert batcher.skipped >= 60 and sum(embedder.batches) <= 64 - 60 + 2  # their images never embedded
        started = time.monotonic()
        assert batcher.submit(pair, _images(1, 7.0), _echo).result(timeout=2) == 7.0
        assert time.monotonic() - started < 1.0 and batcher.healthy()
    finally:
        batcher.close()


def test_a_failing_request_or_batch_never_ends_the_worker():
    batcher = MicroBatcher(max_batch=4, search_threads=1)
    try:
        def boom(emb, probs, seconds, located):
            raise RuntimeError("search failed")

        with pytest.raises(RuntimeError, match="search failed"):
            batcher.submit(_Pair(_Embedder()), _images(1), boom).result(timeout=5)

        class Broken:
            def embed_and_locate(self, images):
                raise ValueError("the GPU fell over")

        with pytest.raises(ValueError, match="fell over"):
            batcher.submit(_Pair(Broken()), _images(1), _echo).result(timeout=5)
        assert batcher.submit(_Pair(_Embedder()), _images(1, 3.0), _echo).result(timeout=5) == 3.0
        assert batcher.healthy() and batcher.alive()
    finally:
        batcher.close()


def test_a_slow_search_does_not_hold_the_next_requests():
    batcher = MicroBatcher(max_batch=1, search_threads=2)
    pair = _Pair(_Embedder())
    release = threading.Event()
    try:
        def slow(emb, probs, seconds, located):
            release.wait(10)
            return "slow"

        slow_future = batcher.submit(pair, _images(1), slow)
        time.sleep(0.05)
        assert batcher.submit(pair, _images(1, 5.0), _echo).result(timeout=2) == 5.0  # not behind the slow one
        assert not slow_future.done()
        release.set()
        assert slow_future.result(timeout=5) == "slow"
    finally:
        release.set()
        batcher.close()


def test_the_queue_is_bounded_and_refuses_with_retry_after():
    embedder = _Embedder()
    embedder.gate = threading.Event()
    batcher = MicroBatcher(max_batch=4, max_queue=8, search_threads=1)
    pair = _Pair(embedder)
    try:
        held = [batcher.submit(pair, _images(4), _echo) for _ in range(2)]  # 8 images queued (one batch held)
        time.sleep(0.05)
        queued = [batcher.submit(pair, _images(4), _echo)]  # the first batch left the queue: room for 4
        with pytest.raises(Overloaded) as full:
            batcher.submit(pair, _images(4), _echo)
        assert full.value.status == 503 and full.value.retry_after_s >= 1
        embedder.gate.set()
        assert all(f.result(timeout=5) == 1.0 for f in held + queued)
        assert batcher.submit(pair, _images(4), _echo).result(timeout=5) == 1.0  # room again
    finally:
        embedder.gate.set()
        batcher.close()


def test_a_stuck_embedding_is_unhealthy_then_not_alive():
    embedder = _Embedder()
    embedder.gate = threading.Event()
    batcher = MicroBatcher(max_batch=1, stall_s=0.2, dead_s=0.5)
    pair = _Pair(embedder)
    try:
        future = batcher.submit(pair, _images(1), _echo)
        time.sleep(0.3)
        assert not batcher.healthy() and batcher.alive()  # readiness fails first: no new traffic
        time.sleep(0.3)
        assert not batcher.alive()  # then liveness: the pod is restarted
        embedder.gate.set()
        assert future.result(timeout=5) == 1.0
        assert batcher.healthy() and batcher.alive()  # it recovered on its own
    finally:
        embedder.gate.set()
        batcher.close()


def test_a_cancelled_future_raises_cancelled_for_its_caller_only():
    batcher = MicroBatcher(max_batch=2)
    pair = _Pair(_Embedder())
    try:
        f1 = batcher.submit(pair, _images(1), _echo)
        f1.cancel()
        f2 = batcher.submit(pair, _images(1, 2.0), _echo)
        assert f2.result(timeout=5) == 2.0
        if f1.cancelled():
            with pytest.raises(CancelledError):
                f1.result()
    finally:
        batcher.close()
