"""The vectors an index already holds, read back by photo: what "more like this" searches with.

A listing in the index has its photos' vectors stored there already, so searching by a listing needs no
photo, no decode and no model. Where a vector is read from depends on the index kind:

- exact (`IndexIDMap(Flat)`): the flat array, at the position of the photo's key in the id map;
- IVF: the photo's inverted list and offset (`reconstruct_from_offset`: exact for IVF-Flat, the PQ
  code's approximation otherwise), found through a key -> (list, offset) map built on first use
  (16 bytes per vector, built in one pass over the lists' ids) and re-built when a lookup finds its
  entry moved (an update added or removed vectors since);
- IVF-PQ with its 8-bit re-ranking copy: that copy, by table row (closer than the PQ code, no map).

Every read is checked against the key it was asked for, so a stale map is noticed, never believed.
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np

from lookalike.core.errors import LookalikeError
from lookalike.predictor.index.keys import listing_key, photo_key, preview
from lookalike.predictor.index.refine import RefineCopy
from lookalike.predictor.index.table import ListingTable


class UnknownListing(LookalikeError):
    """A listing (or a photo of it) that the index does not hold: nothing to search with (404)."""

    status = 404


class StoredVectors:
    """Reads the vectors of photos out of one FAISS index (see the module doc)."""

    def __init__(self, index: Any, ivf: Any | None, refine: RefineCopy | None):
        self._index, self._ivf, self._refine = index, ivf, refine
        self._keys: np.ndarray | None = None  # sorted photo keys ...
        self._where: np.ndarray | None = None  # ... and where each is: list << 32 | offset, or flat position
        self._lock = threading.Lock()

    def of_listing(self, table: ListingTable, listing_id: str, photo_id: str | None = None) -> tuple[np.ndarray, str]:
        """The stored vector [D] of one photo of a listing (its first photo when photo_id is None: the one
        a catalog lists first) and that photo's id. UnknownListing when the index has no such photo."""
        if photo_id is None:
            owner = np.array([listing_key(listing_id)], np.int64)
            rows = table.rows_of_listings(owner) if table.has_listings(owner)[0] else np.zeros(0, np.int64)
            rows = [int(r) for r in rows if table.listing_ids[int(r)] == listing_id]
            if not rows:
                raise UnknownListing(f"listing {preview([listing_id])} is not in the served index: search by one of "
                                     f"its listings, or by a photo")
            row = rows[0]
        else:
            key = np.array([photo_key(listing_id, photo_id)], np.int64)
            row = int(table.rows_of(key)[0])  # -1 when the photo is not in the table
            if row < 0 or (table.listing_ids[row], table.photo_ids[row]) != (listing_id, photo_id):
                raise UnknownListing(f"listing {preview([listing_id])} has no photo {preview([photo_id])} in the "
                                     f"served index")
        return self.vector(int(table.keys[row]), row), table.photo_ids[row]

    def vector(self, key: int, row: int) -> np.ndarray:
        """The stored vector of the photo with FAISS id `key` at listing-table row `row`, L2-normalised."""
        if self._refine is not None:
            v = self._refine.decode(self._refine.codes[row:row + 1])[0]
        else:
            v = self._read(key)
        v = np.asarray(v, np.float32)
        norm = float(np.linalg.norm(v))
        return v / norm if norm > 0 else v

    def _read(self, key: int) -> np.ndarray:
        for attempt in range(2):
            where = self._locate(key, rebuild=attempt > 0)
            if where is not None:
                v = self._at(key, where)
                if v is not None:
                    return v
        raise LookalikeError(f"photo key {key} is in the listing table but not in the FAISS index: the index "
                             f"and its table disagree; rebuild the index")

    def _locate(self, key: int, rebuild: bool) -> int | None:
        with self._lock:
            if self._keys is None or rebuild:
                self._keys, self._where = self._map()
            keys, where = self._keys, self._where
        pos = int(np.searchsorted(keys, key))
        return int(where[pos]) if pos < len(keys) and keys[pos] == key else None

    def _map(self) -> tuple[np.ndarray, np.ndarray]:
        """Every key of the index, sorted, and where it is stored."""
        import faiss

        if self._ivf is None:  # IndexIDMap(Flat): position i holds id_map[i]
            ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
            where = np.arange(len(ids), dtype=np.int64)
        else:
            lists = self._ivf.invlists
            parts_ids, parts_where = [], []
            for list_no in range(lists.nlist):
                size = lists.list_size(list_no)
                if not size:
                    continue
                ids_ptr = lists.get_ids(list_no)
                try:
                    parts_ids.append(faiss.rev_swig_ptr(ids_ptr, size).astype(np.int64))
                finally:
                    lists.release_ids(list_no, ids_ptr)
                parts_where.append((np.int64(list_no) << 32) | np.arange(size, dtype=np.int64))
            ids = np.concatenate(parts_ids) if parts_ids else np.zeros(0, np.int64)
            where = np.concatenate(parts_where) if parts_where else np.zeros(0, np.int64)
        order = np.argsort(ids, kind="stable")
        return ids[order], where[order]

    def _at(self, key: int, where: int) -> np.ndarray | None:
        """The vector stored at `where`, or None when that place no longer holds `key`."""
        import faiss

        if self._ivf is None:
            id_map = self._index.id_map
            if where >= id_map.size() or id_map.at(where) != key:
                return None
            return self._index.index.reconstruct(where)
        list_no, offset = where >> 32, where & 0xFFFFFFFF
        lists = self._ivf.invlists
        if offset >= lists.list_size(list_no) or lists.get_single_id(list_no, offset) != key:
            return None
        out = np.empty(self._ivf.d, np.float32)
        self._ivf.reconstruct_from_offset(int(list_no), int(offset), faiss.swig_ptr(out))
        return out


__all__ = ["StoredVectors", "UnknownListing"]
