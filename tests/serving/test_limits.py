"""Caps before work, on a bare ASGI app (no kserve): the gate admits at most `limit` requests plus
`queue` waiting and answers the rest 503 with Retry-After; a body over the cap is a 413 before it is
read past the cap, with or without a Content-Length."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from lookalike.serving.limits import AdmissionGate, BodyLimit


def _app(seen: list, hold: asyncio.Event | None = None):
    async def app(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.append(len(body))
        if hold is not None:
            await hold.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})
    return app


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_cap_is_413_and_never_reaches_the_app(chunked):
    seen: list = []
    app = BodyLimit(_app(seen), max_bytes=1000)

    async def run():
        async with _client(app) as client:
            ok = await client.post("/v2/models/m/infer", content=b"x" * 1000)
            if chunked:
                async def stream():
                    for _ in range(100):
                        yield b"y" * 500
                big = await client.post("/v2/models/m/infer", content=stream())
            else:
                big = await client.post("/v2/models/m/infer", content=b"y" * 5000)
            return ok, big

    ok, big = asyncio.run(run())
    assert ok.status_code == 200 and seen == [1000]
    assert big.status_code == 413 and "larger than this server accepts" in big.json()["error"]


def test_the_gate_refuses_past_its_queue_with_retry_after():
    seen: list = []

    async def run():
        hold = asyncio.Event()
        gate = AdmissionGate(limit=1, queue=1, retry_after_s=2)
        app = BodyLimit(_app(seen, hold), max_bytes=1000, gate=gate)
        async with _client(app) as client:
            first = asyncio.create_task(client.post("/v2/models/m/infer", content=b"a"))
            await asyncio.sleep(0.05)
            second = asyncio.create_task(client.post("/v2/models/m/infer", content=b"b"))  # waits its turn
            await asyncio.sleep(0.05)
            third = await client.post("/v2/models/m/infer", content=b"c")  # no room: refused at once
            hold.set()
            health = await client.post("/v2/repository/other", content=b"d")  # not inference: not gated
            return await first, await second, third, health, gate

    first, second, third, health, gate = asyncio.run(run())
    assert first.status_code == 200 and second.status_code == 200
    assert third.status_code == 503 and third.headers["retry-after"] == "2"
    assert "busy" in json.loads(third.text)["error"] and gate.refused == 1
    assert health.status_code == 200
