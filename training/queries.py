"""What the judge asks: photos held out of training, a held-out catalog, and simulated phone photos of the
EVALUATION recipe; and the gallery they search. Nothing here is ever trained on.

- `hold_out`: before training, a seeded few listings give up one photo each for model selection (early
  stopping) and a few more for the final evaluation. A listing with several photos keeps the others in
  training and in the gallery (the held-out photo is "another view" of a product the catalog has; a user
  photo is preferred when it has one); a listing with a single photo is held out whole (its photo can
  then only ask for its labels).
- `gallery_rows`: the catalog photos searched: every photo of the listings the queries look for, plus a
  seeded sample of the others up to a limit.
- `view_queries`, `catalog_queries`, `phone_queries`: the query sets (`lookalike.training.evaluate.QuerySet`).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from lookalike.training.data import ImageBank
from lookalike.training.evaluate import Gallery, QuerySet
from lookalike.training.phone_photos import EVALUATION, SIMULATED_NOTE, simulate_phone_photo

PHONE_SIZE = 320  # simulated phone photos are made at this size, whatever the model's input size
HOLDOUT_SHARE = 0.1  # at most this share of the listings is held out for each purpose


@dataclass
class Holdout:
    train: np.ndarray  # bank rows trained on
    select: np.ndarray  # bank rows held out to choose the best step
    test: np.ndarray  # bank rows held out for the final evaluation


def hold_out(bank: ImageBank, *, select_listings: int, test_listings: int, seed: int) -> Holdout:
    """One photo of each of up to `select_listings` (then `test_listings`) seeded listings, at most
    HOLDOUT_SHARE of the listings each; see the module docstring."""
    photos = bank.photos_of()
    rng = np.random.default_rng([seed, 0x401D])
    cap = int(HOLDOUT_SHARE * len(photos))
    wanted = [min(select_listings, cap), min(test_listings, cap)]
    picked: list[list[int]] = [[], []]
    for listing in rng.permutation(len(photos)):
        part = 0 if len(picked[0]) < wanted[0] else 1
        if len(picked[part]) >= wanted[part]:
            break
        rows = photos[listing]
        users = [int(r) for r in rows if bank.rows[r].source == "user_photo"]
        choices = users if users and len(rows) > 1 else [int(r) for r in rows]
        picked[part].append(choices[int(rng.integers(len(choices)))])
    held = set(picked[0]) | set(picked[1])
    train = np.array([i for i in range(len(bank)) if i not in held], dtype=np.int64)
    return Holdout(train, np.array(sorted(picked[0]), dtype=np.int64), np.array(sorted(picked[1]), dtype=np.int64))


def gallery_rows(bank: ImageBank, *, listings: set[str], limit: int, seed: int) -> np.ndarray:
    """Bank rows: every photo of `listings`, then the photos of seeded other listings while the total
    stays within `limit` (at least the first set whole)."""
    photos = bank.photos_of()
    must = [i for i, lid in enumerate(bank.listing_ids) if lid in listings]
    chosen = [int(r) for i in must for r in photos[i]]
    taken = set(must)
    rng = np.random.default_rng([seed, 0x6A11])
    for i in rng.permutation(len(photos)):
        if len(chosen) >= limit:
            break
        if int(i) not in taken and len(chosen) + len(photos[i]) <= limit:
            chosen.extend(int(r) for r in photos[i])
    return np.array(sorted(chosen), dtype=np.int64)


def gallery_of(bank: ImageBank, rows: np.ndarray) -> Gallery:
    return Gallery([bank.images[i] for i in rows], [bank.rows[i].listing_id for i in rows],
                   [bank.rows[i].labels for i in rows], [bank.rows[i].photo for i in rows])


def view_queries(bank: ImageBank, rows: np.ndarray, name: str = "views") -> QuerySet:
    """Held-out photos of the catalog: each looks for its listing's other photos and for its labels."""
    return QuerySet(name, [bank.images[i] for i in rows], [bank.rows[i].listing_id for i in rows],
                    [bank.rows[i].labels for i in rows], [bank.rows[i].photo for i in rows])


def catalog_queries(bank: ImageBank, limit: int, seed: int, name: str = "eval_catalog") -> QuerySet:
    """Up to `limit` seeded photos of another catalog (held-out listings, a held-out design set): each
    looks for its listing when the gallery has it, and for its labels."""
    rows = np.arange(len(bank))
    if len(rows) > limit:
        rows = np.sort(np.random.default_rng([seed, 0xCA7]).choice(len(bank), size=limit, replace=False))
    return view_queries(bank, rows, name)


def phone_queries(bank: ImageBank, rows: np.ndarray, n: int, seed: int, *, name: str = "phone",
                  out_size: int = PHONE_SIZE, workers: int = 4) -> QuerySet:
    """Simulated phone photos (EVALUATION recipe) of `n` seeded distinct listings among bank `rows`, one
    of each listing's photos each; each looks for its listing."""
    rng = np.random.default_rng([EVALUATION.seed_salt, seed])
    by_listing: dict[int, list[int]] = {}
    for r in rows:
        by_listing.setdefault(int(bank.listing_index[r]), []).append(int(r))
    listings = sorted(by_listing)
    picks = rng.choice(len(listings), size=min(n, len(listings)), replace=False)
    sources = [by_listing[listings[int(i)]][int(rng.integers(len(by_listing[listings[int(i)]])))] for i in picks]

    def one(k: int):
        return simulate_phone_photo(bank.images[sources[k]], np.random.default_rng([EVALUATION.seed_salt, seed, k]),
                                    out_size=out_size, recipe=EVALUATION)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        images = list(pool.map(one, range(len(sources))))
    return QuerySet(name, images, [bank.rows[r].listing_id for r in sources], [bank.rows[r].labels for r in sources],
                    [None] * len(sources), simulated=True, note=SIMULATED_NOTE, labelled=False)
