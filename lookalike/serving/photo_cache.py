"""Repeated photos: what both servers share to answer a photo seen before without decoding it again.

Shoppers retry, apps re-send after a network error, a viral photo is searched by thousands: the same
bytes arrive again. A photo is known by its content key (`content_key`: SHA-256 of its bytes and the
`box` it is cut to, 128 bits kept), which costs ~0.6 ms per MB (the CPU's SHA instructions; blake2b took
1.35 ms per MB on the same 2-core machine), against ~20 ms to decode a 12-MP JPEG and ~10 ms to embed it.

Where each part lives, and why (measured with benchmarks/serving.py; docs/architecture.md):

- the predictor keeps the caches (`ByteLRU`): content key -> embedding (and the heads' probabilities),
  per model version; and content key + the request's parameters -> the answer, per model + index pair.
  Only the predictor knows for certain which pair it serves: it reads its pair once per request and
  keys both caches on those versions, so a swap can never answer from the previous pair.
- the transformer keeps only the keys it has sent with their pixels (`RecentKeys`, 16 bytes each) and,
  for a photo whose key it has sent before, asks the predictor by key alone, before decoding (a probe).
  The predictor answers from its caches or says "miss" (`MISS_PARAMETER`, an ordinary 200: a miss is no
  error), and the transformer then decodes and sends the pixels as always. A miss costs one short call
  (~1 ms); a hit saves the decode, the preprocessing, the 301 KB tensor, the embedding and the search.

Both caches are bounded in bytes (`ByteLRU.max_bytes`), least recently used out first. Hits and misses
are counted in `lookalike_cache_lookups_total{unit,cache,result}` (`count`).
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

from lookalike.serving.metrics import CACHE_LOOKUPS

KEY_BYTES = 16  # 128-bit keys: collisions are out of reach (2^64 photos for an even chance)
KEYS_INPUT = "photo_key"  # the predictor's input when the transformer asks by content key alone (BYTES [N])
KEYS_PARAMETER = "photo_keys"  # beside pixels: the content key of each image, comma-separated
MISS_PARAMETER = "cache_miss"  # the predictor's answer to a probe it cannot answer from its caches
ENTRY_OVERHEAD = 200  # bytes of Python objects around a cached value (dict slot, tuple, key string)


def content_key(data: bytes, box: tuple[float, ...] | None = None) -> str:
    """The key of a photo's content (hex): the same bytes cut to the same box give the same key."""
    digest = hashlib.sha256(data)
    if box is not None:
        digest.update(repr(tuple(float(v) for v in box)).encode())
    return digest.hexdigest()[:2 * KEY_BYTES]


def count(unit: str, cache: str, hit: bool, n: int = 1) -> None:
    """Count `n` lookups of `cache` (embedding | answer) in `unit` as hits or misses."""
    if n:
        CACHE_LOOKUPS.labels(unit, cache, "hit" if hit else "miss").inc(n)


class ByteLRU:
    """A thread-safe mapping bounded in bytes: the least recently used entries leave first.

    Each `put` names the bytes its value holds (the caller knows: arrays' nbytes, strings' lengths); an
    entry larger than the whole budget is not kept. `max_bytes` 0 keeps nothing.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self.bytes = 0
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        size = int(nbytes) + ENTRY_OVERHEAD
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            if size > self.max_bytes:
                return
            self._entries[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.bytes -= dropped

    def discard(self, key: Hashable) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[1]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0


class RecentKeys:
    """The content keys a transformer has sent with their pixels, most recent last, bounded in bytes: a
    photo whose key is here is probably in the predictor's caches, so it is asked for by key first."""

    def __init__(self, max_bytes: int):
        self._keys = ByteLRU(max_bytes)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def all_known(self, keys: list[str]) -> bool:
        return bool(keys) and all(self._keys.get(k) is not None for k in keys)

    def get(self, key: str) -> Any:
        """What was remembered beside the key (True when nothing was), None for a key not here."""
        return self._keys.get(key)

    def add(self, keys: list[str], values: list | None = None) -> None:
        """Remember `keys`, each with its value (e.g. what the photo searched), or True."""
        for i, key in enumerate(keys):
            value = values[i] if values is not None and i < len(values) and values[i] is not None else True
            self._keys.put(key, value, len(key) + (64 if value is not True else 0))

    def forget(self, keys: list[str]) -> None:
        for key in keys:
            self._keys.discard(key)


__all__ = ["ByteLRU", "RecentKeys", "content_key", "count", "KEYS_INPUT", "KEYS_PARAMETER", "MISS_PARAMETER"]
