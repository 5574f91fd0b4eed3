"""The read-write lock of a vector index: many searches at once, or one update.

FAISS CPU search is read-only, so searches on one index run concurrently; add, remove and replace take
the write lock, so a search never sees a half-applied update. A waiting writer holds off new readers,
so a steady stream of searches cannot starve an update. (The predictor swaps whole indexes by
replacing the object, which needs no lock.)
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class ReadWriteLock:
    """Many readers or one writer; a waiting writer holds off new readers."""

    def __init__(self) -> None:
        # A plain Lock under the Condition: a reader enters and leaves through the lock's own (C) context
        # manager, not the Condition's Python one, which a 0.1 ms search felt (~2 us a search).
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def acquire_read(self) -> None:
        with self._mutex:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._mutex:
            self._readers -= 1
            if not self._readers and self._writers_waiting:
                self._cond.notify_all()

    @contextmanager
    def read(self) -> Iterator[None]:
        self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
