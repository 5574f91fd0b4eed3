"""Shared fixtures: one real S3 server (rclone) per test session, a fresh bucket per test."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from lookalike.core.s3 import ObjectStore
from lookalike.core.store_server import EmbeddedS3Server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = EmbeddedS3Server(tmp_path_factory.mktemp("s3") / "data")
    server.start()
    yield server
    server.stop()


@contextmanager
def fresh_bucket(s3_server, prefix: str, **env: str) -> Iterator[ObjectStore]:
    """A new bucket on the session's S3 server, with the LOOKALIKE_S3_* environment (and `env`) pointing at it
    until the block ends: for module-scoped fixtures, which cannot use the function-scoped monkeypatch."""
    store = ObjectStore(s3_server.settings.with_bucket(f"{prefix}-{uuid.uuid4().hex[:10]}"))
    store.check(create_bucket=True)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {**store.settings.to_env(), **env}.items():
            patch.setenv(key, value)
        yield store


@pytest.fixture
def store(s3_server, monkeypatch, tmp_path) -> ObjectStore:
    """An empty bucket on the session's S3 server; the LOOKALIKE_S3_* environment points at it."""
    settings = s3_server.settings.with_bucket(f"t-{uuid.uuid4().hex[:12]}")
    store = ObjectStore(settings)
    store.check(create_bucket=True)
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LOOKALIKE_CACHE", str(tmp_path / "cache"))
    return store


def free_port_block(offsets: tuple[int, ...] = (0, 1, 2, 5, 6)) -> int:
    """A base port whose `base + offset` ports are all free, below the kernel's ephemeral range (32768 on):
    a port taken from that range can be the local port of some client connection a moment later, which
    no server can bind (the `lookalike serve` port check rightly refuses it)."""
    import random
    import socket

    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000)
        ok = True
        for offset in offsets:
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(("127.0.0.1", base + offset))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no block of free ports below 32000")
