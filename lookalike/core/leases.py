"""Leases: one holder at a time for a named thing in the store (an alias about to move), safe against a
holder that crashes.

S3 has no lock, and neither the embedded rclone server nor the minio SDK's uploads offer conditional
writes, so a lease is an object `<key>` holding its owner and an expiry, taken by write-then-verify: a
contender reads the object, and only when it is absent, expired or its own does it write its claim, wait
`settle_s`, and read it back. Of several contenders that saw it free at once, the last write wins and
every other one reads someone else's claim and backs off, so exactly one proceeds as long as their writes
land within `settle_s` of each other (S3 reads are strongly consistent after a write). A holder that
crashes leaves a claim that expires after `ttl_s`; the next contender takes it over then. A live holder
renews its claim every `ttl_s / 3`, so a long upload under the lease never outlives it.
"""
from __future__ import annotations

import json
import secrets
import socket
import threading
import time
from typing import Any

from lookalike.core.errors import UnavailableError
from lookalike.core.s3 import ObjectStore


class LeaseTimeout(UnavailableError):
    """Another run held the lease for longer than this one would wait."""


class Lease:
    """`with Lease(store, key): ...` runs the block as the only holder of `key`."""

    def __init__(self, store: ObjectStore, key: str, *, ttl_s: float = 60.0, settle_s: float = 0.5,
                 wait_s: float = 1800.0, what: str = ""):
        self.store, self.key = store, key
        self.ttl_s, self.settle_s, self.wait_s = ttl_s, settle_s, wait_s
        self.what = what or key
        self.owner = f"{socket.gethostname()}-{secrets.token_hex(6)}"
        self._held = threading.Event()
        self._renewer: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.store.get_bytes(self.key))
        except Exception:  # noqa: BLE001 - absent (or unreadable, as good as absent: it is re-written)
            return None

    def acquire(self) -> Lease:
        deadline = time.monotonic() + self.wait_s
        waited_on = None
        while True:
            held = self._read()
            free = held is None or held.get("expires", 0) < time.time() or held.get("owner") == self.owner
            if free:
                claim = {"owner": self.owner, "expires": time.time() + self.ttl_s, "what": self.what}
                self._write(claim)
                time.sleep(self.settle_s)
                mine = self._read()
                if mine is not None and mine.get("owner") == self.owner:
                    self._held.set()
                    self._renewer = threading.Thread(target=self._renew, name="lease-renewal", daemon=True)
                    self._renewer.start()
                    return self
            elif held.get("owner") != waited_on:
                waited_on = held.get("owner")
                print(f"waiting for {self.what}: held by {waited_on} until "
                      f"{time.strftime('%H:%M:%S', time.localtime(held.get('expires', 0)))}", flush=True)
            if time.monotonic() > deadline:
                raise LeaseTimeout(f"{self.what} stayed held by another run for {self.wait_s:.0f} s; nothing was "
                                   f"published: run again later")
            time.sleep(self.settle_s * (0.5 + secrets.randbelow(1000) / 1000))

    def _write(self, claim: dict[str, Any]) -> None:
        self.store.put_bytes(self.key, json.dumps(claim).encode(), content_type="application/json")

    def _renew(self) -> None:
        while self._held.is_set():
            time.sleep(self.ttl_s / 3)
            if self._held.is_set():
                try:
                    self._write({"owner": self.owner, "expires": time.time() + self.ttl_s, "what": self.what})
                except Exception:  # noqa: BLE001 - the store is briefly down: the claim still has 2/3 of its life
                    pass

    def release(self) -> None:
        self._held.clear()
        held = self._read()
        if held is not None and held.get("owner") == self.owner:
            self.store.delete(self.key)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
