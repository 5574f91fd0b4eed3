"""The stable 63-bit keys FAISS knows listings and photos by, and the checks of the ids callers hand the index.

FAISS stores int64 ids; the catalog speaks of strings ("fmnist-train-00042", photo "front").
`photo_key(listing_id, photo_id)` hashes a photo to a non-negative 63-bit integer (blake2b), so the same photo
has the same FAISS id in every index version and an update can remove it without a lookup table of its own.
A listing's photo "0" (the only photo of every listing of an old one-photo catalog) keeps the key listings
always had, `listing_key(listing_id)`, so indexes built before listings had several photos load and
update unchanged. `listing_key` is also each row's owner key in the listing table (`lookalike.predictor.index.table`).
"""
from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence

import numpy as np

from lookalike.predictor.index.errors import BadIndexInput

FIRST_PHOTO = "0"
_KEY_MASK = (1 << 63) - 1


def listing_key(listing_id: str) -> int:
    """The stable key of a listing: the first 8 bytes of blake2b(listing_id), as a 63-bit int. It is the
    FAISS id of the listing's photo "0"."""
    digest = hashlib.blake2b(listing_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _KEY_MASK


def photo_key(listing_id: str, photo_id: str = FIRST_PHOTO) -> int:
    """The stable FAISS id of one photo: `listing_key(listing_id)` for photo "0", else the first 8 bytes of
    blake2b(listing_id NUL photo_id). Two photos sharing a key is astronomically rare, and the table refuses
    it (`check_new`)."""
    if photo_id == FIRST_PHOTO:
        return listing_key(listing_id)
    digest = hashlib.blake2b(f"{listing_id}\x00{photo_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _KEY_MASK


def listing_keys(listing_ids: Sequence[str]) -> np.ndarray:
    return np.fromiter((listing_key(s) for s in listing_ids), dtype=np.int64, count=len(listing_ids))


def photo_keys(listing_ids: Sequence[str], photo_ids: Sequence[str]) -> np.ndarray:
    return np.fromiter((photo_key(s, p) for s, p in zip(listing_ids, photo_ids)), dtype=np.int64,
                       count=len(listing_ids))


def preview(items: Collection, limit: int = 5) -> str:
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:limit])
    return shown + (f" … ({len(items)} in all)" if len(items) > limit else "")


def _strings(values: Sequence[str], n: int, what: str) -> list[str]:
    if isinstance(values, (str, bytes)):
        raise BadIndexInput(f"{what} must be a sequence of strings, one per vector, not a single string")
    out = list(values)
    if len(out) != n:
        raise BadIndexInput(f"got {n} vectors but {len(out)} {what}: give exactly one per vector")
    bad = [x for x in out if not isinstance(x, str) or not x]
    if bad:
        raise BadIndexInput(f"{what} must be non-empty strings; got {preview(bad)}")
    return out


def check_photo_ids(listing_ids: Sequence[str], photo_ids: Sequence[str] | None, n: int
                    ) -> tuple[list[str], list[str]]:
    """(listing ids, photo ids), one each per vector, no (listing, photo) twice. Without photo ids every
    vector is its listing's photo "0", so a listing id may appear once."""
    ids = _strings(listing_ids, n, "listing ids")
    photos = [FIRST_PHOTO] * n if photo_ids is None else _strings(photo_ids, n, "photo ids")
    pairs = list(zip(ids, photos))
    if len(set(pairs)) != len(pairs):
        seen, dups = set(), []
        for pair in pairs:
            if pair in seen:
                dups.append(pair[0] if photo_ids is None else f"{pair[0]}/{pair[1]}")
            seen.add(pair)
        if photo_ids is None:
            raise BadIndexInput(f"duplicate listing ids in one batch: {preview(sorted(set(dups)))}. Give photo_ids "
                                f"to index several photos of a listing; use replace() to change a listing's vectors")
        raise BadIndexInput(f"photos listed twice in one batch: {preview(sorted(set(dups)))}")
    return ids, photos


def check_listing_ids(listing_ids: Sequence[str], n: int) -> list[str]:
    """Listing ids as a list of non-empty strings, one per vector, no duplicates (one photo per listing)."""
    return check_photo_ids(listing_ids, None, n)[0]


def name_of(listing_id: str, photo_id: str) -> str:
    """How messages name a photo: the listing id alone for photo "0", else listing/photo."""
    return listing_id if photo_id == FIRST_PHOTO else f"{listing_id}/{photo_id}"
