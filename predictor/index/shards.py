"""A sharded index version: one index's photos split across k FAISS files, searched apart, merged as one.

    VectorIndex.build(all photos)            one k-means, one nprobe tuning, one recall measurement
      │ split: listing → shard by listing_key(listing_id) % k (a listing's photos stay together, and an
      │        update knows a listing's shard from its id alone); every shard is a copy of the trained
      │        index holding only its listings: the SAME centroids, so a query probes the same lists
      ▼        in every shard and the merged top-k is the unsharded top-k
    shard-000/ … shard-<k-1>/   each an ordinary index folder (index.faiss, listing table, index.json
                                whose `extra` names its shard), plus shards.json: the version's card
    publish → indexes-sharded/<model_version>/<index_version>/ under one MANIFEST (every shard, whole)

Updates (`add`, `remove`) go to the shards of the listings they name, found from the ids alone, and
say which shards changed; `publish` then uploads the version whole, so no reader sees shards of two
versions. A shard predictor loads one shard (`load_shard`); the transformer fans a query vector out to all and
merges with `lookalike.serving.shard_merge.merge_answers`, which `ShardedIndex.search` uses in-process.

Exactness: with IVF-Flat and one nprobe, each shard's top-k listings are the unsharded index's ranking
restricted to that shard, so the merge returns the same ids in the same order (ties aside). Two cases can
differ, both in the shopper's favour: a shard whose probed lists hold fewer than top_k listings that
pass a filter widens its nprobe on its own (the unsharded index widens only when the whole falls
short), and IVF-PQ's re-ranked short list is taken per shard (k·k_factor candidates from each).
"""
from __future__ import annotations

import json
import tempfile
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.core.artifacts import MANIFEST, sharded_index_repo
from lookalike.predictor.index import VectorIndex
from lookalike.predictor.index.errors import BadIndexInput, CorruptIndex
from lookalike.predictor.index.keys import check_photo_ids, listing_key
from lookalike.predictor.index.listings import SearchResult
from lookalike.predictor.index.refine import RefineCopy
from lookalike.predictor.index.table import ListingTable
from lookalike.serving.shard_merge import ShardAnswer, merge_answers

SHARDS_FILE = "shards.json"
MAX_SHARDS = 256


def shard_of(listing_id: str, shards: int) -> int:
    """The shard a listing lives in: stable across versions, so an update finds it from the id alone."""
    return listing_key(listing_id) % shards


def shard_folder(shard: int) -> str:
    return f"shard-{shard:03d}"


def check_shards(shards: Any) -> int:
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
        raise BadIndexInput(f"shards must be an integer from 1 to {MAX_SHARDS}, got {shards!r}")
    return shards


def split(full: VectorIndex, shards: int) -> list[VectorIndex]:
    """k indexes, each the trained `full` index holding only its shard's listings (same centroids, same
    tuned nprobe, same label vocabulary). Reaches into the index's parts: this module is its sibling."""
    import faiss

    k = check_shards(shards)
    table = full._table
    assignment = table.owners % k  # owners are listing_key(listing_id): shard_of, for every row at once
    out = []
    for s in range(k):
        rows = np.flatnonzero(assignment == s)
        part = ListingTable()
        part.append(table.keys[rows], [table.listing_ids[r] for r in rows], dict(table.vocab),
                    {t: c[rows] for t, c in table.codes.items()}, [table.photo_ids[r] for r in rows])
        drop = np.flatnonzero(assignment != s)
        index = faiss.clone_index(full._index)
        if len(drop):
            removed = index.remove_ids(faiss.IDSelectorBatch(table.keys[drop]))
            if removed != len(drop):
                raise CorruptIndex(f"shard {s}: FAISS removed {removed} vectors of {len(drop)}")
        refine = full._refine
        if refine is not None:
            refine = RefineCopy(refine.codec, refine.codes[rows].copy(), refine.kind, refine.k_factor)
        card = full.card
        card.count, card.listing_count = len(part), part.listing_count
        card.extra = {**card.extra, "shard": s, "shards": k}
        out.append(VectorIndex(index, part, card, refine, use_gpu=False))
    return out


