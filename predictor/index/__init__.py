"""The vector index: a FAISS index of one model's catalog embeddings, with its listing table and card.

Why this file is long: build, search, update and persist share the object's FAISS index, table and lock,
and tuning (which variants of the built index a query should use) measures them through the same search.
Why one file: split, each module would reach into the others' state on every call.

    vectors [N, D] float32, L2-normalised (cosine = inner product), one per photo
      + listing ids and photo ids (+ labels)
      │ VectorIndex.build: nlist rule, k-means on a sample ≥ 39·nlist, add with 64-bit ids,
      │                    tune nprobe for the target recall (per listing) on a held-out query sample
      ▼
    VectorIndex ── search(queries, top_k, nprobe, allowed_ids | label_filter) → SearchResult:
      │            top_k distinct listings ranked by their best photo, each naming that photo
      │ add / remove / replace photos and listings (no retraining); drift() says when to rebuild
      ▼
    save(dir) / load(dir) · publish(store) → indexes/<model_version>/<index_version>/ · fetch(store, …)

This module is the entry point and holds what an index does: build, search, update, persist. The rest
lives beside it, one concern per module, imported only from here downwards (never back):

- `index_build` trains a new FAISS index from the plan `index_factory` makes of a factory string, on a
  GPU when there is one (`index_gpu`); `index_refine` is IVF-PQ's re-ranking copy;
- `index_keys`: the 63-bit FAISS id of each photo (`photo_key`); `index_table`: the rows (one per photo,
  with its listing and labels for filters); `index_listings`: a photo ranking turned into distinct listings;
- `index_tuning`: the nlist rule, nprobe tuning, recall@k against exact search;
- `index_drift`: when incremental updates have drifted far enough for a rebuild;
- `index_files`: the folder save writes and load reads, checksums verified once;
- `index_checks`, `index_lock`, `index_errors`: input checks, the read-write lock, the errors;
- `lookalike.core.index_card.IndexCard`: index.json, which the transformer reads too.

Thread safety: searches on one object run concurrently (FAISS CPU search is read-only); add, remove
and replace take a write lock, so a search never sees a half-applied update. The predictor swaps whole
VectorIndex objects, which needs nothing from this class.
"""
from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.predictor.index import drift as index_drift
from lookalike.predictor.index import tuning as tuning
from lookalike.predictor.index import kernels
from lookalike.predictor.index.build import QUERY_DEPTHS, graph_of, graph_widened, now, train_index
from lookalike.predictor.index.checks import check_int, check_vectors
from lookalike.predictor.index.errors import BadIndexInput, CorruptIndex, IndexMismatch, VectorIndexError
from lookalike.predictor.index.factory import (DEFAULT_FACTORY, MAX_REFINE_K_FACTOR, PQ_FACTORY, REFINE_K_FACTOR,
                                               choose_factory,
                                               flat_bytes_per_vector, parse_bytes, plan)
from lookalike.predictor.index.files import IndexFolder, read_folder, write_folder
from lookalike.predictor.index.gpu import GPU_MAX_K, add_chunks, gpu_count, make_replica, want_gpu
from lookalike.predictor.index.lock import ReadWriteLock
from lookalike.predictor.index.listings import SearchResult, oversample, top_listings
from lookalike.predictor.index.refine import RefineCopy
from lookalike.predictor.index.stored import StoredVectors, UnknownListing
from lookalike.predictor.index.keys import check_photo_ids, listing_key, listing_keys, photo_key, photo_keys
from lookalike.predictor.index.table import ListingTable
from lookalike.core.index_card import IndexCard

__all__ = ["VectorIndex", "SearchResult", "listing_key", "listing_keys", "photo_key", "photo_keys", "DEFAULT_FACTORY",
           "PQ_FACTORY", "VectorIndexError", "BadIndexInput", "IndexMismatch", "CorruptIndex", "IndexCard", "gpu_count",
           "check_vectors", "parse_bytes", "flat_bytes_per_vector", "REFINE_K_FACTOR", "recall_at_k", "UnknownListing"]

