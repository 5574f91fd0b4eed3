"""The FAISS index of a model's catalog embeddings: build, tune, add, remove, replace, search, save, publish.

    vectors [N, D] float32, L2-normalised (cosine = inner product) + listing ids (+ labels)
      │ VectorIndex.build: nlist rule, k-means on a sample ≥ 39·nlist, add with 64-bit ids,
      │                    tune nprobe for the target recall on a held-out query sample
      ▼
    VectorIndex ── search(queries, top_k, nprobe, allowed_ids | label_filter) → SearchResult
      │ add / remove / replace by listing id (no retraining); drift() says when to rebuild
      ▼
    publish(store) → indexes/<model_version>/<index_version>/   (a new version every time)
        index.faiss       the FAISS index (IVF with ids, or exact IndexIDMap(Flat) for small catalogs)
        refine.faiss      codec of the re-ranking copy (IVF-PQ only), refine_codes.npy its codes
        listings.npz      64-bit keys and label codes;  listing_ids.json  the catalog listing ids
        index.json        model version, dim, metric, factory, nlist, nprobe, count, recall curve,
                          drift counters, label vocabularies, sha256 of every file

Factories (the `factory` setting, FAISS index_factory strings with placeholders):

- ``IVF{nlist},Flat`` (default): exact vectors in the lists; recall limited only by nprobe.
- ``IVF{nlist},PQ{m}x4fsr,Refine(SQ8)`` (`PQ_FACTORY`): 4-bit fast-scan PQ codes of the residuals
  (D/8 bytes) find a short list of `refine_k_factor`·top_k candidates that are re-ranked from an 8-bit
  scalar-quantized copy (D bytes): under a third of IVF-Flat's memory. ``Refine(SQfp16)`` and
  ``Refine(Flat)`` (= ``RFlat``) re-rank from fp16 or exact copies instead. The refine step is ours
  rather than FAISS's IndexRefine so that it keeps working with ids, removals and filters.
- ``{nlist}`` is chosen by `predictor.index_tuning.choose_nlist`; ``{m}`` is D/4. A catalog too small
  to train ``{nlist}`` lists falls back to exact search (``index.json``: kind "exact", and
  ``exact_fallback`` says why; a warning is logged). ``Flat`` asks for exact search outright.

GPU: with faiss-gpu and a CUDA device (``faiss.get_num_gpus() > 0``), the build trains and adds on
device 0 (`index_cpu_to_gpu`) and unfiltered searches run on a GPU replica; filtered searches, nprobe or
k above the GPU's 2048 limit, and index types the GPU lacks (fast-scan PQ trains there, searches on
CPU) run on the CPU copy, which is always the one saved. Nothing needs a GPU.

Thread safety: searches on one object run concurrently (FAISS CPU search is read-only); add, remove
and replace take a write lock, so a search never sees a half-applied update. The predictor swaps whole
VectorIndex objects, which needs nothing from this class.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import re
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Collection, Iterator, Mapping, Sequence

import numpy as np

from predictor.index_errors import BadIndexInput, CorruptIndex, IndexMismatch, VectorIndexError
from predictor.index_table import ListingTable, check_listing_ids, listing_key, listing_keys
from predictor import index_tuning as tuning

__all__ = ["VectorIndex", "SearchResult", "listing_key", "listing_keys", "DEFAULT_FACTORY", "PQ_FACTORY",
           "VectorIndexError", "BadIndexInput", "IndexMismatch", "CorruptIndex"]

log = logging.getLogger(__name__)

FORMAT = 1
METRIC = "inner_product"
DEFAULT_FACTORY = "IVF{nlist},Flat"
PQ_FACTORY = "IVF{nlist},PQ{m}x4fsr,Refine(SQ8)"
EXACT_FACTORY = "Flat"
REFINE_K_FACTOR = 20           # re-ranked short list: 20·top_k PQ candidates (1M yardstick: recall 0.93 vs 0.85 at 10)
NORM_TOLERANCE = 1e-3          # |‖x‖ - 1| allowed: float32 embeddings are normalised far better
ADD_CHUNK = 65_536
GPU_MAX_K = 2048               # FAISS GPU limit for k and nprobe

INDEX_FILE = "index.faiss"
REFINE_FILE = "refine.faiss"
REFINE_CODES_FILE = "refine_codes.npy"
INFO_FILE = "index.json"

# When drift() says a full rebuild (new k-means) is due.
MAX_ADDED_FRACTION = 0.20      # vectors added since training / vectors trained on
MAX_REMOVED_FRACTION = 0.20
MAX_IMBALANCE_GROWTH = 1.25    # list-size imbalance factor vs right after training
MAX_FIT_DROP = 0.05            # mean cosine to the nearest centroid: added vectors vs the training sample

_REFINE_RE = re.compile(r",(?:Refine\((SQ8|SQfp16|Flat)\)|(RFlat))$")
_IVF_RE = re.compile(r"^IVF(\d+)")


# ---- results and locking -----------------------------------------------------------------------

@dataclass
class SearchResult:
    """Top-k per query, best first.

    listing_ids: per query the listing ids found (shorter than k only when fewer listings pass the
    filter); scores [N, k] float32 cosine similarity, NaN where no listing; ids [N, k] int64 FAISS
    keys (`listing_key`), -1 where no listing; nprobe: the lists visited first (the search widens it
    for a query that would otherwise come back short).
    """

    listing_ids: list[list[str]]
    scores: np.ndarray
    ids: np.ndarray
    nprobe: int | None = None

    def __len__(self) -> int:
        return len(self.listing_ids)


class _ReadWriteLock:
    """Many readers or one writer; a waiting writer holds off new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def acquire_read(self) -> None:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
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