class ShardedIndex:
    """k shards of one index version, searched in-process (the served path fans out instead)."""

    def __init__(self, shards: Sequence[VectorIndex], card: dict[str, Any]) -> None:
        self.shards = list(shards)
        self.card = card

    @classmethod
    def build(cls, vectors: np.ndarray, listing_ids: Sequence[str], labels: Mapping[str, Sequence[str | None]]
              | None = None, *, shards: int, model_version: str, **build: Any) -> ShardedIndex:
        """Build one index (`VectorIndex.build`, same arguments) and split it into `shards`."""
        k = check_shards(shards)
        full = VectorIndex.build(vectors, listing_ids, labels, model_version=model_version, **build)
        return cls.from_index(full, k)

    @classmethod
    def from_index(cls, full: VectorIndex, shards: int) -> ShardedIndex:
        parts = split(full, shards)
        base = full.card
        card = {"model_version": full.model_version, "shards": len(parts), "assignment": "listing_key % shards",
                "index_version": base.index_version, "factory": base.factory, "nlist": base.nlist,
                "nprobe": base.nprobe, "dim": base.dim, "count": full.count, "listing_count": full.listing_count,
                "recall_at_10": base.recall_at_10, "catalogs": base.catalogs, "shard_counts": [p.count for p in parts],
                "shard_listing_counts": [p.listing_count for p in parts],
                "folders": [shard_folder(s) for s in range(len(parts))]}
        return cls(parts, card)

    @property
    def model_version(self) -> str:
        return self.card["model_version"]

    @property
    def version(self) -> str | None:
        return self.card.get("index_version")

    @property
    def listing_count(self) -> int:
        return int(self.card["listing_count"])

    def search(self, queries: np.ndarray, top_k: int = 10, nprobe: int | None = None,
               allowed_ids: Collection[str] | None = None,
               label_filter: Mapping[str, str] | None = None) -> SearchResult:
        """What `VectorIndex.search` answers, from every shard merged (see the module doc)."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= self.listing_count:
            raise BadIndexInput(f"top_k must be from 1 to {self.listing_count} (the listings in the index), "
                                f"got {top_k!r}")
        answers = [search_shard(s, queries, top_k, nprobe, allowed_ids, label_filter) for s in self.shards]
        merged = merge_answers(answers, top_k)
        return SearchResult(merged.listing_ids, merged.scores, np.full(merged.scores.shape, -1, np.int64),
                            nprobe or self.card["nprobe"], merged.photo_ids)

    # ---- updates --------------------------------------------------------------------------------
    def add(self, vectors: np.ndarray, listing_ids: Sequence[str],
            labels: Mapping[str, Sequence[str | None]] | None = None, *,
            photo_ids: Sequence[str] | None = None) -> list[int]:
        """Add photos, each to its listing's shard (`VectorIndex.add` there, no retraining); return the
        shards that changed. All checks run first: a bad batch changes no shard."""
        x = np.asarray(vectors, np.float32)
        ids = list(listing_ids)
        photos = list(photo_ids) if photo_ids is not None else None
        groups = self._by_shard(ids)
        for s, rows in groups.items():  # refuse before touching anything (duplicates, known photos)
            self.shards[s]._table.check_new([ids[r] for r in rows], None if photos is None else
                                            [photos[r] for r in rows])
        for s, rows in groups.items():
            part_labels = None if labels is None else {t: [v[r] for r in rows] for t, v in labels.items()}
            self.shards[s].add(x[rows], [ids[r] for r in rows], part_labels,
                               photo_ids=None if photos is None else [photos[r] for r in rows])
        self._recount()
        return sorted(groups)

    def remove(self, listing_ids: Sequence[str]) -> list[int]:
        """Remove delisted listings from their shards; return the shards that changed. Unknown ids are
        refused before any shard changes."""
        ids = list(listing_ids)
        groups = self._by_shard(ids)
        for s, rows in groups.items():
            self.shards[s]._table.check_known([ids[r] for r in rows])
        for s, rows in groups.items():
            self.shards[s].remove([ids[r] for r in rows])
        self._recount()
        return sorted(groups)

    def replace(self, vectors: np.ndarray, listing_ids: Sequence[str],
                labels: Mapping[str, Sequence[str | None]] | None = None, *,
                photo_ids: Sequence[str] | None = None) -> list[int]:
        """New photos for listings already held, every photo of each replaced in its own shard
        (`VectorIndex.replace` there); return the shards that changed. All checks run first."""
        x = np.asarray(vectors, np.float32)
        ids, photos = check_photo_ids(listing_ids, photo_ids, len(x))
        groups = self._by_shard(ids)
        for s, rows in groups.items():  # refuse before touching anything (unknown listings, key clashes)
            self.shards[s]._table.check_replace([ids[r] for r in rows], [photos[r] for r in rows], None)
        for s, rows in groups.items():
            part_labels = None if labels is None else {t: [v[r] for r in rows] for t, v in labels.items()}
            self.shards[s].replace(x[rows], [ids[r] for r in rows], part_labels, photo_ids=[photos[r] for r in rows])
        self._recount()
        return sorted(groups)

    def __contains__(self, listing_id: object) -> bool:
        """Whether a listing has a photo in its shard (the only shard that can hold it)."""
        return isinstance(listing_id, str) and bool(listing_id) and listing_id in self.shards[
            shard_of(listing_id, len(self.shards))]

    def record_catalogs(self, uris: Sequence[str], shards: Collection[int] | None = None) -> None:
        """Name more catalogs on the version's card (the transformer finds listings' metadata there) and
        on the cards of `shards` (default: all), those holding rows from them."""
        for s in range(len(self.shards)) if shards is None else shards:
            self.shards[s].record_catalogs(uris)
        known = list(self.card.get("catalogs") or [])
        self.card["catalogs"] = known + [u for u in dict.fromkeys(uris) if u not in known]

    def _by_shard(self, ids: list[str]) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        for row, lid in enumerate(ids):
            if not isinstance(lid, str) or not lid:
                raise BadIndexInput(f"listing ids must be non-empty strings, got {lid!r}")
            groups.setdefault(shard_of(lid, len(self.shards)), []).append(row)
        return groups

    def _recount(self) -> None:
        self.card.update(count=sum(p.count for p in self.shards),
                         listing_count=sum(p.listing_count for p in self.shards),
                         shard_counts=[p.count for p in self.shards],
                         shard_listing_counts=[p.listing_count for p in self.shards])

    # ---- persistence ----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        if (directory / MANIFEST).exists():
            raise BadIndexInput(f"{directory} is a published version folder; versions are never edited")
        directory.mkdir(parents=True, exist_ok=True)
        for s, part in enumerate(self.shards):
            part.save(directory / shard_folder(s))
        (directory / SHARDS_FILE).write_text(json.dumps(self.card, indent=2))  # last: the folder is whole
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, model_version: str | None = None,
             verified: bool = False) -> ShardedIndex:
        card = read_card(directory, model_version)
        parts = [load_shard(directory, s, model_version=model_version, verified=verified)
                 for s in range(card["shards"])]
        return cls(parts, card)

    def publish(self, store: Any, *, alias: str | None = None) -> str:
        """Publish every shard as one new version (one MANIFEST over all of them); return it."""
        repo = sharded_index_repo(store, self.model_version)
        version = repo.next_version()
        self.card["parent_version"], self.card["index_version"] = self.card.get("index_version"), version
        with tempfile.TemporaryDirectory(prefix="lookalike-shards-") as tmp:
            self.save(tmp)
            repo.publish(tmp, version=version, metadata={k: self.card[k] for k in
                                                         ("shards", "count", "listing_count", "nprobe")})
        if alias:
            repo.set_alias(alias, version)
        return version

    @classmethod
    def fetch_folder(cls, store: Any, model_version: str, ref: str = "latest") -> Path:
        """Download (verified, cached) a sharded version; its shards then load with `load_shard`."""
        return sharded_index_repo(store, model_version).fetch(ref)


def read_card(directory: str | Path, model_version: str | None = None) -> dict[str, Any]:
    path = Path(directory) / SHARDS_FILE
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
        check_shards(card["shards"])
    except (OSError, ValueError, KeyError, TypeError, BadIndexInput) as exc:
        raise CorruptIndex(f"{directory} is not a sharded index version ({SHARDS_FILE}: {exc})") from exc
    if model_version is not None and card["model_version"] != model_version:
        raise CorruptIndex(f"the sharded index in {directory} was built with model {card['model_version']!r}, "
                           f"not {model_version!r}")
    return card


def load_shard(directory: str | Path, shard: int, *, model_version: str | None = None, verified: bool = False,
               mmap: bool = False) -> VectorIndex:
    """One shard of a sharded version folder, as the shard predictor serves it; refuses a folder whose
    shard is not the one asked for."""
    card = read_card(directory, model_version)
    if not isinstance(shard, int) or not 0 <= shard < card["shards"]:
        raise BadIndexInput(f"shard must be from 0 to {card['shards'] - 1}, got {shard!r}")
    part = VectorIndex.load(Path(directory) / shard_folder(shard), model_version=model_version,
                            verified=verified, mmap=mmap)
    extra = part.card.extra
    if extra.get("shard") != shard or extra.get("shards") != card["shards"]:
        raise CorruptIndex(f"{shard_folder(shard)} in {directory} says it is shard {extra.get('shard')} of "
                           f"{extra.get('shards')}, not {shard} of {card['shards']}")
    return part


def search_shard(part: VectorIndex, queries: np.ndarray, top_k: int, nprobe: int | None,
                 allowed_ids: Collection[str] | None, label_filter: Mapping[str, str] | None) -> ShardAnswer | None:
    """One shard's answer (its top min(top_k, its listings)); None when it holds no listing."""
    k = min(int(top_k), part.listing_count)
    if k < 1:
        return None
    r = part.search(queries, top_k=k, nprobe=nprobe, allowed_ids=allowed_ids, label_filter=label_filter)
    return ShardAnswer(r.listing_ids, r.photo_ids or [[]] * len(r.listing_ids), r.scores)