recall_at_k = tuning.recall_at_k

log = logging.getLogger(__name__)

TIMED_QUERIES = 200  # held-out queries timed per variant the tuning tries


class VectorIndex:
    """A FAISS index over one model's catalog embeddings, with its listing table and index card."""

    def __init__(self, index: Any, table: ListingTable, card: IndexCard, refine: RefineCopy | None = None,
                 use_gpu: bool | None = None, mapped: bool = False) -> None:
        import faiss

        self._index = index
        self._table = table
        self._card = card
        card.listing_count = table.listing_count  # absent from the cards of indexes built before it was kept
        self._refine = refine
        self._ivf = faiss.extract_index_ivf(index) if card.kind == "ivf" else None
        self._lock = ReadWriteLock()
        self._params: dict[Any, Any] = {}
        self._use_gpu = want_gpu(use_gpu)
        self._gpu = make_replica(index) if self._use_gpu else None
        self._stored = StoredVectors(index, self._ivf, refine)
        self.mapped = mapped  # the inverted lists are memory-mapped from the index file (`load(mmap=True)`)
        kernels.warm_up()  # compiled once per process, here rather than in a client's first query

    # ---- properties -----------------------------------------------------------------------------
    @property
    def info(self) -> dict[str, Any]:
        """A copy of what index.json holds (without the file checksums), as a dict."""
        return self._card.to_dict(files=False)

    @property
    def card(self) -> IndexCard:
        """A copy of the index card (without file checksums: save records them)."""
        return self._card.copy()

    @property
    def labels(self) -> dict[str, list[str]]:
        """The label vocabulary per task, as the card holds it (not a copy: read it, never change it); what
        filters are checked against on every request, where a copy of the whole card would cost more than
        a shard's search."""
        return self._card.labels

    @property
    def model_version(self) -> str:
        return self._card.model_version

    @property
    def dim(self) -> int:
        return self._card.dim

    @property
    def nlist(self) -> int:
        return self._card.nlist or 0

    @property
    def nprobe(self) -> int | None:
        return self._card.nprobe

    @property
    def version(self) -> str | None:
        """The published index version this object was loaded from or last published as."""
        return self._card.index_version

    @property
    def count(self) -> int:
        """Vectors (photos) in the index."""
        return len(self._table)

    @property
    def listing_count(self) -> int:
        """Distinct listings in the index: what top_k counts."""
        return self._table.listing_count

    def __len__(self) -> int:
        return len(self._table)

    def __repr__(self) -> str:
        return (f"VectorIndex({self._card.factory}, {self.count} × {self.dim}-d of {self.listing_count} listings, "
                f"model {self.model_version}, nprobe {self.nprobe})")

    def __contains__(self, listing_id: object) -> bool:
        """Whether a listing has at least one photo in the index."""
        if not isinstance(listing_id, str):
            return False
        with self._lock.read():
            return bool(self._table.has_listings(np.array([listing_key(listing_id)], np.int64))[0])

    def photos_of(self, listing_id: str) -> list[str]:
        """The photo ids a listing has in the index, in row order (BadIndexInput if it has none)."""
        with self._lock.read():
            _, rows = self._table.check_known([listing_id])
            return [self._table.photo_ids[int(r)] for r in rows]

    def vector_of(self, listing_id: str, photo_id: str | None = None) -> tuple[np.ndarray, str]:
        """The vector the index holds for a listing's photo (its first photo by default) and that photo's
        id: a query for "more like this" without the photo (`lookalike.predictor.index.stored`).
        UnknownListing (404) when the index has no such listing or photo."""
        with self._lock.read():
            return self._stored.of_listing(self._table, listing_id, photo_id)

    def labels_of(self, listing_id: str) -> dict[str, str | None]:
        with self._lock.read():
            _, rows = self._table.check_known([listing_id])
            return self._table.labels_of(int(rows[0]))

    def record_catalogs(self, uris: Sequence[str]) -> None:
        """Name more catalogs the index holds rows from on its card (an update's new listings), after the
        ones it names already, so that whoever serves it finds every listing's title and photos."""
        if isinstance(uris, str) or not all(isinstance(u, str) and u for u in uris):
            raise BadIndexInput("catalogs must be a list of catalog URIs")
        with self._lock.write():
            known = list(self._card.catalogs or [])
            self._card.catalogs = known + [u for u in dict.fromkeys(uris) if u not in known]

    # ---- build ----------------------------------------------------------------------------------
    @classmethod
    def build(cls, vectors: np.ndarray, listing_ids: Sequence[str],
              labels: Mapping[str, Sequence[str | None]] | None = None, *, model_version: str,
              photo_ids: Sequence[str] | None = None,
              factory: str | None = None, target_recall: float = 0.95, seed: int = 0,
              use_gpu: bool | None = None, progress: bool = False, refine_k_factor: int = REFINE_K_FACTOR,
              tune_queries: int = tuning.TUNE_QUERIES, catalogs: Sequence[str] | None = None,
              memory_budget: int | None = None) -> VectorIndex:
        """Train, fill and tune an index.

        vectors: [N, D] float32, L2-normalised, one per photo; listing_ids: the listing of each;
        photo_ids: which photo of its listing each is (default: every vector is its listing's only photo,
        "0", so listing ids must then be distinct); labels: {task: N labels or None} for label filters (a
        listing's labels, on each of its photos). factory: see `lookalike.predictor.index.factory` (default IVF-Flat
        with the nlist rule). target_recall: recall@10 of listings the default nprobe must reach on the
        held-out sample. catalogs: the catalog URIs the listings came from, recorded on the card for the
        transformer. memory_budget: bytes the index may take in a predictor's memory; without a factory,
        the compact IVF-PQ is chosen when IVF-Flat would not fit (`index_factory.choose_factory`).
        """
        x = check_vectors(vectors, None, "vectors")
        n, d = x.shape
        ids, photos = check_photo_ids(listing_ids, photo_ids, n)
        if not isinstance(model_version, str) or not model_version:
            raise BadIndexInput("model_version must name the model whose embeddings these are")
        if not (0.0 < float(target_recall) <= 1.0):
            raise BadIndexInput(f"target_recall must be in (0, 1], got {target_recall!r}")
        refine_k_factor = check_int(refine_k_factor, "refine_k_factor")
        if refine_k_factor < 1:
            raise BadIndexInput("refine_k_factor must be at least 1")
        if catalogs is not None and (isinstance(catalogs, str) or not all(isinstance(c, str) and c for c in catalogs)):
            raise BadIndexInput("catalogs must be a list of catalog URIs")
        table = ListingTable()
        keys = table.check_new(ids, photos)
        vocab, codes = table.encode_labels(labels, n)
        if factory is None and memory_budget is not None:
            factory = choose_factory(n, d, memory_budget)
        built = plan(factory, d, n)
        gpu = want_gpu(use_gpu)
        if built.fallback:
            log.warning("index for model %s: %s", model_version, built.fallback)

        rng = np.random.default_rng(seed)
        trained = train_index(x, keys, built, model_version=model_version, factory=factory, vocab=vocab,
                              catalogs=catalogs, target_recall=target_recall, refine_k_factor=refine_k_factor,
                              rng=rng, seed=seed, gpu=gpu, progress=progress)
        table.append(keys, ids, vocab, codes, photos)
        trained.card.listing_count = table.listing_count
        self = cls(trained.index, table, trained.card, trained.refine, use_gpu=gpu)
        if built.nlist:
            self._tune(x, rng, target_recall, tune_queries, progress)
        self._card.build_seconds = round(time.perf_counter() - trained.started, 2)
        return self

    def _tune(self, x: np.ndarray, rng: np.random.Generator, target: float, n_queries: int,
              progress: bool) -> None:
        n = len(x)
        nq = int(min(max(check_int(n_queries, "tune_queries"), 1), n))

        def search(q: np.ndarray, k: int, nprobe: int) -> np.ndarray:
            return self._search_keys(q, k, nprobe, None, n)[1]

        # the table was built in row order, so row i of x has key i; recall counts listings when a
        # listing has several photos
        table = self._table
        owners_of = None if table.one_photo_each else table.owners_of
        per_listing = oversample(n, table.listing_count, table.max_photos)
        seed = int(rng.integers(2**63))  # every variant tried is measured on the same held-out queries
        truth: dict = {}
        graph = graph_of(self._index)
        refine = self._refine
        first_k = refine.k_factor if refine is not None else 0
        tried = []  # (reached, seconds per query, depth, k_factor, nprobe, curve)
        for depth in (QUERY_DEPTHS if graph is not None else (None,)):
            if graph is not None:
                graph.hnsw.efSearch = depth
            if refine is not None:
                refine.k_factor = first_k
            best_before = -1.0
            while True:
                nprobe, curve, reached = tuning.tune_held_out(search, x, table.keys, nq, np.random.default_rng(seed),
                                                              self.nlist, target, progress, owners_of=owners_of,
                                                              per_listing=per_listing, truth_cache=truth)
                best = max(c["recall_at_10"] for c in curve)
                sample = x[np.random.default_rng(seed).choice(n, min(n, TIMED_QUERIES), replace=False)]
                took = tuning.seconds_per_query(lambda q, p=nprobe: self._search_keys(q, tuning.RECALL_K, p, None, n),
                                                sample)
                tried.append((reached, took, depth, refine.k_factor if refine is not None else None, nprobe, curve))
                # A re-ranked index starts with a short list of REFINE_K_FACTOR·top_k (each candidate costs the
                # query an id lookup and a re-scoring); where that cannot reach the target and a longer one
                # helped, it doubles.
                if (reached or refine is None or refine.k_factor * 2 > MAX_REFINE_K_FACTOR
                        or best <= best_before + 0.005):
                    break
                best_before = best
                refine.k_factor *= 2
        # the fastest variant that reaches the target, else the one closest to it
        reached, _, depth, k_factor, nprobe, curve = min(
            tried, key=lambda t: (not t[0], t[1] if t[0] else -max(c["recall_at_10"] for c in t[5])))
        if graph is not None:
            graph.hnsw.efSearch = depth
            log.info("index for model %s: queries search the coarse graph %d deep", self.model_version, depth)
        if refine is not None:
            refine.k_factor = k_factor
            self._card.refine = refine.describe
        card = self._card
        card.nprobe, card.recall_curve, card.target_reached, card.tune_queries = nprobe, curve, reached, nq
        card.recall_at_10 = next(c["recall_at_10"] for c in curve if c["nprobe"] == nprobe)
        if not reached:
            log.warning("index for model %s: no nprobe reached recall@10 %.3f (best %.3f); default nprobe %d",
                        self.model_version, target, max(c["recall_at_10"] for c in curve), nprobe)

    # ---- search ---------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, top_k: int = 10, nprobe: int | None = None,
               allowed_ids: Collection[str] | None = None,
               label_filter: Mapping[str, str] | None = None) -> SearchResult:
        """The top_k listings per query, each once, ranked by the cosine similarity of its best photo.

        queries: [N, D] (or one [D]) L2-normalised float32. nprobe: lists to visit (default: the tuned
        value; above nlist means all). allowed_ids: only these listing ids (ids not in the index are
        ignored); label_filter: {task: label}, all must match (a label the index never saw matches
        nothing). A query gets top_k listings whenever at least top_k pass the filters: the search asks
        for more photos, and widens nprobe, until they are found. top_k must be between 1 and the number
        of listings in the index.
        """
        q = check_vectors(queries, self.dim, "queries")
        k = check_int(top_k, "top_k")
        if k <= 0:
            raise BadIndexInput(f"top_k must be at least 1, got {k}")
        probe = self._check_nprobe(nprobe)
        self._lock.acquire_read()  # (not a `with`: this path is timed in microseconds)
        try:
            table = self._table
            count = table.listing_count
            if k > count:
                raise BadIndexInput(f"top_k={k} is larger than the index, which holds {count} listings")
            sel, n_photos, n_listings = table.selector(allowed_ids, label_filter)
            rows = None
            if table.one_photo_each:  # a photo search is a listing search
                scores, ids, rows = self._search_keys(q, k, probe, sel, n_photos)
            else:
                scores, ids = top_listings(lambda qq, m: self._search_keys(qq, m, probe, sel, n_photos)[:2],
                                           table.owners_of, q, k, photos=n_photos, listings=n_listings,
                                           per_listing=oversample(len(table), count, table.max_photos))
            listing_ids, photo_ids = table.ids_of(ids, rows)
        finally:
            self._lock.release_read()
        return SearchResult(listing_ids, scores, ids, probe, photo_ids)

    def _check_nprobe(self, nprobe: Any) -> int | None:
        if self._ivf is None:
            return None
        if nprobe is None:
            return int(self._card.nprobe or 1)
        value = check_int(nprobe, "nprobe")
        if value < 1:
            raise BadIndexInput(f"nprobe must be at least 1, got {value}")
        return min(value, self.nlist)

    def _search_keys(self, q: np.ndarray, k: int, nprobe: int | None, sel, n_allowed: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(scores, FAISS ids, their table rows or None) [N, k]; rows short of min(k, n_allowed) results are
        searched again with 4× the probes, up to all lists, so a filter never silently returns fewer than it
        could. The table rows come from the re-ranking, which looks them up anyway."""
        nq = len(q)
        if n_allowed == 0:
            return np.full((nq, k), np.nan, np.float32), np.full((nq, k), -1, np.int64), None
        scores, ids, rows = self._faiss_search(q, k, nprobe, sel, n_allowed)
        need = min(k, n_allowed)
        # The common case: every row complete. FAISS and the re-ranking put a row's missing results (-1) last, so
        # one query is checked with one scalar read (a reduction's code is cold after the list scan: ~3 us).
        if ids.item(need - 1) >= 0 if nq == 1 else ids[:, :need].min() >= 0:
            return scores, ids, rows
        if self._ivf is not None:
            todo = np.flatnonzero((ids[:, :need] < 0).any(axis=1))
            probe = nprobe or 1
            while len(todo) and probe < self.nlist:
                probe = min(self.nlist, probe * 4)
                s2, i2, _ = self._faiss_search(q[todo], k, probe, sel, n_allowed)
                scores[todo], ids[todo] = s2, i2
                todo = todo[(i2[:, :need] < 0).any(axis=1)]
        scores[ids < 0] = np.nan
        return scores, ids, None

    def _faiss_search(self, q: np.ndarray, k: int, nprobe: int | None, sel, n_allowed: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        import faiss

        refine = self._refine
        # The re-ranked search takes a short list k_factor times longer than asked for.
        k_base = refine.short_list(k, n_allowed) if refine is not None else k
        if sel is None:
            params = self._params.get(nprobe)
            if params is None and self._ivf is not None:  # read-only during a search: shared by threads
                params = self._params[nprobe] = faiss.SearchParametersIVF()
                params.nprobe = int(nprobe)
        else:
            if self._ivf is not None:
                params = faiss.SearchParametersIVF()
                params.nprobe = int(nprobe)
            else:
                params = faiss.SearchParameters()
            params.sel = sel
        gpu = self._gpu
        if gpu is not None and sel is None and k_base <= GPU_MAX_K and (nprobe or 0) <= GPU_MAX_K:
            scores, ids = gpu.search(q, k_base, params)
        else:  # FAISS's low-level search: the Python wrapper's checks cost ~10 us a call, ours are done
            n = len(q)
            scores = np.empty((n, k_base), np.float32)
            ids = np.empty((n, k_base), np.int64)
            self._index.search_c(n, faiss.swig_ptr(q), k_base, faiss.swig_ptr(scores), faiss.swig_ptr(ids), params)
        if refine is not None:
            return refine.rerank(q, ids, self._table, k)
        return scores, ids, None

    # ---- updates --------------------------------------------------------------------------------
    def add(self, vectors: np.ndarray, listing_ids: Sequence[str],
            labels: Mapping[str, Sequence[str | None]] | None = None, *, photo_ids: Sequence[str] | None = None,
            progress: bool = False) -> int:
        """Add new photos (of new listings, or new photos of listings already there) without retraining;
        returns how many. Refuses photos already present (use replace) and leaves the index unchanged on
        any bad input. Without photo_ids each vector is its listing's photo "0"."""
        x = check_vectors(vectors, self.dim, "vectors", allow_empty=True)
        ids, photos = check_photo_ids(listing_ids, photo_ids, len(x))
        if not len(x):
            return 0
        with self._lock.write():
            keys = self._table.check_new(ids, photos)
            vocab, codes = self._table.encode_labels(labels, len(x))
            self._insert(x, keys, ids, photos, vocab, codes, progress)
            self._card.added_since_training += len(x)
            self._changed()
        return len(x)

    def remove(self, listing_ids: Sequence[str], photo_ids: Sequence[str] | None = None) -> int:
        """Remove delisted listings, every photo of each (or, with photo_ids, just those photos of those
        listings); returns how many photos went. Refuses unknown ids (nothing is removed then)."""
        with self._lock.write():
            if photo_ids is None:
                keys, rows = self._table.check_known(listing_ids)
            else:
                keys, rows = self._table.check_known_photos(listing_ids, photo_ids)
            if not len(keys):
                return 0
            self._delete(keys, rows)
            self._card.removed_since_training += len(keys)
            self._changed()
        return len(keys)

    def replace(self, vectors: np.ndarray, listing_ids: Sequence[str],
                labels: Mapping[str, Sequence[str | None]] | None = None, *, photo_ids: Sequence[str] | None = None,
                progress: bool = False) -> int:
        """New photos for listings already in the index: every photo a listing had is replaced by the ones
        given for it (remove + add, atomically for searches); returns how many vectors were added.

        Labels of tasks given in `labels` are replaced; the others are kept (each listing's, from its
        first photo before the change)."""
        x = check_vectors(vectors, self.dim, "vectors", allow_empty=True)
        ids, photos = check_photo_ids(listing_ids, photo_ids, len(x))
        if not len(x):
            return 0
        with self._lock.write():
            old_keys, old_rows, new_keys, vocab, codes = self._table.check_replace(ids, photos, labels)
            self._delete(old_keys, old_rows)
            self._insert(x, new_keys, ids, photos, vocab, codes, progress)
            self._card.added_since_training += len(x)
            self._card.removed_since_training += len(old_keys)
            self._changed()
        return len(x)

    def _insert(self, x: np.ndarray, keys: np.ndarray, ids: list[str], photos: list[str],
                vocab: dict[str, list[str]], codes: dict[str, np.ndarray], progress: bool) -> None:
        refine_codes = self._refine.encode(x) if self._refine is not None else None
        if self._ivf is not None:  # how well the new vectors fit the trained clusters (drift)
            index_drift.record_added_fit(self._card, self._ivf, x)
        with graph_widened(self._index):
            add_chunks(self._index, x, keys, progress, "adding")
        self._table.append(keys, ids, vocab, codes, photos)
        if refine_codes is not None:
            self._refine.append(refine_codes)

    def _delete(self, keys: np.ndarray, rows: np.ndarray) -> None:
        import faiss

        removed = self._index.remove_ids(faiss.IDSelectorBatch(keys))
        if removed != len(keys):
            raise CorruptIndex(f"FAISS removed {removed} vectors for {len(keys)} photos: the index and its "
                               f"listing table disagree; rebuild the index")
        self._table.delete_rows(rows)
        if self._refine is not None:
            self._refine.delete(rows)

    def _changed(self) -> None:
        self._card.count = len(self._table)
        self._card.listing_count = self._table.listing_count
        self._card.updated_at = now()
        if self._use_gpu:
            self._gpu = make_replica(self._index)

    # ---- drift ----------------------------------------------------------------------------------
    def drift(self) -> dict[str, Any]:
        """How far the index has moved since its k-means was trained, and whether a rebuild is due (see
        `lookalike.predictor.index.drift.drift_report` for the fields)."""
        with self._lock.read():
            return index_drift.drift_report(self._card, len(self._table), self._ivf)

    # ---- persistence ----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the index folder (see `lookalike.predictor.index.files`); index.json last, with every file's sha256."""
        with self._lock.read():
            return self._save(directory, self._card.copy())

    def _save(self, directory: str | Path, card: IndexCard) -> Path:
        folder = write_folder(directory, self._index, self._table, card, self._refine)
        self._card.bytes_per_vector = card.bytes_per_vector  # measured on the files just written
        return folder

    @classmethod
    def load(cls, directory: str | Path, *, model_version: str | None = None, dim: int | None = None,
             use_gpu: bool | None = None, verified: bool = False, mmap: bool = False) -> VectorIndex:
        """Load an index folder; refuses another model version or dimension (IndexMismatch) and any
        missing, truncated or altered file (CorruptIndex).

        Unless `verified` (the caller checked every file already, as `fetch` does), the files are verified
        once: against MANIFEST.json in a published version folder, else against index.json's checksums.
        """
        parts: IndexFolder = read_folder(directory, model_version=model_version, dim=dim, verified=verified,
                                         mmap=mmap)
        return cls(parts.index, parts.table, parts.card, parts.refine, use_gpu=use_gpu, mapped=mmap)

    def publish(self, store: Any, *, alias: str | None = None) -> str:
        """Publish as a new version under indexes/<model_version>/ (never editing one); return it.

        `alias` (e.g. "production") is pointed at the new version."""
        from lookalike.core.artifacts import index_repo

        repo = index_repo(store, self.model_version)
        version = repo.next_version()  # sorts after every published version, so "latest" finds it
        with tempfile.TemporaryDirectory(prefix="lookalike-index-") as tmp:
            with self._lock.read():  # not during the upload: updates (and searches behind them) would wait
                card = self._card.copy(index_version=version, parent_version=self._card.index_version)
                self._save(tmp, card)
            repo.publish(tmp, version=version, metadata=card.summary())
        with self._lock.write():
            self._card.index_version, self._card.parent_version = card.index_version, card.parent_version
        if alias:
            repo.set_alias(alias, version)
        return version

    @classmethod
    def fetch(cls, store: Any, model_version: str, ref: str = "latest", dim: int | None = None, *,
              use_gpu: bool | None = None, mmap: bool = False) -> VectorIndex:
        """Download (verified, cached) and load an index version of `model_version`: a version, an alias
        or "latest"; `mmap` maps its lists from the cached file (see `load`)."""
        from lookalike.core.artifacts import index_repo

        path = index_repo(store, model_version).fetch(ref)  # checks every file against the manifest
        return cls.load(path, model_version=model_version, dim=dim, use_gpu=use_gpu, verified=True, mmap=mmap)