# ---- input checks -------------------------------------------------------------------------------

def check_vectors(vectors: Any, dim: int | None, what: str = "vectors", allow_empty: bool = False) -> np.ndarray:
    """A C-contiguous float32 [N, D] array of finite, L2-normalised rows; a clear error otherwise.

    A single 1-D vector is taken as a batch of one.
    """
    arr = vectors if isinstance(vectors, np.ndarray) else np.asarray(vectors)
    if arr.dtype.kind != "f":
        raise BadIndexInput(f"{what} must be floating-point (float32 embeddings), got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise BadIndexInput(f"{what} must be a 2-D array [N, D], got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0 and not allow_empty:
        raise BadIndexInput(f"{what}: got an empty batch (0 vectors)")
    if dim is not None and arr.shape[1] != dim:
        raise BadIndexInput(f"{what} are {arr.shape[1]}-d but this index holds {dim}-d vectors: embed with the "
                            f"model the index was built for")
    if dim is None and arr.shape[1] < 1:
        raise BadIndexInput(f"{what} have no dimensions (shape {tuple(arr.shape)})")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.shape[0] == 0:
        return arr
    # One pass serves both checks: NaN or inf in a row makes its squared norm non-finite too.
    sq = np.einsum("ij,ij->i", arr, arr)
    if not np.abs(sq - 1.0).max() <= 2 * NORM_TOLERANCE:   # |‖x‖² - 1| ≈ 2·|‖x‖ - 1|; NaN fails too
        bad = ~(np.abs(sq - 1.0) <= 2 * NORM_TOLERANCE)
        finite = np.isfinite(arr).all(axis=1)
        if not finite.all():
            rows = np.flatnonzero(~finite)
            raise BadIndexInput(f"{what} contain NaN or infinite values (rows {rows[:5].tolist()}"
                                f"{' …' if len(rows) > 5 else ''}); nothing was changed")
        rows = np.flatnonzero(bad)
        raise BadIndexInput(f"{what} must be L2-normalised (cosine similarity is the inner product): row "
                            f"{rows[0]} has norm {math.sqrt(float(sq[rows[0]])):.4f} ({len(rows)} such rows). "
                            f"Divide each vector by its norm first")
    return arr


def _check_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            return int(value)
        raise BadIndexInput(f"{name} must be an integer, got {value!r}")
    return int(value)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---- factory strings ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Plan:
    base: str                  # what faiss.index_factory builds ("Flat" for exact search)
    refine: str | None         # SQ8 | SQfp16 | Flat | None
    nlist: int                 # 0 for exact search
    fallback: str | None       # why an IVF request fell back to exact search


def _plan(factory: str | None, dim: int, n: int) -> _Plan:
    setting = factory or DEFAULT_FACTORY
    if not isinstance(setting, str):
        raise BadIndexInput(f"factory must be a FAISS index_factory string, got {setting!r}")
    refine = None
    match = _REFINE_RE.search(setting)
    if match:
        refine = match.group(1) or "Flat"
        setting = setting[:match.start()]
    if "{m}" in setting:
        if dim % 4:
            raise BadIndexInput(f"factory {factory!r} uses {{m}} = D/4 sub-quantizers, but D={dim} is not a "
                                f"multiple of 4; write the PQ size explicitly")
        setting = setting.replace("{m}", str(dim // 4))
    if setting == EXACT_FACTORY:
        return _Plan(EXACT_FACTORY, None, 0, None)
    if "{nlist}" in setting:
        nlist = tuning.choose_nlist(n)
        if nlist == 0:
            reason = (f"{n} vectors are too few to train an IVF index (at least "
                      f"{tuning.MIN_POINTS_PER_CENTROID * tuning.MIN_NLIST} needed): using exact search")
            return _Plan(EXACT_FACTORY, None, 0, reason)
        setting = setting.replace("{nlist}", str(nlist))
    ivf = _IVF_RE.match(setting)
    if not ivf:
        raise BadIndexInput(f"factory {factory!r} is not supported: use an IVF factory such as "
                            f"{DEFAULT_FACTORY!r} or {PQ_FACTORY!r}, or {EXACT_FACTORY!r} for exact search")
    nlist = int(ivf.group(1))
    if n < tuning.MIN_POINTS_PER_CENTROID * nlist:
        raise BadIndexInput(f"factory {factory!r} asks for {nlist} lists, which needs at least "
                            f"{tuning.MIN_POINTS_PER_CENTROID * nlist} training vectors; got {n}. Use "
                            f"'{{nlist}}' to let the index choose")
    return _Plan(setting, refine, nlist, None)


def _refine_codec(kind: str, dim: int):
    import faiss

    if kind == "SQ8":
        return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    if kind == "SQfp16":
        return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    return faiss.IndexFlatIP(dim)


# ---- GPU ----------------------------------------------------------------------------------------

def gpu_count() -> int:
    """CUDA devices FAISS can use (0 with faiss-cpu)."""
    import faiss

    try:
        return int(faiss.get_num_gpus()) if hasattr(faiss, "StandardGpuResources") else 0
    except Exception:  # a faiss-gpu build without a usable driver
        return 0


class _GpuReplica:
    """A copy of the index on GPU 0 and its resources; searches on it are serialised (FAISS GPU indexes
    are not safe for concurrent calls)."""

    def __init__(self, cpu_index) -> None:
        import faiss

        self.resources = faiss.StandardGpuResources()
        options = faiss.GpuClonerOptions()
        options.useFloat16 = False          # keep IVF-Flat vectors exact: same results as the CPU
        self.index = faiss.index_cpu_to_gpu(self.resources, 0, cpu_index, options)
        self.lock = threading.Lock()

    def search(self, queries: np.ndarray, k: int, params) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            return self.index.search(queries, k, params=params)


def _make_replica(cpu_index) -> _GpuReplica | None:
    try:
        return _GpuReplica(cpu_index)
    except Exception as exc:  # e.g. fast-scan PQ has no GPU implementation
        log.warning("searching on the CPU: this index type cannot be copied to the GPU (%s)", exc)
        return None


# ---- the index ----------------------------------------------------------------------------------

class VectorIndex:
    """A FAISS index over one model's catalog embeddings, with its listing table and index.json."""

    def __init__(self, index, table: ListingTable, info: dict[str, Any], refine_codec=None,
                 refine_codes: np.ndarray | None = None, use_gpu: bool | None = None) -> None:
        import faiss

        self._index = index
        self._table = table
        self._info = info
        self._refine_codec = refine_codec
        self._refine_codes = refine_codes
        self._ivf = faiss.extract_index_ivf(index) if info["kind"] == "ivf" else None
        self._lock = _ReadWriteLock()
        self._filters: dict[Any, tuple[Any, int]] = {}
        self._params: dict[Any, Any] = {}
        self._decoder = None
        self._use_gpu = gpu_count() > 0 if use_gpu is None else bool(use_gpu)
        if self._use_gpu and gpu_count() == 0:
            raise BadIndexInput("use_gpu=True but FAISS sees no GPU (faiss-cpu, or no CUDA device)")
        self._gpu = _make_replica(index) if self._use_gpu else None

    # ---- properties -----------------------------------------------------------------------------
    @property
    def info(self) -> dict[str, Any]:
        """A copy of what index.json holds (without the file checksums)."""
        return copy.deepcopy(self._info)

    @property
    def model_version(self) -> str:
        return self._info["model_version"]

    @property
    def dim(self) -> int:
        return int(self._info["dim"])

    @property
    def nlist(self) -> int:
        return int(self._info["nlist"] or 0)

    @property
    def nprobe(self) -> int | None:
        return self._info["nprobe"]

    @property
    def version(self) -> str | None:
        """The published index version this object was loaded from or last published as."""
        return self._info.get("index_version")

    @property
    def count(self) -> int:
        return len(self._table)

    def __len__(self) -> int:
        return len(self._table)

    def __repr__(self) -> str:
        return (f"VectorIndex({self._info['factory']}, {self.count} × {self.dim}-d, model {self.model_version}, "
                f"nprobe {self.nprobe})")

    def __contains__(self, listing_id: object) -> bool:
        if not isinstance(listing_id, str):
            return False
        with self._lock.read():
            return bool(self._table.contains(np.array([listing_key(listing_id)], np.int64))[0])

    def labels_of(self, listing_id: str) -> dict[str, str | None]:
        with self._lock.read():
            _, rows = self._table.check_known([listing_id])
            return self._table.labels_of(int(rows[0]))

    # ---- build ----------------------------------------------------------------------------------
    @classmethod
    def build(cls, vectors: np.ndarray, listing_ids: Sequence[str],
              labels: Mapping[str, Sequence[str | None]] | None = None, *, model_version: str,
              factory: str | None = None, target_recall: float = 0.95, seed: int = 0,
              use_gpu: bool | None = None, progress: bool = False, refine_k_factor: int = REFINE_K_FACTOR,
              tune_queries: int = tuning.TUNE_QUERIES) -> "VectorIndex":
        """Train, fill and tune an index.

        vectors: [N, D] float32, L2-normalised; listing_ids: N distinct strings; labels: {task: N labels
        or None} for label filters. factory: see the module doc (default IVF-Flat with the nlist rule).
        target_recall: recall@10 the default nprobe must reach on the held-out sample.
        """
        import faiss

        x = check_vectors(vectors, None, "vectors")
        n, d = x.shape
        ids = check_listing_ids(listing_ids, n)
        if not isinstance(model_version, str) or not model_version:
            raise BadIndexInput("model_version must name the model whose embeddings these are")
        if not (0.0 < float(target_recall) <= 1.0):
            raise BadIndexInput(f"target_recall must be in (0, 1], got {target_recall!r}")
        refine_k_factor = _check_int(refine_k_factor, "refine_k_factor")
        if refine_k_factor < 1:
            raise BadIndexInput("refine_k_factor must be at least 1")
        table = ListingTable()
        keys = table.check_new(ids)
        vocab, codes = table.encode_labels(labels, n)
        plan = _plan(factory, d, n)
        gpu = gpu_count() > 0 if use_gpu is None else bool(use_gpu)
        if gpu and gpu_count() == 0:
            raise BadIndexInput("use_gpu=True but FAISS sees no GPU (faiss-cpu, or no CUDA device)")
        if plan.fallback:
            log.warning("index for model %s: %s", model_version, plan.fallback)

        rng = np.random.default_rng(seed)
        started = time.perf_counter()
        refine_codec = refine_codes = None
        fit = None
        built_on = "cpu"
        if plan.nlist == 0:
            index = faiss.IndexIDMap(faiss.IndexFlatIP(d))
            _add_chunks(index, x, keys, progress, "adding (exact)")
        else:
            try:
                index = faiss.index_factory(d, plan.base, faiss.METRIC_INNER_PRODUCT)
            except RuntimeError as exc:
                raise BadIndexInput(f"FAISS cannot build factory {plan.base!r} for {d}-d vectors: "
                                    f"{str(exc).splitlines()[0]}") from exc
            ivf = faiss.extract_index_ivf(index)
            ivf.cp.seed = seed
            ivf.cp.spherical = True  # centroids on the unit sphere, like the vectors
            sample = np.sort(rng.choice(n, tuning.training_sample_size(n, plan.nlist), replace=False))
            xt = x[sample]
            index, built_on = _train_and_add(index, xt, x, keys, gpu, progress)
            ivf = faiss.extract_index_ivf(index)
            fit = _centroid_fit(ivf, xt)
            if plan.refine:
                refine_codec = _refine_codec(plan.refine, d)
                refine_codec.train(xt)
                refine_codes = _encode(refine_codec, x)
        table.append(keys, ids, vocab, codes)
        factory_str = plan.base + (f",Refine({plan.refine})" if plan.refine else "")
        info: dict[str, Any] = {
            "format": FORMAT,
            "model_version": model_version,
            "dim": d,
            "metric": METRIC,
            "factory": factory_str,
            "factory_setting": factory or DEFAULT_FACTORY,
            "kind": "exact" if plan.nlist == 0 else "ivf",
            "exact_fallback": plan.fallback,
            "nlist": plan.nlist or None,
            "nprobe": None,
            "count": n,
            "recall_at_10": 1.0 if plan.nlist == 0 else None,
            "target_recall": float(target_recall),
            "target_reached": True if plan.nlist == 0 else None,
            "recall_curve": [],
            "tune_queries": 0,
            "refine": {"codec": plan.refine, "k_factor": refine_k_factor} if plan.refine else None,
            "labels": vocab,
            "seed": int(seed),
            "train_sample": int(len(xt)) if plan.nlist else 0,
            "built_on": built_on,
            "built_at": _now(),
            "updated_at": None,
            "build_seconds": None,
            "trained_count": n,            # vectors in the index when its centroids were trained
            "added_since_training": 0,
            "removed_since_training": 0,
            "imbalance_at_training": None,
            "centroid_fit_at_training": fit,
            "centroid_fit_added": None,
            "index_version": None,
            "parent_version": None,
            "faiss_version": faiss.__version__,
        }
        self = cls(index, table, info, refine_codec, refine_codes, use_gpu=gpu)
        if plan.nlist:
            self._info["imbalance_at_training"] = self._imbalance()
            self._tune(x, rng, target_recall, tune_queries, progress)
        self._info["build_seconds"] = round(time.perf_counter() - started, 2)
        return self

    def _tune(self, x: np.ndarray, rng: np.random.Generator, target: float, n_queries: int,
              progress: bool) -> None:
        n = len(x)
        nq = int(min(max(_check_int(n_queries, "tune_queries"), 1), n))
        rows = np.sort(rng.choice(n, nq, replace=False))
        queries = x[rows]
        exact = tuning.exact_neighbours(queries, x, tuning.RECALL_K + 1)
        keys = self._table.keys  # built in row order, so row i of x is key i
        truth = tuning.drop_self(np.where(exact >= 0, keys[exact.clip(0)], -1), keys[rows], tuning.RECALL_K)

        def search(q: np.ndarray, k: int, nprobe: int) -> np.ndarray:
            return self._search_keys(q, k, nprobe, None, n)[1]

        nprobe, curve, reached = tuning.tune_nprobe(search, queries, keys[rows], truth, self.nlist, target, progress)
        self._info.update(nprobe=nprobe, recall_curve=curve, target_reached=reached, tune_queries=nq,
                          recall_at_10=next(c["recall_at_10"] for c in curve if c["nprobe"] == nprobe))
        if not reached:
            log.warning("index for model %s: no nprobe reached recall@10 %.3f (best %.3f); default nprobe %d",
                        self.model_version, target, max(c["recall_at_10"] for c in curve), nprobe)

    # ---- search ---------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, top_k: int = 10, nprobe: int | None = None,
               allowed_ids: Collection[str] | None = None,
               label_filter: Mapping[str, str] | None = None) -> SearchResult:
        """The top_k listings per query by cosine similarity.

        queries: [N, D] (or one [D]) L2-normalised float32. nprobe: lists to visit (default: the tuned
        value; above nlist means all). allowed_ids: only these listing ids (ids not in the index are
        ignored); label_filter: {task: label}, all must match (a label the index never saw matches
        nothing). With a filter, a query gets top_k results whenever at least top_k listings pass it: the
        search widens nprobe until they are found. top_k must be between 1 and the index's count.
        """
        q = check_vectors(queries, self.dim, "queries")
        k = _check_int(top_k, "top_k")
        if k <= 0:
            raise BadIndexInput(f"top_k must be at least 1, got {k}")
        probe = self._check_nprobe(nprobe)
        self._lock.acquire_read()  # (not a `with`: this path is timed in microseconds)
        try:
            count = len(self._table)
            if k > count:
                raise BadIndexInput(f"top_k={k} is larger than the index, which holds {count} listings")
            sel, n_allowed = self._selector(allowed_ids, label_filter)
            scores, ids = self._search_keys(q, k, probe, sel, n_allowed)
            listing_ids = self._table.listing_ids_of(ids)
        finally:
            self._lock.release_read()
        return SearchResult(listing_ids, scores, ids, probe)

    def _check_nprobe(self, nprobe: Any) -> int | None:
        if self._ivf is None:
            return None
        if nprobe is None:
            return int(self._info["nprobe"] or 1)
        value = _check_int(nprobe, "nprobe")
        if value < 1:
            raise BadIndexInput(f"nprobe must be at least 1, got {value}")
        return min(value, self.nlist)

    def _selector(self, allowed_ids, label_filter) -> tuple[Any, int]:
        """(FAISS IDSelector or None, how many listings pass). Label-only filters are cached until the
        next update, as the predictor filters on the same few predicted labels over and over."""
        import faiss

        if allowed_ids is None and not label_filter:
            return None, len(self._table)
        cache_key = None
        if allowed_ids is None and isinstance(label_filter, Mapping):
            try:
                cache_key = tuple(sorted(label_filter.items()))
                hash(cache_key)
            except TypeError:
                cache_key = None
            if cache_key in self._filters:
                return self._filters[cache_key]
        keys = self._table.filter_keys(allowed_ids, label_filter)
        if len(keys) == len(self._table):
            entry: tuple[Any, int] = (None, len(keys))
        else:
            entry = (faiss.IDSelectorBatch(keys), len(keys))
        if cache_key is not None:
            if len(self._filters) > 64:
                self._filters.clear()
            self._filters[cache_key] = entry
        return entry

    def _search_keys(self, q: np.ndarray, k: int, nprobe: int | None, sel, n_allowed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, FAISS ids) [N, k]; rows short of min(k, n_allowed) results are searched again with
        4× the probes, up to all lists, so a filter never silently returns fewer than it could."""
        nq = len(q)
        if n_allowed == 0:
            return np.full((nq, k), np.nan, np.float32), np.full((nq, k), -1, np.int64)
        scores, ids = self._faiss_search(q, k, nprobe, sel, n_allowed)
        need = min(k, n_allowed)
        if ids[:, :need].min() >= 0:  # the common case: every row complete
            return scores, ids
        if self._ivf is not None:
            todo = np.flatnonzero((ids[:, :need] < 0).any(axis=1))
            probe = nprobe or 1
            while len(todo) and probe < self.nlist:
                probe = min(self.nlist, probe * 4)
                s2, i2 = self._faiss_search(q[todo], k, probe, sel, n_allowed)
                scores[todo], ids[todo] = s2, i2
                todo = todo[(i2[:, :need] < 0).any(axis=1)]
        scores[ids < 0] = np.nan
        return scores, ids

    def _faiss_search(self, q: np.ndarray, k: int, nprobe: int | None, sel, n_allowed: int
                      ) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        refine = self._refine_codec is not None
        # The re-ranked search takes a short list k_factor times longer than asked for.
        k_base = max(1, min(k * self._info["refine"]["k_factor"], n_allowed)) if refine else k
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
        if refine:
            scores, ids = self._rerank(q, ids, k)
        return scores, ids

    def _rerank(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Re-score candidates from the re-ranking copy; keep the best k."""
        valid = cand >= 0
        scores = np.full(cand.shape, -np.inf, np.float32)
        if valid.any():
            rows = self._table.rows_of(cand[valid])
            vecs = self._decode(self._refine_codes[rows])
            qi = np.nonzero(valid)[0]
            scores[valid] = np.einsum("ij,ij->i", vecs, q[qi])
        if cand.shape[1] < k:  # fewer candidates than k (tiny filtered sets): pad
            pad = k - cand.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            cand = np.pad(cand, ((0, 0), (0, pad)), constant_values=-1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top_s = np.take_along_axis(scores, order, axis=1)
        top_i = np.take_along_axis(cand, order, axis=1)
        top_i[~np.isfinite(top_s)] = -1
        return top_s, top_i

    def _decode(self, codes: np.ndarray) -> np.ndarray:
        """The re-ranking copy's vectors, decoded in numpy: FAISS's sa_decode opens an OpenMP region per
        call, which costs milliseconds per query on a busy machine."""
        decode = self._decoder
        if decode is None:
            import faiss

            kind = self._info["refine"]["codec"]
            if kind == "SQ8":
                trained = faiss.vector_to_array(self._refine_codec.sq.trained).astype(np.float32)
                vmin, vdiff = trained[:self.dim], trained[self.dim:] / 255.0
                decode = lambda c: vmin + (c.astype(np.float32) + 0.5) * vdiff  # noqa: E731 - faiss's 8-bit rule
            elif kind == "SQfp16":
                decode = lambda c: c.view(np.float16).astype(np.float32)  # noqa: E731
            else:
                decode = lambda c: c.view(np.float32)  # noqa: E731
            self._decoder = decode
        return decode(codes)

    # ---- updates --------------------------------------------------------------------------------
    def add(self, vectors: np.ndarray, listing_ids: Sequence[str],
            labels: Mapping[str, Sequence[str | None]] | None = None, *, progress: bool = False) -> int:
        """Add new listings without retraining; returns how many. Refuses ids already present (use
        replace) and leaves the index unchanged on any bad input."""
        x = check_vectors(vectors, self.dim, "vectors", allow_empty=True)
        ids = check_listing_ids(listing_ids, len(x))
        if not len(x):
            return 0
        with self._lock.write():
            keys = self._table.check_new(ids)
            vocab, codes = self._table.encode_labels(labels, len(x))
            self._insert(x, keys, ids, vocab, codes, progress)
            self._info["added_since_training"] += len(x)
            self._changed()
        return len(x)

    def remove(self, listing_ids: Sequence[str]) -> int:
        """Remove delisted listings; returns how many. Refuses unknown ids (nothing is removed then)."""
        with self._lock.write():
            keys, rows = self._table.check_known(listing_ids)
            if not len(keys):
                return 0
            self._delete(keys, rows)
            self._info["removed_since_training"] += len(keys)
            self._changed()
        return len(keys)

    def replace(self, vectors: np.ndarray, listing_ids: Sequence[str],
                labels: Mapping[str, Sequence[str | None]] | None = None, *, progress: bool = False) -> int:
        """New vectors for listings already in the index (remove + add, atomically for searches).

        Labels of tasks given in `labels` are replaced; the others are kept."""
        x = check_vectors(vectors, self.dim, "vectors", allow_empty=True)
        ids = check_listing_ids(listing_ids, len(x))
        if not len(x):
            return 0
        with self._lock.write():
            keys, rows = self._table.check_known(ids)
            vocab, codes = self._table.encode_labels(labels, len(x))
            given = set(labels or {})
            for task in self._table.vocab:
                if task not in given:
                    codes[task] = self._table.codes[task][rows].copy()
            self._delete(keys, rows)
            self._insert(x, keys, ids, vocab, codes, progress)
            self._info["added_since_training"] += len(x)
            self._info["removed_since_training"] += len(x)
            self._changed()
        return len(x)

    def _insert(self, x, keys, ids, vocab, codes, progress) -> None:
        refine_codes = _encode(self._refine_codec, x) if self._refine_codec is not None else None
        if self._ivf is not None:  # how well the new vectors fit the trained clusters (drift)
            prev_n = self._info["added_since_training"]
            prev = self._info["centroid_fit_added"]
            total = (prev * prev_n if prev is not None else 0.0) + _centroid_fit(self._ivf, x) * len(x)
            self._info["centroid_fit_added"] = total / (prev_n + len(x))
        _add_chunks(self._index, x, keys, progress, "adding")
        self._table.append(keys, ids, vocab, codes)
        if refine_codes is not None:
            self._refine_codes = np.concatenate([self._refine_codes, refine_codes])

    def _delete(self, keys: np.ndarray, rows: np.ndarray) -> None:
        import faiss

        removed = self._index.remove_ids(faiss.IDSelectorBatch(keys))
        if removed != len(keys):
            raise CorruptIndex(f"FAISS removed {removed} vectors for {len(keys)} listings: the index and its "
                               f"listing table disagree; rebuild the index")
        self._table.delete_rows(rows)
        if self._refine_codes is not None:
            self._refine_codes = np.delete(self._refine_codes, rows, axis=0)

    def _changed(self) -> None:
        self._info["count"] = len(self._table)
        self._info["updated_at"] = _now()
        self._filters = {}
        if self._use_gpu:
            self._gpu = _make_replica(self._index)

    # ---- drift ----------------------------------------------------------------------------------
    def _imbalance(self) -> float | None:
        """FAISS's imbalance factor of the list sizes: 1.0 when all lists are equal."""
        if self._ivf is None:
            return None
        invlists = self._ivf.invlists
        sizes = np.array([invlists.list_size(i) for i in range(self._ivf.nlist)], np.float64)
        total = sizes.sum()
        return float(len(sizes) * (sizes ** 2).sum() / total ** 2) if total else None

    def drift(self) -> dict[str, Any]:
        """How far the index has moved since its k-means was trained, and whether a rebuild is due.

        Returns counts and fractions added/removed since training, the list-size imbalance now and at
        training, how well added vectors fit the trained centroids, the nlist the rule would choose now,
        and `rebuild_due` (bool) with `reasons` (list) and `why` (one line).
        """
        with self._lock.read():
            info = self._info
            trained = max(int(info["trained_count"]), 1)
            n = len(self._table)
            added, removed = int(info["added_since_training"]), int(info["removed_since_training"])
            imbalance = self._imbalance()
            suggested = tuning.choose_nlist(n)
            reasons: list[str] = []
            if self._ivf is None:
                if info.get("exact_fallback") and suggested:
                    reasons.append(f"the catalog has grown to {n} vectors: enough to train an IVF index "
                                   f"({suggested} lists)")
            else:
                if added / trained > MAX_ADDED_FRACTION:
                    reasons.append(f"{added} vectors added since training ({added / trained:.0%} of the "
                                   f"{trained} trained on; limit {MAX_ADDED_FRACTION:.0%})")
                if removed / trained > MAX_REMOVED_FRACTION:
                    reasons.append(f"{removed} vectors removed since training ({removed / trained:.0%}; limit "
                                   f"{MAX_REMOVED_FRACTION:.0%})")
                base = info.get("imbalance_at_training")
                if imbalance and base and imbalance > base * MAX_IMBALANCE_GROWTH:
                    reasons.append(f"list sizes grew uneven: imbalance {imbalance:.2f} vs {base:.2f} at training")
                fit0, fit1 = info.get("centroid_fit_at_training"), info.get("centroid_fit_added")
                if fit0 is not None and fit1 is not None and added >= 0.01 * trained and fit0 - fit1 > MAX_FIT_DROP:
                    reasons.append(f"added vectors fit the trained centroids worse (mean cosine {fit1:.3f} vs "
                                   f"{fit0:.3f}): the catalog has new kinds of items")
                if "{nlist}" in str(info.get("factory_setting")) and suggested and \
                        abs(math.log2(suggested) - math.log2(self.nlist)) >= 2:
                    reasons.append(f"{n} vectors call for {suggested} lists, the index has {self.nlist}")
            return {
                "count": n,
                "trained_count": int(info["trained_count"]),
                "added_since_training": added,
                "removed_since_training": removed,
                "added_fraction": added / trained,
                "removed_fraction": removed / trained,
                "imbalance": imbalance,
                "imbalance_at_training": info.get("imbalance_at_training"),
                "centroid_fit_at_training": info.get("centroid_fit_at_training"),
                "centroid_fit_added": info.get("centroid_fit_added"),
                "nlist": self.nlist or None,
                "suggested_nlist": suggested or None,
                "rebuild_due": bool(reasons),
                "reasons": reasons,
                "why": "; ".join(reasons) if reasons else "within limits: incremental updates are fine",
            }

    # ---- persistence ----------------------------------------------------------------------------
    def save(self, directory: str | Path, *, _extra: Mapping[str, Any] | None = None) -> Path:
        """Write the index folder (see the module doc); index.json last, with every file's sha256."""
        import faiss
        from storage.artifacts import MANIFEST, sha256_file, write_json

        directory = Path(directory)
        if (directory / MANIFEST).exists():
            raise BadIndexInput(f"{directory} is a published version folder; versions are never edited - save "
                                f"to a new folder and publish it")
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock.read():
            faiss.write_index(self._index, str(directory / INDEX_FILE))
            files = [INDEX_FILE]
            if self._refine_codec is not None:
                faiss.write_index(self._refine_codec, str(directory / REFINE_FILE))
                np.save(directory / REFINE_CODES_FILE, self._refine_codes, allow_pickle=False)
                files += [REFINE_FILE, REFINE_CODES_FILE]
            files += self._table.save(directory)
            info = dict(self._info)
            info.update(_extra or {})
            info["files"] = {f: {"sha256": sha256_file(directory / f), "size": (directory / f).stat().st_size}
                             for f in files}
            write_json(directory / INFO_FILE, info)
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, model_version: str | None = None, dim: int | None = None,
             use_gpu: bool | None = None) -> "VectorIndex":
        """Load an index folder; refuses another model version or dimension (IndexMismatch) and any
        missing, truncated or altered file (CorruptIndex)."""
        import faiss
        from storage.artifacts import MANIFEST, ArtifactError, sha256_file, verify_dir

        directory = Path(directory)
        info_path = directory / INFO_FILE
        if not info_path.is_file():
            raise CorruptIndex(f"{directory} holds no {INFO_FILE}: it is not an index folder")
        try:
            info = json.loads(info_path.read_text())
            built_with, built_dim = info["model_version"], int(info["dim"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptIndex(f"{info_path} is not a valid index description ({exc}); re-fetch or rebuild the "
                               f"index") from exc
        if info.get("format") != FORMAT:
            raise CorruptIndex(f"{info_path} has format {info.get('format')!r}; this code reads format {FORMAT}")
        if model_version is not None and built_with != model_version:
            raise IndexMismatch(f"the index in {directory} was built with model version {built_with!r}, but the "
                                f"model in hand is {model_version!r}: its vectors are not comparable. Use the "
                                f"index built for {model_version!r} (or build one)")
        if dim is not None and built_dim != int(dim):
            raise IndexMismatch(f"the index in {directory} holds {built_dim}-d vectors (model {built_with!r}) but "
                                f"the model in hand embeds to {dim}-d")
        if (directory / MANIFEST).exists():
            try:
                verify_dir(directory)
            except ArtifactError as exc:
                raise CorruptIndex(str(exc)) from exc
        files = info.pop("files", None)
        if not isinstance(files, dict) or INDEX_FILE not in files:
            raise CorruptIndex(f"{info_path} lists no checksummed files; re-save the index")
        for name, entry in files.items():
            path = directory / name
            if not path.is_file():
                raise CorruptIndex(f"{name} is missing from {directory}; re-fetch the index version")
            size = path.stat().st_size
            if size != entry["size"]:
                raise CorruptIndex(f"{name} in {directory} is {size} bytes, expected {entry['size']}: the file is "
                                   f"truncated or altered; re-fetch the index version")
            if sha256_file(path) != entry["sha256"]:
                raise CorruptIndex(f"{name} in {directory} fails its sha256 checksum: the file was altered or "
                                   f"corrupted; re-fetch the index version, do not use it")
        try:
            index = faiss.read_index(str(directory / INDEX_FILE))
            refine_codec = refine_codes = None
            if info.get("refine"):
                refine_codec = faiss.read_index(str(directory / REFINE_FILE))
                refine_codes = np.load(directory / REFINE_CODES_FILE, allow_pickle=False)
        except (RuntimeError, OSError, ValueError) as exc:
            raise CorruptIndex(f"FAISS cannot read the index in {directory} ({str(exc).splitlines()[0]}); "
                               f"re-fetch the index version") from exc
        table = ListingTable.load(directory, info.get("labels") or {})
        count = int(info.get("count", -1))
        problems = []
        if index.d != built_dim:
            problems.append(f"index.faiss is {index.d}-d, index.json says {built_dim}")
        if index.ntotal != count or len(table) != count:
            problems.append(f"index.faiss holds {index.ntotal} vectors and the table {len(table)} listings, "
                            f"index.json says {count}")
        if refine_codes is not None and len(refine_codes) != count:
            problems.append(f"the re-ranking copy holds {len(refine_codes)} vectors, not {count}")
        if problems:
            raise CorruptIndex(f"the index in {directory} is inconsistent: {'; '.join(problems)}")
        return cls(index, table, info, refine_codec, refine_codes, use_gpu=use_gpu)

    def publish(self, store, *, alias: str | None = None) -> str:
        """Publish as a new version under indexes/<model_version>/ (never editing one); return it.

        `alias` (e.g. "production") is pointed at the new version."""
        from storage.artifacts import index_repo, new_version

        repo = index_repo(store, self.model_version)
        # Versions sort by time to the second, then by a random suffix: make sure an update published
        # within the same second as its parent still sorts after it, so "latest" finds it.
        newest = (repo.versions() or [""])[0]
        version = new_version()
        for attempt in range(64):
            if version > newest:
                break
            if attempt == 32:
                time.sleep(1.0)
            version = new_version()
        parent = self._info.get("index_version")
        with tempfile.TemporaryDirectory(prefix="lookalike-index-") as tmp:
            self.save(tmp, _extra={"index_version": version, "parent_version": parent})
            meta = {k: self._info[k] for k in ("model_version", "dim", "factory", "nlist", "nprobe", "count",
                                                 "recall_at_10")}
            repo.publish(tmp, version=version, metadata=meta)
        self._info["index_version"], self._info["parent_version"] = version, parent
        if alias:
            repo.set_alias(alias, version)
        return version

    @classmethod
    def fetch(cls, store, model_version: str, ref: str = "latest", dim: int | None = None, *,
              use_gpu: bool | None = None) -> "VectorIndex":
        """Download (verified, cached) and load an index version of `model_version`: a version, an alias
        or "latest"."""
        from storage.artifacts import index_repo

        path = index_repo(store, model_version).fetch(ref)
        return cls.load(path, model_version=model_version, dim=dim, use_gpu=use_gpu)


# ---- helpers ------------------------------------------------------------------------------------

def _encode(codec, x: np.ndarray) -> np.ndarray:
    return np.concatenate([codec.sa_encode(x[i:i + ADD_CHUNK]) for i in range(0, len(x), ADD_CHUNK)]) \
        if len(x) else np.zeros((0, codec.sa_code_size()), np.uint8)


def _centroid_fit(ivf, x: np.ndarray, sample: int = 10_000) -> float:
    """Mean cosine of (up to `sample` evenly spaced) vectors to their nearest centroid."""
    step = max(1, len(x) // sample)
    return float(ivf.quantizer.search(np.ascontiguousarray(x[::step]), 1)[0].mean())


def _add_chunks(index, x: np.ndarray, keys: np.ndarray, progress: bool, desc: str) -> None:
    chunks = range(0, len(x), ADD_CHUNK)
    if progress and len(chunks) > 1:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc=desc, unit="chunk")
    for i in chunks:
        index.add_with_ids(x[i:i + ADD_CHUNK], keys[i:i + ADD_CHUNK])


def _train_and_add(index, xt: np.ndarray, x: np.ndarray, keys: np.ndarray, gpu: bool, progress: bool):
    """Train and fill; on a GPU when asked. Returns (the CPU index, where it was built)."""
    import faiss

    if gpu:
        try:
            replica = _GpuReplica(index)  # the untrained index, on the GPU
            replica.index.train(xt)
            _add_chunks(replica.index, x, keys, progress, "adding (GPU)")
            return faiss.index_gpu_to_cpu(replica.index), "gpu"
        except Exception as exc:  # noqa: BLE001 - types without a GPU version: k-means on the GPU only
            log.warning("building on the CPU with k-means on the GPU: %s", str(exc).splitlines()[0])
            resources = faiss.StandardGpuResources()
            ivf = faiss.extract_index_ivf(index)
            clustering = faiss.index_cpu_to_gpu(resources, 0, faiss.IndexFlatIP(x.shape[1]))
            ivf.clustering_index = clustering
            index.train(xt)
            ivf.clustering_index = None
            _add_chunks(index, x, keys, progress, "adding")
            return index, "gpu-kmeans"
    index.train(xt)
    _add_chunks(index, x, keys, progress, "adding")
    return index, "cpu"
