"""Caps before work: a request is refused before it costs more than its limits allow.

- `BodyLimit`, an ASGI middleware: a REST body larger than the server's cap is answered 413 before it is
  read past the cap. A declared `Content-Length` over the cap is refused without reading a byte; a body
  sent without one (chunked) is counted as it arrives and refused as soon as it passes the cap. kserve's
  REST server reads whole bodies otherwise: an 800 MB upload would sit in memory before any check.
  (gRPC has its own cap, `grpc_max_receive_message_length`, set by `lookalike.serving.protocol`.)
- `AdmissionGate`: at most `limit` requests are worked on at once and at most `queue` more wait; any
  further request is answered 503 with `Retry-After` at once instead of growing memory and latency.
  Both are sized from the pod's CPU limit by the servers (see docs/capacity.md for the arithmetic).
"""
from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from typing import Any
from collections.abc import AsyncIterator

from lookalike.serving.errors import Overloaded

INFER_SUFFIX = "/infer"


class BodyLimit:
    """ASGI middleware: inference bodies over `max_bytes` are a 413, refused before they are read."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") not in ("POST", "PUT"):
            await self.app(scope, receive, send)
            return
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
    body = json.dumps({"error": f"the request body is larger than this server accepts ({size:,} bytes > "
                                f"{limit:,}); send fewer or smaller photos"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
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
