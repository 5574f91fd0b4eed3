"""Caps before work: a request is refused before it costs more than its limits allow.

- `AdmissionGate`: at most `limit` requests are worked on at once and at most `queue` more wait; any
  further request is answered 503 with `Retry-After` at once, instead of growing memory and latency.
  The servers size it from the pod's limits (docs/capacity.md has the arithmetic).
- `BodyLimit`, an ASGI middleware in front of both servers' REST routes: an inference request is first
  admitted by the gate (so a flood of uploads is refused before any body is read), then its body is
  counted as it arrives and answered 413 as soon as it passes the cap: a declared `Content-Length` over
  the cap is refused without reading a byte. kserve's REST server otherwise reads whole bodies first, so
  an 800 MB upload sat in memory before any check.
- gRPC: the message cap is kserve's `grpc_max_receive_message_length` (set to the same cap by
  `lookalike.serving.protocol`), and the model's `__call__` goes through the same gate (`admitted`
  tells it whether the REST middleware already did).
"""
from __future__ import annotations

import asyncio
import contextvars
import json
from contextlib import asynccontextmanager
from typing import Any
from collections.abc import AsyncIterator

from lookalike.serving.errors import Overloaded
from lookalike.serving.metrics import RequestTrace

INFER_SUFFIX = "/infer"
# Set for the request a REST middleware already admitted: the model's own gate lets it through.
admitted: contextvars.ContextVar[bool] = contextvars.ContextVar("lookalike_admitted", default=False)


class BodyLimit:
    """ASGI middleware: inference requests pass the gate first, and bodies over `max_bytes` are a 413,
    refused before they are read past the cap."""

    def __init__(self, app: Any, max_bytes: int, gate: AdmissionGate | None = None, unit: str = "server"):
        self.app = app
        self.max_bytes = int(max_bytes)
        self.gate = gate
        self.unit = unit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") not in ("POST", "PUT"):
            await self.app(scope, receive, send)
            return
        if self.gate is None or not scope.get("path", "").rstrip("/").endswith(INFER_SUFFIX):
            await self._limited(scope, receive, send)
            return
        try:
            async with self.gate.admit():
                token = admitted.set(True)
                try:
                    await self._limited(scope, receive, send)
                finally:
                    admitted.reset(token)
        except Overloaded as busy:
            RequestTrace(self.unit, "-").finish(busy)  # counted (503, unavailable) and logged like any answer
            await _answer(send, 503, str(busy), [(b"retry-after", str(busy.retry_after_s).encode())])

    async def _limited(self, scope: dict, receive: Any, send: Any) -> None:
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _refuse(send, declared, self.max_bytes)
            return
        # Read the body here, counting, so nothing past the cap is ever held; then replay it to the app.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                if message["type"] == "http.disconnect":
                    return  # the client gave up: nothing to answer
                continue
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await _refuse(send, size, self.max_bytes)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        whole = b"".join(chunks)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()  # after the body: only a disconnect can come

        await self.app(scope, replay, send)


def _content_length(scope: dict) -> int | None:
    for name, value in scope.get("headers") or ():
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _refuse(send: Any, size: int, limit: int) -> None:
    await _answer(send, 413, f"the request body is larger than this server accepts ({size:,} bytes > {limit:,}); "
                             f"send fewer or smaller photos", [(b"connection", b"close")])


async def _answer(send: Any, status: int, message: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class AdmissionGate:
    """At most `limit` requests in work and `queue` waiting; the rest are refused at once (503)."""

    def __init__(self, limit: int, queue: int, retry_after_s: int = 1):
        self.limit, self.queue, self.retry_after_s = max(1, int(limit)), max(0, int(queue)), retry_after_s
        self._slots = asyncio.Semaphore(self.limit)
        self.waiting = 0
        self.refused = 0

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold a slot for the block (waiting for one while the queue has room), or raise Overloaded.
        A request the REST middleware already admitted passes straight through."""
        if admitted.get():
            yield
            return
        if self._slots.locked() and self.waiting >= self.queue:
            self.refused += 1
            raise Overloaded(f"the server is busy ({self.limit} requests in work, {self.waiting} waiting); "
                             f"retry in {self.retry_after_s} s", retry_after_s=self.retry_after_s)
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._slots.release()
