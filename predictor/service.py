"""The search service: a model version and the index built with it, served together, in process.

    images [N,3,S,S] ──embed (micro-batched)──▶ embeddings + head probabilities ──IVF search──▶ matches

A `ServingPair` is immutable: the embedder, the index and their versions, checked to belong together
(the index's `model_version` must be the model's). `SearchService` holds the current pair in one
attribute; a request reads it once and uses that pair to the end, so `swap` (a single reference
assignment) never disturbs a request in flight: old requests finish on the old pair, new ones start on
the new pair, and nothing is locked on the request path.

Why this file is long: the pair, its answers and the micro-batcher that embeds for them are one unit; the
batcher's jobs finish with `search_pair`, and splitting them would split one request's path in two files.

Micro-batching: concurrent requests queue for one worker thread that embeds whatever is waiting as one
batch (up to `max_batch` images) and never waits for more - a lone request runs at once, and under load
the per-call overhead is shared (benchmarks/serving.py measures the gain).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from lookalike.predictor.embedder import Embedder
from lookalike.predictor.index import VectorIndex
from lookalike.core.boxes import boxes_table, fuse_embeddings
from lookalike.core.artifacts import ArtifactError, VersionNotFound, model_repo
from lookalike.core.errors import InputError
from lookalike.core.s3 import ObjectStore
from lookalike.core.settings import cpu_limit
from lookalike.serving.errors import Overloaded
from lookalike.serving.metrics import INDEX_BUILT
from lookalike.serving.protocol import shown
from lookalike.core.model_card import ModelCard

log = logging.getLogger(__name__)

PREDICTED = "predicted"
DEFAULT_MODEL_REF = "production"
FALLBACK_MODEL_REF = "latest"


class PairMismatch(ArtifactError):
    """The index was built with another model version than the one it would be served with."""


# ---- filters -------------------------------------------------------------------------------------

def parse_filters(params: dict[str, Any], heads: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """{task: label or "predicted"} from request parameters, each label checked against the model's heads.

    Accepted forms: `filter="category=footwear"`, `filter="category=predicted,shade=dark"`,
    `filter="predicted:category"` and `filter_category="footwear"`. A label is matched without regard to
    case (`Tops` is `tops`); an unknown task or label raises InputError naming the ones there are, since a
    filter nothing can match would otherwise answer an empty page.
    """
    wanted: dict[str, str] = {}
    raw = params.get("filter")
    if raw not in (None, ""):
        if not isinstance(raw, str):
            raise InputError(f"parameter 'filter' must be a string like 'category=footwear', got {shown(raw)}")
        for part in (p.strip() for p in raw.split(",")):
            if not part:
                continue
            if part.startswith(PREDICTED + ":"):
                task, label = part.split(":", 1)[1].strip(), PREDICTED
            elif "=" in part:
                task, label = (s.strip() for s in part.split("=", 1))
            else:
                raise InputError(f"filter {shown(part)} is not understood: use TASK=LABEL, TASK=predicted or "
                                 f"predicted:TASK")
            wanted[task] = label
    for key, value in params.items():
        if key.startswith("filter_") and value not in (None, ""):
            wanted[key[len("filter_"):]] = str(value)
    unknown = [t for t in wanted if t not in heads]
    if unknown:
        raise InputError(f"cannot filter on {', '.join(map(shown, unknown[:5]))}: this model's tasks are "
                         f"{', '.join(heads) or 'none'}")
    for task, label in wanted.items():
        if label == PREDICTED:
            continue
        by_case = {known.casefold(): known for known in heads[task]}
        if label.casefold() not in by_case:
            labels = ", ".join(list(heads[task])[:20]) + (" …" if len(heads[task]) > 20 else "")
            raise InputError(f"no {task} is called {shown(label)}: the {task} labels are {labels} (or 'predicted')")
        wanted[task] = by_case[label.casefold()]
    return wanted


# ---- the pair ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServingPair:
    embedder: Embedder
    index: VectorIndex
    model_version: str
    index_version: str
    source: str = ""

    def __repr__(self) -> str:
        return f"ServingPair(model {self.model_version}, index {self.index_version}, {self.embedder.backend})"

    @property
    def heads(self) -> dict[str, list[str]]:
        return self.embedder.heads

    @classmethod
    def assemble(cls, embedder: Embedder, index: VectorIndex, source: str = "") -> ServingPair:
        card = index.card
        version = card.index_version or "unversioned"
        if card.model_version != embedder.model_version:
            raise PairMismatch(f"index {version} was built with model {card.model_version!r}, not with "
                               f"{embedder.model_version!r}: its vectors are not comparable with this model's "
                               f"embeddings. Serve the index built for this model (or rebuild it)")
        if card.dim != embedder.embedding_dim:
            raise PairMismatch(f"index {version} holds {card.dim}-d vectors but the model embeds to "
                               f"{embedder.embedding_dim}-d")
        return cls(embedder, index, embedder.model_version, version, source)

    @classmethod
    def from_store(cls, store: ObjectStore, model_ref: str = DEFAULT_MODEL_REF, index_ref: str = "latest",
                   backend: str = "auto", mmap: bool = False) -> ServingPair:
        """Resolve model and index refs (versions, aliases or 'latest'), fetch, verify and load them.

        A model ref of 'production' that no alias names yet falls back to the newest model version.
        """
        model_version = resolve_model(store, model_ref)
        model_dir = model_repo(store).fetch(model_version)  # verified against its manifest on the way in
        embedder = Embedder.load(ModelCard.read(model_dir, verify=False), backend)
        index = VectorIndex.fetch(store, model_version, ref=index_ref, dim=embedder.embedding_dim, mmap=mmap)
        return cls.assemble(embedder, index, source=store.uri(f"models/{model_version}"))

    @classmethod
    def from_dir(cls, path: str | Path, store: ObjectStore | None = None, index_ref: str = "latest",
                 backend: str = "auto", mmap: bool = False) -> ServingPair:
        """Load from a local folder, e.g. what KServe's storage initializer copied into /mnt/models.

        Layouts: `path/model/` + `path/index/` (both published version folders), or `path` itself a model
        version folder, whose index then comes from the store (`index_ref`).
        """
        path = Path(path)
        if not ModelCard.is_published(path):
            raise ArtifactError(f"{ModelCard.locate(path)} has no MANIFEST.json: only published versions are served "
                                f"(their checksums are verified)")
        embedder = Embedder.load(ModelCard.read(path), backend)  # the one verification of the model's files
        index_dir = path / "index"
        if index_dir.is_dir():  # verified once, by the load
            index = VectorIndex.load(index_dir, model_version=embedder.model_version, dim=embedder.embedding_dim,
                                     mmap=mmap)
        elif store is not None:
            index = VectorIndex.fetch(store, embedder.model_version, ref=index_ref, dim=embedder.embedding_dim,
                                      mmap=mmap)
        else:
            raise ArtifactError(f"{path} has no index/ folder and no store is configured to fetch the index of "
                                f"model {embedder.model_version}")
        return cls.assemble(embedder, index, source=str(path))


def resolve_model(store: ObjectStore, model_ref: str) -> str:
    repo = model_repo(store)
    try:
        return repo.resolve(model_ref)
    except VersionNotFound:
        if model_ref != DEFAULT_MODEL_REF:
            raise
        log.warning("no %r alias for models yet: serving the newest model version", model_ref)
        return repo.resolve(FALLBACK_MODEL_REF)


# ---- answers -------------------------------------------------------------------------------------

@dataclass
class Matches:
    """Per image: top-k listing ids (each once), the photo of each that matched, scores, and each head's
    predicted label and probability."""

    listing_ids: list[list[str]]
    scores: np.ndarray  # [N, k] float32; padded with 0.0 where fewer than k listings matched
    labels: dict[str, list[str]]
    probs: dict[str, np.ndarray]  # [N] float32: the probability of the predicted label
    model_version: str
    index_version: str
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    photo_ids: list[list[str]] = field(default_factory=list)  # beside listing_ids: the photo that matched
    boxes: np.ndarray | None = None  # [N, 5] the locator's boxes (lookalike.core.boxes.boxes_table)
    # what the answer was searched with, when it came from images: kept by the predictor's cache
    embeddings: np.ndarray | None = field(default=None, repr=False)
    head_probs: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def top_k(self) -> int:
        return int(self.scores.shape[1]) if self.scores.ndim == 2 else 0

    def ids_array(self) -> np.ndarray:
        """listing_ids as a BYTES [N, k] array, "" where a row has fewer matches."""
        return _bytes_table(self.listing_ids, len(self.listing_ids), self.top_k)

    def photo_ids_array(self) -> np.ndarray:
        """photo_ids as a BYTES [N, k] array, "" where a row has fewer matches."""
        return _bytes_table(self.photo_ids, len(self.listing_ids), self.top_k)


def _bytes_table(rows: list[list[str]], n: int, k: int) -> np.ndarray:
    out = np.empty((n, k), dtype=object)
    for i in range(n):
        row = rows[i] if i < len(rows) else []
        padded = list(row) + [""] * (k - len(row))
        out[i, :] = [s.encode() for s in padded[:k]]
    return out


def _predicted(heads: dict[str, list[str]], probs: dict[str, np.ndarray]) -> tuple[dict, dict]:
    labels, best = {}, {}
    for task, p in probs.items():
        idx = p.argmax(axis=1) if len(p) else np.zeros((0,), np.int64)
        labels[task] = [heads[task][int(i)] for i in idx]
        best[task] = (p[np.arange(len(p)), idx] if len(p) else np.zeros((0,), np.float32)).astype(np.float32)
    return labels, best


def search_pair(pair: ServingPair, embeddings: np.ndarray, probs: dict[str, np.ndarray], *, top_k: int,
                nprobe: int | None, filters: dict[str, str], timings: dict[str, float],
                objectness: np.ndarray | None = None, fuse: np.ndarray | None = None) -> Matches:
    """Search with `embeddings`, or, given `fuse` (the whole photos' embeddings of an automatic crop), with
    both fused (`fuse_embeddings`). The answer keeps the vectors it searched with (the fused ones when fused),
    which the predictor's cache stores: searching them again gives this very answer."""
    labels, best = _predicted(pair.heads, probs)
    query = embeddings if fuse is None else fuse_embeddings(fuse, embeddings)
    start = time.perf_counter()
    per_image = any(v == PREDICTED for v in filters.values())
    if not per_image:
        result = pair.index.search(query, top_k=top_k, nprobe=nprobe, label_filter=filters or None)
        ids = [list(r) for r in result.listing_ids]
        photos = [list(r) for r in result.photo_ids]
        scores = [np.asarray(s, np.float32) for s in result.scores]
    else:  # each image is restricted to its own predicted label
        ids, photos, scores = [], [], []
        for i in range(len(query)):
            wanted = {t: (labels[t][i] if v == PREDICTED else v) for t, v in filters.items()}
            result = pair.index.search(query[i:i + 1], top_k=top_k, nprobe=nprobe, label_filter=wanted)
            ids.append(list(result.listing_ids[0]))
            photos.append(list(result.photo_ids[0]))
            scores.append(np.asarray(result.scores[0], np.float32))
    timings["search"] = time.perf_counter() - start
    k = max([len(r) for r in ids] + [0])
    score_arr = np.zeros((len(ids), k), np.float32)
    # listing_ids and photo_ids leave out the misses; the scores of the hits come first in each row
    for i, (row, srow) in enumerate(zip(ids, scores)):
        score_arr[i, :len(row)] = np.asarray(srow, np.float32)[:len(row)]
    return Matches(ids, score_arr, labels, best, pair.model_version, pair.index_version, timings, photos,
                   boxes_table(objectness), query, probs)


# ---- micro-batching ------------------------------------------------------------------------------

@dataclass
class _Job:
    pair: ServingPair
    images: np.ndarray
    finish: Callable[[np.ndarray, dict[str, np.ndarray], float, np.ndarray | None], Any]
    future: Future


def _settle(future: Future, result: Any = None, exception: BaseException | None = None) -> None:
    """Hand a job its outcome; a caller that is already gone (its future settled or cancelled) is let be."""
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


class MicroBatcher:
    """One embedding thread that embeds the queued requests together, without ever waiting for more; each
    request's search then runs on a pool of search threads, so a slow search holds nobody's embedding.

    It survives its callers: a request whose caller gave up (its future cancelled, as a client deadline
    does) is skipped before it costs an embedding, an outcome for a caller that left is dropped, and no
    failure of a request or a batch ends the embedding thread. The queue is bounded (`max_queue` images):
    past it `submit` refuses at once (`Overloaded`, 503 + Retry-After) instead of growing. `healthy()` is
    False when the thread is gone or one batch has embedded for longer than `stall_s`: the predictor's
    readiness reads it, and its liveness reads `alive()` (stalled for `dead_s`) so a stuck worker is
    restarted by Kubernetes, never a silent hang.
    """

    def __init__(self, max_batch: int = 8, on_batch: Callable[[int], None] | None = None, *, max_queue: int = 64,
                 search_threads: int = 0, stall_s: float = 10.0, dead_s: float = 60.0,
                 on_skip: Callable[[int], None] | None = None):
        self.max_batch = max(1, int(max_batch))
        self.max_queue = max(self.max_batch, int(max_queue))
        self.on_batch, self.on_skip = on_batch, on_skip
        self.stall_s, self.dead_s = stall_s, dead_s
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._queued = 0  # images submitted and not yet taken into a batch
        self._lock = threading.Lock()
        self._carry: _Job | None = None
        self._busy_since: float | None = None  # when the batch being embedded started
        self.skipped = 0  # requests dropped because their caller had gone
        self._searches = ThreadPoolExecutor(max_workers=search_threads or cpu_limit(), thread_name_prefix="search")
        self._thread = threading.Thread(target=self._loop, name="embed-batcher", daemon=True)
        self._thread.start()

    def submit(self, pair: ServingPair, images: np.ndarray,
               finish: Callable[[np.ndarray, dict[str, np.ndarray], float, np.ndarray | None], Any]) -> Future:
        with self._lock:
            if self._queued + len(images) > self.max_queue:
                raise Overloaded(f"the embedding queue is full ({self._queued} images waiting, at most "
                                 f"{self.max_queue}); retry in a second", retry_after_s=1)
            self._queued += len(images)
        job = _Job(pair, images, finish, Future())
        self._queue.put(job)
        return job.future

    def healthy(self) -> bool:
        return self._thread.is_alive() and self._stalled_for() < self.stall_s

    def alive(self) -> bool:
        return self._thread.is_alive() and self._stalled_for() < self.dead_s

    def _stalled_for(self) -> float:
        busy = self._busy_since
        return 0.0 if busy is None else time.monotonic() - busy

    def close(self) -> None:
        self._queue.put(None)
        self._searches.shutdown(wait=False, cancel_futures=True)

    def _next_batch(self) -> list[_Job] | None:
        first = self._carry or self._queue.get()
        self._carry = None
        if first is None:
            return None
        jobs, count = [first], len(first.images)
        while count < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)
                break
            if job.pair is not first.pair or count + len(job.images) > self.max_batch:
                self._carry = job  # another pair (a swap happened) or too big: next batch
                break
            jobs.append(job)
            count += len(job.images)
        return jobs

    def _loop(self) -> None:
        while True:
            jobs = None
            try:
                jobs = self._next_batch()
                if jobs is None:
                    return
                self._run(jobs)
            except BaseException as exc:  # noqa: BLE001 - nothing a request does may end this thread
                log.exception("a micro-batch failed; its requests are answered with the error")
                for job in jobs or ():
                    _settle(job.future, exception=exc)

    def _run(self, jobs: list[_Job]) -> None:
        with self._lock:
            self._queued -= sum(len(job.images) for job in jobs)
        # A caller that gave up has cancelled its future: its images are not embedded at all.
        live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if len(live) < len(jobs):
            self.skipped += len(jobs) - len(live)
            if self.on_skip:
                self.on_skip(len(jobs) - len(live))
        if not live:
            return
        pair = live[0].pair
        self._busy_since = time.monotonic()
        try:
            start = time.perf_counter()
            batch = live[0].images if len(live) == 1 else np.concatenate([j.images for j in live])
            emb, probs, located = pair.embedder.embed_and_locate(batch)
            seconds = time.perf_counter() - start
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
            for job in live:
                _settle(job.future, exception=exc)
            return
        finally:
            self._busy_since = None
        if self.on_batch:
            self.on_batch(len(batch))
        offset = 0
        for job in live:
            n = len(job.images)
            self._searches.submit(self._finish, job, emb[offset:offset + n],
                                  {t: p[offset:offset + n] for t, p in probs.items()}, seconds,
                                  None if located is None else located[offset:offset + n])
            offset += n

    @staticmethod
    def _finish(job: _Job, emb: np.ndarray, probs: dict[str, np.ndarray], seconds: float,
                located: np.ndarray | None) -> None:
        try:
            result = job.finish(emb, probs, seconds, located)
        except BaseException as exc:  # noqa: BLE001
            _settle(job.future, exception=exc)
            return
        _settle(job.future, result)


