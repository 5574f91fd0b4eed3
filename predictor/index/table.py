"""The listing table of a vector index: one row per photo, 64-bit FAISS ids <-> (listing id, photo id), and
labels for filters.

Every photo of a listing is a vector, known to FAISS by `photo_key(listing_id, photo_id)` (see
`lookalike.predictor.index.keys`: a listing's photo "0" keeps the key listings always had, `listing_key`).

The table keeps, row by row (rows are dense, in insertion order, compacted on removal):

- `keys` (int64, the photo's FAISS id), `listing_ids` and `photo_ids` (str), and `owners` (int64, the
  listing's own `listing_key`), so that "every photo of these listings" is a vectorised lookup;
- per label task (category, fine_category, ...) a small vocabulary and an int32 code per row, -1 for
  "no label". A listing's labels are copied onto each of its photos; codes keep a label filter a
  vectorised comparison over millions of rows.

`selector` turns filters (allowed listing ids, labels) into the FAISS id selector a filtered search takes;
label-only selectors are cached until the table changes, as the predictor filters on the same few
predicted labels over and over.

Saved as `listings.npz` (keys, owners and label codes, loaded with allow_pickle=False), `listing_ids.json`
and `photo_ids.json` (absent in indexes from before: every photo is "0" there); the label vocabularies
travel in `index.json`.
"""
from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.predictor.index import kernels
from lookalike.predictor.index.errors import BadIndexInput, CorruptIndex
from lookalike.predictor.index.keys import (FIRST_PHOTO, check_photo_ids, listing_key, listing_keys, name_of, photo_key,
                                            photo_keys, preview)

__all__ = ["ListingTable", "listing_key", "photo_key", "listing_keys", "photo_keys", "check_photo_ids"]

TABLE_FILE = "listings.npz"
IDS_FILE = "listing_ids.json"
PHOTO_IDS_FILE = "photo_ids.json"
MAX_CACHED_FILTERS = 64
KEYS_PER_BUCKET = 2            # rows_of's buckets of the key space: about this many keys in each


