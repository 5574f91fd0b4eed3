"""From photos to listings: a search finds photos, a shopper is shown listings.

Every photo of a listing is a vector, so the nearest photos of a query can hold one listing several times
(its front and its back both look like the query). A listing's score is its best photo's; the answer is
the first `top_k` distinct listings of the photo ranking, each naming the photo that matched.

`top_listings` asks the photo search (`search(queries, m) -> (scores, photo keys)`, best first) for
`m = top_k · oversample` photos, keeps each listing's best, and asks again with four times as many
photos for the queries that still hold fewer than `top_k` listings, until they do or every photo that
passes the filters has been returned: never silently fewer listings than there are.

`first_distinct` is the grouping itself, shared with the per-listing recall of `index_tuning`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

GROWTH = 4  # how much longer the photo list of a query short of listings gets on each new try


@dataclass
class SearchResult:
    """Top-k listings per query, best first, each ranked by (and naming) its best photo.

    listing_ids: per query the listing ids found, each once (shorter than k only when fewer listings
    pass the filter); photo_ids: beside each, the photo that matched; scores [N, k] float32 cosine
    similarity of that photo, NaN where no listing; ids [N, k] int64 FAISS keys of that photo
    (`photo_key`, which is `listing_key` for photo "0"), -1 where no listing; nprobe: the lists visited
    first (the search widens it for a query that would otherwise come back short).
    """

    listing_ids: list[list[str]]
    scores: np.ndarray
    ids: np.ndarray
    nprobe: int | None = None
    photo_ids: list[list[str]] | None = None

    def __len__(self) -> int:
        return len(self.listing_ids)


def oversample(photos: int, listings: int, max_photos: int) -> int:
    """How many photos to ask for per listing wanted: one more than the average listing has, at most as
    many as the largest one has."""
    if listings <= 0 or photos <= listings:
        return 1
    return int(max(2, min(max_photos, math.ceil(photos / listings) + 1)))


def first_distinct(owners: np.ndarray, k: int, skip: np.ndarray | None = None) -> np.ndarray:
    """Per row of owners [N, m] (best first; -1: no result), the column of each of the first k distinct
    owners, -1 padded: [N, k]. `skip` [N, m] marks entries to leave out (e.g. the query's own photo)."""
    n = len(owners)
    cols = np.full((n, k), -1, np.int64)
    for i in range(n):
        row = owners[i]
        valid = row >= 0 if skip is None else (row >= 0) & ~skip[i]
        where = np.flatnonzero(valid)
        if not len(where):
            continue
        _, first = np.unique(row[where], return_index=True)
        picked = np.sort(where[first])[:k]
        cols[i, :len(picked)] = picked
    return cols


def top_listings(search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], owners_of: Callable,
                 q: np.ndarray, k: int, *, photos: int, listings: int, per_listing: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(scores [N, k], photo keys [N, k]) of the best photo of each of the top k listings per query.

    `photos` / `listings`: how many pass the filters (the search can find no more); `per_listing`: the
    oversampling factor. NaN scores and -1 keys pad a row only when fewer than k listings pass."""
    nq = len(q)
    out_s = np.full((nq, k), np.nan, np.float32)
    out_i = np.full((nq, k), -1, np.int64)
    if photos == 0 or listings == 0:
        return out_s, out_i
    need = min(k, listings)
    m = min(photos, k * per_listing)
    todo = np.arange(nq)
    while len(todo):
        scores, keys = search(q[todo], m)
        cols = first_distinct(owners_of(keys), k)
        got = (cols >= 0).sum(axis=1)
        safe = cols.clip(0)
        s = np.take_along_axis(scores, safe, axis=1).astype(np.float32)
        i = np.take_along_axis(keys, safe, axis=1)
        s[cols < 0], i[cols < 0] = np.nan, -1
        out_s[todo], out_i[todo] = s, i
        if m >= photos:
            break
        todo = todo[got < need]
        m = min(photos, m * GROWTH)
    return out_s, out_i