# ---- the service ---------------------------------------------------------------------------------

def mark_index_built(pair: ServingPair) -> None:
    """Publish when the served index was last built or updated (its card's `updated_at`, else `built_at`) on
    /metrics, so an alert sees an index that stopped receiving updates."""
    card = pair.index.card
    stamp = card.updated_at or card.built_at
    if stamp:
        INDEX_BUILT.labels("predictor").set(datetime.fromisoformat(stamp).timestamp())


class SearchService:
    """The current pair, search over it (direct or micro-batched), and swapping to a new pair."""

    def __init__(self, pair: ServingPair, *, max_batch: int = 8, batching: bool = True,
                 on_batch: Callable[[int], None] | None = None, max_queue: int = 64,
                 on_skip: Callable[[int], None] | None = None):
        self._pair = pair
        mark_index_built(pair)
        self._reload_lock = threading.Lock()  # one reload at a time; requests never take it
        self.batcher = MicroBatcher(max_batch, on_batch, max_queue=max_queue, on_skip=on_skip) if batching else None
        self.swaps = 0

    def healthy(self) -> bool:
        """Whether requests are being answered: the batcher (when batching) is alive and not stalled."""
        return self.batcher is None or self.batcher.healthy()

    def alive(self) -> bool:
        """False only when the batcher is gone or stuck for long: a restart is the cure."""
        return self.batcher is None or self.batcher.alive()

    @property
    def pair(self) -> ServingPair:
        return self._pair

    def swap(self, pair: ServingPair) -> ServingPair:
        """Serve `pair` from now on; return the old one. Requests in flight finish on the old pair."""
        old, self._pair = self._pair, pair  # one reference assignment: atomic for every reader
        mark_index_built(pair)
        self.swaps += 1
        log.info("swapped model %s index %s -> model %s index %s", old.model_version, old.index_version,
                 pair.model_version, pair.index_version)
        return old

    def reload(self, load: Callable[[], ServingPair]) -> bool:
        """Load a pair with `load` (off the request path) and swap to it if it differs; True if swapped."""
        with self._reload_lock:
            current = self._pair
            new = load()
            if (new.model_version, new.index_version) == (current.model_version, current.index_version):
                return False
            self.swap(new)
            return True

    def search(self, images: np.ndarray, *, top_k: int = 10, nprobe: int | None = None,
               filters: dict[str, str] | None = None, pair: ServingPair | None = None,
               fuse: np.ndarray | None = None) -> Matches:
        """Embed and search in the calling thread (no batching): the in-process path."""
        pair = pair or self._pair
        timings: dict[str, float] = {}
        start = time.perf_counter()
        emb, probs, located = pair.embedder.embed_and_locate(images)
        timings["embed"] = time.perf_counter() - start
        return search_pair(pair, emb, probs, top_k=top_k, nprobe=nprobe, filters=filters or {}, timings=timings,
                           objectness=located, fuse=fuse)

    def submit(self, images: np.ndarray, *, top_k: int = 10, nprobe: int | None = None,
               filters: dict[str, str] | None = None, pair: ServingPair | None = None,
               fuse: np.ndarray | None = None) -> Future:
        """Queue a search for the micro-batcher; the future holds `Matches`. Without batching it runs now."""
        pair = pair or self._pair
        filters = filters or {}
        if self.batcher is None:
            future: Future = Future()
            try:
                future.set_result(self.search(images, top_k=top_k, nprobe=nprobe, filters=filters, pair=pair,
                                              fuse=fuse))
            except BaseException as exc:  # noqa: BLE001
                future.set_exception(exc)
            return future

        def finish(emb, probs, embed_seconds, located):
            return search_pair(pair, emb, probs, top_k=top_k, nprobe=nprobe, filters=filters,
                               timings={"embed": embed_seconds}, objectness=located, fuse=fuse)

        pair.embedder.check_input(images)  # a malformed batch fails alone, not the batch it would join
        return self.batcher.submit(pair, images, finish)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