class ListingTable:
    """Rows of (photo key, listing id, photo id, owner key, labels); lookups by key through sorted copies."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, np.int64)
        self.owners = np.zeros(0, np.int64)
        self.listing_ids: list[str] = []
        self.photo_ids: list[str] = []
        self.vocab: dict[str, list[str]] = {}
        self.codes: dict[str, np.ndarray] = {}
        self._reindex()

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def listing_count(self) -> int:
        """How many distinct listings the rows belong to."""
        return self._listings

    @property
    def one_photo_each(self) -> bool:
        """Whether every listing has a single photo (then a photo search is a listing search)."""
        return self._listings == len(self.keys)

    @property
    def max_photos(self) -> int:
        """The most photos any one listing has."""
        return self._max_photos

    # ---- lookups ------------------------------------------------------------------------------
    def _reindex(self) -> None:
        self._sorter = np.argsort(self.keys, kind="stable")
        self._sorted = self.keys[self._sorter]
        self._index_buckets()
        self._owner_sorter = np.argsort(self.owners, kind="stable")
        self._owners_sorted = self.owners[self._owner_sorter]
        if len(self._owners_sorted):
            starts = np.flatnonzero(np.r_[True, self._owners_sorted[1:] != self._owners_sorted[:-1]])
            self._listings = len(starts)
            self._max_photos = int(np.diff(np.r_[starts, len(self._owners_sorted)]).max())
        else:
            self._listings, self._max_photos = 0, 0
        # Whether every row is its listing's photo "0" (a catalog of one photo per listing): a search's photo ids
        # are then known without reading the row's, which after FAISS's list scan is a cache miss per result.
        self._first_photos_only = self.photo_ids.count(FIRST_PHOTO) == len(self.photo_ids)
        self._selectors: dict[Any, tuple[Any, int, int]] = {}  # every change of rows invalidates them

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """Boolean mask: which of `keys` (photo keys) are in the table."""
        return self.rows_of(keys) >= 0

    def has_listings(self, owners: np.ndarray) -> np.ndarray:
        """Boolean mask: which listing keys have at least one photo in the table."""
        if len(self._owners_sorted) == 0:
            return np.zeros(len(owners), bool)
        pos = np.searchsorted(self._owners_sorted, owners).clip(0, len(self._owners_sorted) - 1)
        return self._owners_sorted[pos] == owners

    def _index_buckets(self) -> None:
        """Where each bucket of the key space starts in the sorted keys (`lookup`). Keys are uniform hashes, so
        their top bits name a bucket of ~KEYS_PER_BUCKET keys: a lookup reads the bucket's start and searches
        its few keys, two cache misses instead of the ~24 of a binary search over 10M keys (which cost a
        re-ranked query 400 candidates x 24 misses, ~0.3 ms). Keys that are not hashes only make the
        buckets' searches longer."""
        n = len(self._sorted)
        bits = max(1, min(62, int(np.ceil(np.log2(max(n, 2) / KEYS_PER_BUCKET)))))
        shift = 63 - bits
        starts = np.r_[np.searchsorted(self._sorted, np.arange(2 ** bits, dtype=np.int64) << shift), n]
        # (bucket starts, sorted keys, sorter, shift): what `kernels.rows_of` and the re-ranking read
        self.lookup: kernels.Lookup = (starts.astype(np.int64), self._sorted, self._sorter, shift)

    def rows_of(self, keys: np.ndarray) -> np.ndarray:
        """Row numbers of photo keys (any shape), -1 for keys not in the table."""
        return kernels.rows_of(keys, self.lookup)

    def rows_of_listings(self, owners: np.ndarray) -> np.ndarray:
        """Row numbers (sorted) of every photo of the listings with these keys."""
        if not len(owners):
            return np.zeros(0, np.int64)
        lo = np.searchsorted(self._owners_sorted, owners, side="left")
        hi = np.searchsorted(self._owners_sorted, owners, side="right")
        return np.sort(np.concatenate([self._owner_sorter[a:b] for a, b in zip(lo.tolist(), hi.tolist())]))

    def owners_of(self, keys: np.ndarray) -> np.ndarray:
        """Photo keys [N, k] -> the keys of their listings, -1 where no photo (-1)."""
        out = np.full(keys.shape, -1, np.int64)
        valid = keys >= 0
        if valid.any():
            out[valid] = self.owners[self.rows_of(keys[valid])]
        return out

    def ids_of(self, keys: np.ndarray, rows: np.ndarray | None = None) -> tuple[list[list[str]], list[list[str]]]:
        """[N, k] FAISS ids -> per row the listing ids and the photo ids, leaving out -1 (no result). `rows`: the
        keys' table rows when the search found them already (the re-ranking does), [N, k] with -1 alike."""
        lids, pids = self.listing_ids, self.photo_ids
        # one compiled lookup and Python lists: after FAISS's list scan every numpy call runs cold (~2-4 us)
        found = (self.rows_of(keys) if rows is None else rows).tolist()
        listings = [[lids[j] for j in r if j >= 0] for r in found]
        if self._first_photos_only:
            return listings, [[FIRST_PHOTO] * len(r) for r in listings]
        return listings, [[pids[j] for j in r if j >= 0] for r in found]

    def listing_ids_of(self, keys: np.ndarray) -> list[list[str]]:
        """[N, k] FAISS ids -> per row the listing ids, leaving out -1 (no result)."""
        return self.ids_of(keys)[0]

    def labels_of(self, row: int) -> dict[str, str | None]:
        return {t: (self.vocab[t][c] if (c := int(self.codes[t][row])) >= 0 else None) for t in self.vocab}

    # ---- filters ------------------------------------------------------------------------------
    def filter_mask(self, allowed_ids: Collection[str] | None, label_filter: Mapping[str, str] | None) -> np.ndarray:
        """Which rows (photos) pass both filters (either may be None): photos of the allowed listings whose
        labels match."""
        mask = np.ones(len(self.keys), bool)
        if label_filter:
            if not isinstance(label_filter, Mapping):
                raise BadIndexInput(f"label_filter must be a mapping {{task: label}}, "
                                    f"got {type(label_filter).__name__}")
            for task, label in label_filter.items():
                if task not in self.vocab:
                    raise BadIndexInput(f"cannot filter on {task!r}: this index holds labels for "
                                        f"{', '.join(sorted(self.vocab)) or 'no task'}")
                if not isinstance(label, str):
                    raise BadIndexInput(f"label filter values must be strings; {task!r} got {label!r}")
                vocab = self.vocab[task]
                # A label the index has never seen matches nothing: an empty (not an erroneous) answer.
                code = vocab.index(label) if label in vocab else -2
                mask &= self.codes[task] == code
        if allowed_ids is not None:
            if isinstance(allowed_ids, (str, bytes)):
                raise BadIndexInput("allowed_ids must be a collection of listing ids, not a single string")
            owners = listing_keys([str(x) for x in allowed_ids])
            owners = owners[self.has_listings(owners)]  # ids not in the index (e.g. delisted) simply do not match
            allowed = np.zeros(len(self.keys), bool)
            allowed[self.rows_of_listings(owners)] = True
            mask &= allowed
        return mask

    def filter_keys(self, allowed_ids: Collection[str] | None, label_filter: Mapping[str, str] | None) -> np.ndarray:
        """The photo keys that pass both filters."""
        return self.keys[self.filter_mask(allowed_ids, label_filter)]

    def selector(self, allowed_ids: Collection[str] | None, label_filter: Mapping[str, str] | None
                 ) -> tuple[Any, int, int]:
        """(FAISS IDSelector or None for "everything", how many photos and how many listings pass the filters)."""
        import faiss

        if allowed_ids is None and not label_filter:
            return None, len(self.keys), self._listings
        cache_key = None
        if allowed_ids is None and isinstance(label_filter, Mapping):
            try:
                cache_key = tuple(sorted(label_filter.items()))
                hash(cache_key)
            except TypeError:
                cache_key = None
            if cache_key in self._selectors:
                return self._selectors[cache_key]
        mask = self.filter_mask(allowed_ids, label_filter)
        keys = self.keys[mask]
        listings = len(keys) if self.one_photo_each else len(np.unique(self.owners[mask]))
        entry: tuple[Any, int, int] = (None if len(keys) == len(self.keys) else faiss.IDSelectorBatch(keys),
                                       len(keys), listings)
        if cache_key is not None:
            if len(self._selectors) > MAX_CACHED_FILTERS:
                self._selectors.clear()
            self._selectors[cache_key] = entry
        return entry

    # ---- changes (callers validate first, then apply under their write lock) -------------------
    def check_new(self, listing_ids: list[str], photo_ids: list[str] | None = None) -> np.ndarray:
        """Keys for new photos; refuses photos already present and (astronomically rare) key collisions."""
        photo_ids = photo_ids if photo_ids is not None else [FIRST_PHOTO] * len(listing_ids)
        keys = photo_keys(listing_ids, photo_ids)
        rows = self.rows_of(keys)
        if (rows >= 0).any():
            at = np.flatnonzero(rows >= 0)
            clash = [name_of(listing_ids[i], photo_ids[i]) for i, r in zip(at, rows[at])
                     if (self.listing_ids[int(r)], self.photo_ids[int(r)]) != (listing_ids[i], photo_ids[i])]
            if clash:
                raise BadIndexInput(f"photos {preview(clash)} collide with other photos' 63-bit keys; rename them")
            known = [name_of(listing_ids[i], photo_ids[i]) for i in at]
            raise BadIndexInput(f"already in the index: {preview(known)}. Use replace() to change a listing's "
                                f"vectors, or remove() it first")
        if len(np.unique(keys)) != len(keys):
            raise BadIndexInput("two photos of this batch collide on their 63-bit keys; rename one of them")
        return keys

    def check_known(self, listing_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(photo keys, rows) of every photo of listings that must be present; refuses unknown ids."""
        if isinstance(listing_ids, (str, bytes)):
            raise BadIndexInput("listing_ids must be a sequence of strings, not a single string")
        ids = [str(x) for x in listing_ids]
        if len(set(ids)) != len(ids):
            raise BadIndexInput("duplicate listing ids in one batch: name each listing once")
        owners = listing_keys(ids)
        present = self.has_listings(owners)
        if not present.all():
            unknown = [ids[i] for i in np.flatnonzero(~present)]
            raise BadIndexInput(f"listing ids not in the index: {preview(unknown)}; nothing was changed")
        rows = self.rows_of_listings(owners)
        wrong = sorted({self.listing_ids[int(r)] for r in rows} - set(ids))
        if wrong:
            raise BadIndexInput(f"listing ids {preview(ids)} share 63-bit keys with listings {preview(wrong)}; "
                                f"nothing was changed")
        return self.keys[rows], rows

    def check_known_photos(self, listing_ids: Sequence[str], photo_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(keys, rows) of single photos that must be present; refuses unknown ones."""
        ids, photos = check_photo_ids(listing_ids, photo_ids, len(list(listing_ids)))
        keys = photo_keys(ids, photos)
        rows = self.rows_of(keys)
        unknown = [name_of(ids[i], photos[i]) for i in range(len(ids)) if rows[i] < 0
                   or (self.listing_ids[int(rows[i])], self.photo_ids[int(rows[i])]) != (ids[i], photos[i])]
        if unknown:
            raise BadIndexInput(f"photos not in the index: {preview(unknown)}; nothing was changed")
        return keys, rows

    def check_replace(self, ids: list[str], photos: list[str], labels: Mapping[str, Sequence[str | None]] | None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, list[str]], dict[str, np.ndarray]]:
        """What replacing every photo of the listings in `ids` by the photos given takes: (old keys, old
        rows, new keys, vocabularies, codes). Tasks not in `labels` keep each listing's label (from its
        first photo). Refuses unknown listings and key collisions; changes nothing."""
        old_keys, old_rows = self.check_known(list(dict.fromkeys(ids)))
        vocab, codes = self.encode_labels(labels, len(ids))
        first_row: dict[str, int] = {}
        for r in old_rows.tolist():
            first_row.setdefault(self.listing_ids[r], r)
        source = np.array([first_row[lid] for lid in ids], np.int64)
        for task in self.vocab:
            if task not in (labels or {}):
                codes[task] = self.codes[task][source].copy()
        new_keys = photo_keys(ids, photos)
        if len(np.unique(new_keys)) != len(new_keys):
            raise BadIndexInput("two photos of this batch collide on their 63-bit keys; rename one of them")
        clash = self.contains(new_keys) & ~np.isin(new_keys, old_keys)
        if clash.any():
            raise BadIndexInput(f"photo keys of {ids[int(np.flatnonzero(clash)[0])]} collide with another "
                                f"listing's photos; rename them")
        return old_keys, old_rows, new_keys, vocab, codes

    def encode_labels(self, labels: Mapping[str, Sequence[str | None]] | None, n: int
                      ) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
        """Validate labels for n new rows; return (new vocabularies, codes), without changing the table."""
        vocab = {t: list(v) for t, v in self.vocab.items()}
        codes: dict[str, np.ndarray] = {}
        if labels is not None and not isinstance(labels, Mapping):
            raise BadIndexInput(f"labels must be a mapping {{task: [label or None per vector]}}, "
                                f"got {type(labels).__name__}")
        for task, values in (labels or {}).items():
            if not isinstance(task, str) or not task:
                raise BadIndexInput(f"label task names must be non-empty strings, got {task!r}")
            if isinstance(values, (str, bytes)):
                raise BadIndexInput(f"labels[{task!r}] must be a sequence with one label per vector, not a string")
            values = list(values)
            if len(values) != n:
                raise BadIndexInput(f"labels[{task!r}] has {len(values)} entries for {n} vectors: give one label "
                                    f"(or None) per vector")
            words = vocab.setdefault(task, [])
            lookup = {w: i for i, w in enumerate(words)}
            col = np.empty(n, np.int32)
            for i, v in enumerate(values):
                if v is None:
                    col[i] = -1
                    continue
                if not isinstance(v, str):
                    raise BadIndexInput(f"labels[{task!r}][{i}] is {v!r}: labels are strings or None")
                if v not in lookup:
                    lookup[v] = len(words)
                    words.append(v)
                col[i] = lookup[v]
            codes[task] = col
        for task in vocab:
            codes.setdefault(task, np.full(n, -1, np.int32))
        return vocab, codes

    def append(self, keys: np.ndarray, listing_ids: list[str], vocab: dict[str, list[str]],
               codes: dict[str, np.ndarray], photo_ids: list[str] | None = None) -> None:
        old_n = len(self.keys)
        self.keys = np.concatenate([self.keys, keys.astype(np.int64)])
        self.owners = np.concatenate([self.owners, listing_keys(listing_ids)])
        self.listing_ids.extend(listing_ids)
        self.photo_ids.extend(photo_ids if photo_ids is not None else [FIRST_PHOTO] * len(listing_ids))
        for task in vocab:
            prev = self.codes.get(task, np.full(old_n, -1, np.int32))
            self.codes[task] = np.concatenate([prev, codes[task]])
        self.vocab = vocab
        self._reindex()

    def delete_rows(self, rows: np.ndarray) -> None:
        keep = np.ones(len(self.keys), bool)
        keep[rows] = False
        self.keys = self.keys[keep]
        self.owners = self.owners[keep]
        self.listing_ids = [x for x, k in zip(self.listing_ids, keep) if k]
        self.photo_ids = [x for x, k in zip(self.photo_ids, keep) if k]
        self.codes = {t: c[keep] for t, c in self.codes.items()}
        self._reindex()

    # ---- files --------------------------------------------------------------------------------
    def save(self, directory: Path) -> list[str]:
        tasks = list(self.vocab)
        arrays = {"keys": self.keys, "owners": self.owners}
        arrays.update({f"labels_{i}": self.codes[t] for i, t in enumerate(tasks)})
        with open(directory / TABLE_FILE, "wb") as handle:
            np.savez(handle, **arrays)
        (directory / IDS_FILE).write_text(json.dumps(self.listing_ids, ensure_ascii=False))
        (directory / PHOTO_IDS_FILE).write_text(json.dumps(self.photo_ids, ensure_ascii=False))
        return [TABLE_FILE, IDS_FILE, PHOTO_IDS_FILE]

    @classmethod
    def load(cls, directory: Path, vocab: dict[str, list[str]]) -> ListingTable:
        table = cls()
        try:
            with np.load(directory / TABLE_FILE, allow_pickle=False) as data:
                table.keys = data["keys"].astype(np.int64)
                owners = data["owners"].astype(np.int64) if "owners" in data.files else None
                table.codes = {t: data[f"labels_{i}"].astype(np.int32) for i, t in enumerate(vocab)}
            table.listing_ids = json.loads((directory / IDS_FILE).read_text(encoding="utf-8"))
            photos = directory / PHOTO_IDS_FILE
            # an index from before listings had several photos: each row is its listing's photo "0"
            table.photo_ids = (json.loads(photos.read_text(encoding="utf-8")) if photos.is_file()
                               else [FIRST_PHOTO] * len(table.listing_ids))
        except (OSError, ValueError, KeyError) as exc:
            raise CorruptIndex(f"the listing table in {directory} cannot be read ({exc}); rebuild or re-fetch "
                               f"the index version") from exc
        table.vocab = {t: list(v) for t, v in vocab.items()}
        n = len(table.keys)
        if len(table.listing_ids) != n or len(table.photo_ids) != n or any(len(c) != n for c in table.codes.values()):
            raise CorruptIndex(f"the listing table in {directory} is inconsistent ({n} keys, "
                               f"{len(table.listing_ids)} listing ids, {len(table.photo_ids)} photo ids); re-fetch "
                               f"the index version")
        table.owners = owners if owners is not None and len(owners) == n else listing_keys(table.listing_ids)
        table._reindex()
        return table
