"""The listing table of a vector index: 64-bit FAISS ids <-> catalog listing ids, and per-listing labels.

FAISS stores int64 ids; the catalog speaks of strings ("fmnist-train-00042"). `listing_key` maps a
listing id to a stable non-negative 63-bit integer (blake2b), so the same listing has the same FAISS id
in every index version and an update can remove it without a lookup table of its own.

The table keeps, row by row (rows are dense, in insertion order, compacted on removal):

- `keys` (int64) and `listing_ids` (str),
- per label task (category, fine_category, ...) a small vocabulary and an int32 code per row, -1 for
  "no label". Codes keep a label filter a vectorised comparison over millions of rows.

Saved as `listings.npz` (keys and label codes, loaded with allow_pickle=False) and `listing_ids.json`;
the label vocabularies travel in `index.json`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Collection, Mapping, Sequence

import numpy as np

from predictor.index_errors import BadIndexInput, CorruptIndex

TABLE_FILE = "listings.npz"
IDS_FILE = "listing_ids.json"
_KEY_MASK = (1 << 63) - 1


def listing_key(listing_id: str) -> int:
    """The stable FAISS id of a listing: the first 8 bytes of blake2b(listing_id), as a 63-bit int."""
    digest = hashlib.blake2b(listing_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _KEY_MASK


def listing_keys(listing_ids: Sequence[str]) -> np.ndarray:
    return np.fromiter((listing_key(s) for s in listing_ids), dtype=np.int64, count=len(listing_ids))


def _preview(items: Collection, limit: int = 5) -> str:
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:limit])
    return shown + (f" … ({len(items)} in all)" if len(items) > limit else "")


def check_listing_ids(listing_ids: Sequence[str], n: int) -> list[str]:
    """Listing ids as a list of non-empty strings, one per vector, no duplicates."""
    if isinstance(listing_ids, (str, bytes)):
        raise BadIndexInput("listing_ids must be a sequence of strings, one per vector, not a single string")
    ids = list(listing_ids)
    if len(ids) != n:
        raise BadIndexInput(f"got {n} vectors but {len(ids)} listing ids: give exactly one listing id per vector")
    bad = [x for x in ids if not isinstance(x, str) or not x]
    if bad:
        raise BadIndexInput(f"listing ids must be non-empty strings; got {_preview(bad)}")
    if len(set(ids)) != len(ids):
        seen, dups = set(), []
        for x in ids:
            if x in seen:
                dups.append(x)
            seen.add(x)
        raise BadIndexInput(f"duplicate listing ids in one batch: {_preview(sorted(set(dups)))}. Each listing "
                            f"has one vector; use replace() to change a listing's vector")
    return ids


class ListingTable:
    """Rows of (key, listing id, labels); lookups by key through a sorted copy of the keys."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, np.int64)
        self.listing_ids: list[str] = []
        self.vocab: dict[str, list[str]] = {}
        self.codes: dict[str, np.ndarray] = {}
        self._reindex()

    def __len__(self) -> int:
        return len(self.keys)

    # ---- lookups ------------------------------------------------------------------------------
    def _reindex(self) -> None:
        self._sorter = np.argsort(self.keys, kind="stable")
        self._sorted = self.keys[self._sorter]

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """Boolean mask: which of `keys` are in the table."""
        if len(self._sorted) == 0:
            return np.zeros(len(keys), bool)
        pos = np.searchsorted(self._sorted, keys).clip(0, len(self._sorted) - 1)
        return self._sorted[pos] == keys

    def rows_of(self, keys: np.ndarray) -> np.ndarray:
        """Row numbers of keys known to be in the table."""
        return self._sorter[np.searchsorted(self._sorted, keys)]

    def listing_ids_of(self, keys: np.ndarray) -> list[list[str]]:
        """[N, k] FAISS ids -> per row the listing ids, stopping at the first -1 (no result)."""
        ids = self.listing_ids
        if keys.size and keys.min() >= 0:  # the common case: no gaps
            rows = self.rows_of(keys).tolist()
            return [[ids[j] for j in r] for r in rows]
        valid = keys >= 0
        out: list[list[str]] = []
        rows = np.zeros(keys.shape, np.int64)
        if valid.any():
            rows[valid] = self.rows_of(keys[valid])
        ids = self.listing_ids
        for r, v in zip(rows, valid):
            out.append([ids[j] for j in r[v]])
        return out

    def labels_of(self, row: int) -> dict[str, str | None]:
        return {t: (self.vocab[t][c] if (c := int(self.codes[t][row])) >= 0 else None) for t in self.vocab}

    # ---- filters ------------------------------------------------------------------------------
    def filter_keys(self, allowed_ids: Collection[str] | None, label_filter: Mapping[str, str] | None) -> np.ndarray:
        """The keys of the listings that pass both filters (either may be None)."""
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
            wanted = listing_keys([str(x) for x in allowed_ids])
            wanted = wanted[self.contains(wanted)]  # ids not in the index (e.g. delisted) simply do not match
            allowed = np.zeros(len(self.keys), bool)
            allowed[self.rows_of(wanted)] = True
            mask &= allowed
        return self.keys[mask]

    # ---- changes (callers validate first, then apply under their write lock) -------------------
    def check_new(self, listing_ids: list[str]) -> np.ndarray:
        """Keys for new listings; refuses ids already present and (astronomically rare) key collisions."""
        keys = listing_keys(listing_ids)
        present = self.contains(keys)
        if present.any():
            known = [listing_ids[i] for i in np.flatnonzero(present)]
            clash = [k for k in known if self.listing_ids[int(self.rows_of(np.array([listing_key(k)]))[0])] != k]
            if clash:
                raise BadIndexInput(f"listing ids {_preview(clash)} collide with other listings' 63-bit keys; "
                                    f"rename them")
            raise BadIndexInput(f"listing ids already in the index: {_preview(known)}. Use replace() to change "
                                f"their vectors, or remove() them first")
        if len(np.unique(keys)) != len(keys):
            raise BadIndexInput("two listing ids of this batch collide on their 63-bit keys; rename one of them")
        return keys

    def check_known(self, listing_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(keys, rows) of listings that must be present; refuses unknown ids."""
        if isinstance(listing_ids, (str, bytes)):
            raise BadIndexInput("listing_ids must be a sequence of strings, not a single string")
        ids = [str(x) for x in listing_ids]
        if len(set(ids)) != len(ids):
            raise BadIndexInput("duplicate listing ids in one batch: name each listing once")
        keys = listing_keys(ids)
        present = self.contains(keys)
        if not present.all():
            unknown = [ids[i] for i in np.flatnonzero(~present)]
            raise BadIndexInput(f"listing ids not in the index: {_preview(unknown)}; nothing was changed")
        rows = self.rows_of(keys)
        wrong = [ids[i] for i, r in enumerate(rows) if self.listing_ids[int(r)] != ids[i]]
        if wrong:
            raise BadIndexInput(f"listing ids {_preview(wrong)} are not in the index (their keys belong to other "
                                f"listings); nothing was changed")
        return keys, rows

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
               codes: dict[str, np.ndarray]) -> None:
        old_n = len(self.keys)
        self.keys = np.concatenate([self.keys, keys.astype(np.int64)])
        self.listing_ids.extend(listing_ids)
        for task in vocab:
            prev = self.codes.get(task, np.full(old_n, -1, np.int32))
            self.codes[task] = np.concatenate([prev, codes[task]])
        self.vocab = vocab
        self._reindex()

    def delete_rows(self, rows: np.ndarray) -> None:
        keep = np.ones(len(self.keys), bool)
        keep[rows] = False
        self.keys = self.keys[keep]
        self.listing_ids = [x for x, k in zip(self.listing_ids, keep) if k]
        self.codes = {t: c[keep] for t, c in self.codes.items()}
        self._reindex()

    # ---- files --------------------------------------------------------------------------------
    def save(self, directory: Path) -> list[str]:
        tasks = list(self.vocab)
        arrays = {"keys": self.keys}
        arrays.update({f"labels_{i}": self.codes[t] for i, t in enumerate(tasks)})
        with open(directory / TABLE_FILE, "wb") as handle:
            np.savez(handle, **arrays)
        (directory / IDS_FILE).write_text(json.dumps(self.listing_ids, ensure_ascii=False))
        return [TABLE_FILE, IDS_FILE]

    @classmethod
    def load(cls, directory: Path, vocab: dict[str, list[str]]) -> "ListingTable":
        table = cls()
        try:
            with np.load(directory / TABLE_FILE, allow_pickle=False) as data:
                table.keys = data["keys"].astype(np.int64)
                table.codes = {t: data[f"labels_{i}"].astype(np.int32) for i, t in enumerate(vocab)}
            table.listing_ids = json.loads((directory / IDS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError) as exc:
            raise CorruptIndex(f"the listing table in {directory} cannot be read ({exc}); rebuild or re-fetch "
                               f"the index version") from exc
        table.vocab = {t: list(v) for t, v in vocab.items()}
        n = len(table.keys)
        if len(table.listing_ids) != n or any(len(c) != n for c in table.codes.values()):
            raise CorruptIndex(f"the listing table in {directory} is inconsistent ({n} keys, "
                               f"{len(table.listing_ids)} listing ids); re-fetch the index version")
        table._reindex()
        return table
