"""The KServe predictor: preprocessed images in, top-k listings and predicted labels out (KServe v2).

Input (one tensor):   images   FP32 [N, 3, S, S]   preprocessed with the model's own spec (S = its size);
                                                   FP16 is accepted too (the transformer sends FP16:
                                                   half the bytes, no pixel level lost); the embedder
                                                   widens it to FP32 (`Embedder.check_input`)
  or:                 listing_id   BYTES [N]       search by listing: its stored vector (`predictor/by_listing.py`),
                      (photo_id    BYTES [N])      the listing left out of its results; unknown: 404
  or:                 photo_key    BYTES [N]       content keys of photos sent before: answered from the caches
                                                   (`predictor/cache.py`), or a `cache_miss` response parameter
                                                   and no outputs (then the pixels come, with `photo_keys`)
Outputs:              listing_ids  BYTES [N, k]    top-k listings, each once, best first; "" pads a row
                                                   with fewer than k matches
                      photo_ids    BYTES [N, k]    beside each, the listing's photo that matched best
                      scores       FP32  [N, k]    cosine similarity of that photo (0.0 where padded)
                      label_<task> BYTES [N]       each head's predicted label
                      prob_<task>  FP32  [N]       its probability
                      boxes        FP32  [N, 5]    with a locator in the model: where it sees the product,
                                                   x0, y0, x1, y1 as fractions of the model's input, then
                                                   its confidence (NaN where it sees none); the
                                                   transformer crops the photo to it
Parameters:           top_k (default 10), nprobe (default: the index's tuned value), and a filter:
                      filter="category=footwear" | "category=predicted" | "predicted:category",
                      or filter_<task>=<label>
Response parameters:  model_version, index_version, embed_us, search_us

It serves one model version with the index built for it (from the store by version or alias, or from a
local folder such as /mnt/models), is ready only once both are loaded and verified, and swaps to a new
pair without failing a request: on `POST /v2/repository/models/<name>/load`, or when the aliases it was
started with move (polled every `refresh_seconds`).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import kserve
from kserve.model_repository import ModelRepository
from kserve.protocol.infer_type import InferRequest, InferResponse
from lookalike.predictor.by_listing import search_by_listing
from lookalike.predictor.cache import SearchCache, request_key
from lookalike.predictor.service import (DEFAULT_MODEL_REF, Matches, SearchService, ServingPair, parse_filters,
                                         resolve_model, search_pair)
from lookalike.core.artifacts import index_repo
from lookalike.core.boxes import BOXES, EMBEDDINGS, FUSE, WITH_EMBEDDINGS
from lookalike.core.s3 import connect
from lookalike.core.settings import cpu_limit
from lookalike.serving.limits import AdmissionGate
from lookalike.serving.metrics import RequestTrace, observe_batch, observe_cancelled, set_serving_versions
from lookalike.serving.errors import BadInput, ModelMoved, TooLarge, Unavailable
from lookalike.serving.photo_cache import KEYS_INPUT, KEYS_PARAMETER, MISS_PARAMETER
from lookalike.serving.protocol import (MAX_NPROBE, MAX_TOP_K, int_parameter, listing_query, output, parameters_of,
                                        request_id, requested, single_input, tensor_as_numpy, wants_binary)

log = logging.getLogger(__name__)

INPUT_NAME = "images"
INPUT_DATATYPES = ("FP32", "FP16")  # FP32 is what the metadata declares; FP16 is what the transformer sends
PREPROCESSED_FOR = "preprocessed_for"  # request parameter: the model version whose preprocessing was applied
BATCH_GAIN_MIN = 1.15  # micro-batching must buy at least this much throughput to be worth the queue


@dataclass
class PredictorSettings:
    model_ref: str = DEFAULT_MODEL_REF  # a model version, an alias, or "latest"
    index_ref: str = "latest"  # an index version of that model, an alias, or "latest"
    model_dir: str | None = None  # a local folder (e.g. /mnt/models) instead of the store
    backend: str = "auto"  # auto | onnxruntime | torch
    mmap_index: bool = False  # map the index's lists from disk instead of reading them into memory
    max_batch: int = 4  # images per embedding batch (micro-batching)
    batching: str = "auto"  # on | off | auto: on when a batch of max_batch embeds faster per image (measured)
    max_images: int = 64  # per request
    max_queue_images: int = 256  # images waiting for the micro-batcher; past it: 503 + Retry-After
    max_in_work: int = 0  # requests worked on at once (0: 4 per CPU of the pod's limit); as many more wait
    refresh_seconds: float = 0.0  # poll the aliases and swap when they move; 0 = only on request
    cache_bytes: int = 64 * 1024 * 1024  # embeddings and answers of repeated photos (predictor/cache.py); 0: off


class LookalikePredictor(kserve.Model):
    def __init__(self, name: str, settings: PredictorSettings | None = None):
        super().__init__(name)
        self.settings = settings or PredictorSettings()
        self.service: SearchService | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        limit = self.settings.max_in_work or 4 * cpu_limit()
        self.gate = AdmissionGate(limit=limit, queue=limit)
        self.cache = SearchCache(self.settings.cache_bytes)

    async def healthy(self) -> bool:
        """Readiness says what is true: a pair is loaded and requests are being answered (the batcher is
        alive and no batch has been stuck); kserve's default would only say "loaded once"."""
        return bool(self.ready and self.service is not None and self.service.healthy())

    def alive(self) -> bool:
        """Liveness: False once the batcher is gone or stuck for long, so the pod is restarted."""
        return self.service is None or self.service.alive()

    # ---- loading and swapping ----------------------------------------------------------------
    def _load_pair(self) -> ServingPair:
        s = self.settings
        if s.model_dir:
            store = None
            if s.index_ref and not (Path(s.model_dir) / "index").is_dir():
                store = connect()
            return ServingPair.from_dir(s.model_dir, store, s.index_ref, s.backend, mmap=s.mmap_index)
        return ServingPair.from_store(connect(), s.model_ref, s.index_ref, s.backend, mmap=s.mmap_index)

    def load(self) -> bool:
        """Load the pair and become ready; when already serving, load the pair again and swap if it moved."""
        if self.service is None:
            pair = self._load_pair()
            self.service = SearchService(pair, max_batch=self.settings.max_batch, batching=self._batching_pays(pair),
                                         on_batch=lambda n: observe_batch("predictor", n),
                                         on_skip=lambda n: observe_cancelled("predictor", n),
                                         max_queue=max(self.settings.max_queue_images, self.settings.max_images))
            log.info("serving %r as %s", self.name, pair)
            self.ready = True
        elif self.settings.model_dir:
            self.service.reload(self._load_pair)
        else:  # resolve the aliases first (two small reads), and load only when they moved
            store = connect()
            model_version = resolve_model(store, self.settings.model_ref)
            index_version = index_repo(store, model_version).resolve(self.settings.index_ref)
            current = self.service.pair
            if (model_version, index_version) != (current.model_version, current.index_version):
                self.service.reload(lambda: ServingPair.from_store(store, model_version, index_version,
                                                                   self.settings.backend,
                                                                   mmap=self.settings.mmap_index))
        return self.ready

    def _batching_pays(self, pair: ServingPair) -> bool:
        mode, size = self.settings.batching, self.settings.max_batch
        if mode in ("on", "off") or size <= 1:
            return mode == "on" and size > 1
        gain = pair.embedder.batch_gain(size)
        log.info("micro-batching: a batch of %d embeds %.2fx as fast as as many one-image requests side by side -> %s",
                 size, gain, "on" if gain >= BATCH_GAIN_MIN else "off")
        return gain >= BATCH_GAIN_MIN

    def start(self) -> None:
        # kserve's default start() would mark the model ready; readiness here means "pair loaded".
        if self.settings.refresh_seconds > 0 and not self.settings.model_dir and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="pair-watcher", daemon=True)
            self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        if self.service is not None:
            self.service.close()
        self.ready = False

    def _watch(self) -> None:
        while not self._stop.wait(self.settings.refresh_seconds):
            try:
                self.load()
            except Exception as exc:  # noqa: BLE001 - keep serving the current pair
                log.error("could not refresh the model/index pair (still serving %s): %s",
                          self.service.pair if self.service else None, exc)

    # ---- v2 metadata -------------------------------------------------------------------------
    def get_input_types(self) -> list[dict[str, Any]]:
        size = self.service.pair.embedder.size if self.service else -1
        return [{"name": INPUT_NAME, "datatype": INPUT_DATATYPES[0], "shape": [-1, 3, size, size]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        out = [{"name": "listing_ids", "datatype": "BYTES", "shape": [-1, -1]},
               {"name": "photo_ids", "datatype": "BYTES", "shape": [-1, -1]},
               {"name": "scores", "datatype": "FP32", "shape": [-1, -1]}]
        for task in (self.service.pair.embedder.tasks if self.service else []):
            out += [{"name": f"label_{task}", "datatype": "BYTES", "shape": [-1]},
                    {"name": f"prob_{task}", "datatype": "FP32", "shape": [-1]}]
        if self.service and self.service.pair.embedder.has_locator:
            out.append({"name": BOXES, "datatype": "FP32", "shape": [-1, 5]})
        return out

    # ---- inference ---------------------------------------------------------------------------
    async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        rid = request_id(payload, headers)
        trace = RequestTrace("predictor", rid, model=self.name)
        with trace.v2_errors():
            if self.service is None:
                raise Unavailable(f"model {self.name!r} is still loading its model and index; retry shortly")
            async with self.gate.admit():
                response, images = await self._predict(payload, rid, trace)
        trace.finish(images=images)
        return response

    async def _predict(self, payload: InferRequest, rid: str, trace: RequestTrace) -> tuple[InferResponse, int]:
        """The work of one admitted request: its answer and how many images it held (its failures become
        v2 errors in `predict`). The request asks by photo (pixels), by listing, or by a photo's content
        key alone (the transformer's probe of the caches)."""
        pair = self.service.pair  # read once: the whole request is answered by this pair
        params = parameters_of(payload)
        # A top_k above the catalog's size is answered with every listing, not refused.
        top_k = min(int_parameter(params, "top_k", 10, 1, MAX_TOP_K), max(1, pair.index.listing_count))
        nprobe = int_parameter(params, "nprobe", None, 1, MAX_NPROBE)
        filters = parse_filters(params, pair.heads)
        loop = asyncio.get_running_loop()
        query = listing_query(payload, self.settings.max_images)
        if query is not None:
            matches = await loop.run_in_executor(None, functools.partial(
                search_by_listing, pair, *query, top_k=top_k, nprobe=nprobe, filters=filters))
            return self._timed(trace, rid, payload, matches), 0
        wanted = request_key(top_k, nprobe, filters)
        if [i.name for i in payload.inputs] == [KEYS_INPUT]:
            keys = self._keys(tensor_as_numpy(payload.inputs[0]).reshape(-1).tolist())
            matches = await self._from_cache(pair, keys, wanted, top_k, nprobe, filters)
            if matches is None:
                return self._miss(rid, pair), 0
            return self._timed(trace, rid, payload, matches), len(keys)
        size = pair.embedder.size
        fuse = _fuse_input(payload, pair.embedder.embedding_dim)  # an automatic crop's whole photos
        tensor = single_input(payload, INPUT_NAME, INPUT_DATATYPES, f"preprocessed images [N,3,{size},{size}]")
        images = tensor_as_numpy(tensor)
        if images.ndim != 4 or images.shape[1:] != (3, size, size):
            wanted_model = str(params.get(PREPROCESSED_FOR) or "")
            if wanted_model and wanted_model != pair.model_version:  # a transformer still on the previous model
                raise ModelMoved(pair.model_version, f"this predictor now serves model {pair.model_version} "
                                 f"({size} px input); the input was preprocessed for {wanted_model}")
            raise BadInput(f"input {INPUT_NAME!r} must have shape [N, 3, {size}, {size}] (this model's input "
                           f"size is {size}), got {list(images.shape)}")
        if len(images) == 0:
            raise BadInput(f"input {INPUT_NAME!r} holds no images")
        if len(images) > self.settings.max_images:
            raise TooLarge(f"{len(images)} images in one request; the limit is {self.settings.max_images}")
        if fuse is not None and len(fuse) != len(images):
            raise BadInput(f"input {FUSE!r} holds {len(fuse)} embeddings for {len(images)} images")
        # Content keys name the photos only when the pixels were preprocessed for the model served here.
        keys = None
        if params.get(KEYS_PARAMETER) and str(params.get(PREPROCESSED_FOR) or "") == pair.model_version:
            keys = self._keys(str(params[KEYS_PARAMETER]).split(","))
            if len(keys) != len(images):
                raise BadInput(f"parameter {KEYS_PARAMETER!r} names {len(keys)} photos for {len(images)} images")
        # A crop's keys (the transformer's) name one fused search: the photo's bytes fix the crop and the whole
        # photo's embedding it is fused with. So its answer and its cached vector (the fused one) are kept
        # under those keys as any other, and a repeat's probe, which sends no `fuse`, finds them.
        if keys and self.cache.enabled:
            matches = await self._from_cache(pair, keys, wanted, top_k, nprobe, filters,
                                             with_embeddings=bool(params.get(WITH_EMBEDDINGS)))
            if matches is not None:
                return self._timed(trace, rid, payload, matches), len(images)
        if self.service.batcher is not None:
            future = self.service.submit(images, top_k=top_k, nprobe=nprobe, filters=filters, pair=pair, fuse=fuse)
            matches: Matches = await asyncio.wrap_future(future)
        else:  # concurrent requests run side by side in the executor's threads
            matches = await loop.run_in_executor(None, functools.partial(
                self.service.search, images, top_k=top_k, nprobe=nprobe, filters=filters, pair=pair, fuse=fuse))
        if keys:
            self.cache.keep(pair, keys, wanted, matches, matches.embeddings, matches.head_probs)
        return self._timed(trace, rid, payload, matches), len(images)

    async def _from_cache(self, pair: ServingPair, keys: list[str], wanted: tuple, top_k: int, nprobe: int | None,
                          filters: dict[str, str], with_embeddings: bool = False) -> Matches | None:
        """The answer of photos seen before: cached whole, or searched with their cached vectors (for a crop,
        the fused ones it was searched with: searched as they are, never fused again)."""
        matches = self.cache.answer(pair, keys, wanted)
        if matches is not None:
            if with_embeddings:  # a cached answer keeps no embeddings: an automatic crop fuses with these
                matches.embeddings = self.cache.embeddings_of(pair, keys)
            return matches
        found = self.cache.embedding(pair, keys)
        if found is None:
            return None
        emb, probs, boxes = found
        matches = await asyncio.get_running_loop().run_in_executor(None, functools.partial(
            search_pair, pair, emb, probs, top_k=top_k, nprobe=nprobe, filters=filters, timings={}))
        matches.boxes = boxes  # the locator's boxes, kept with the embeddings
        self.cache.keep(pair, keys, wanted, matches)
        return matches

    def _keys(self, values: list) -> list[str]:
        keys = [v.decode() if isinstance(v, (bytes, bytearray)) else str(v) for v in values]
        if not keys or len(keys) > self.settings.max_images or not all(0 < len(k) <= 64 for k in keys):
            raise BadInput(f"photo content keys must be 1 to {self.settings.max_images} strings of 1-64 characters")
        return keys

    def _miss(self, rid: str, pair: ServingPair) -> InferResponse:
        """The answer to a probe the caches cannot answer: no outputs, and the miss said in a parameter."""
        return InferResponse(response_id=rid, model_name=self.name, infer_outputs=[], model_version=pair.model_version,
                             parameters={MISS_PARAMETER: True, "model_version": pair.model_version,
                                         "index_version": pair.index_version})

    def _timed(self, trace: RequestTrace, rid: str, request: InferRequest, matches: Matches) -> InferResponse:
        for stage, seconds in matches.timings.items():
            trace.add(stage, seconds)
        return self._response(rid, request, matches)

    def _response(self, rid: str, request: InferRequest, m: Matches) -> InferResponse:
        binary = wants_binary(request)
        outputs = [output("listing_ids", m.ids_array(), "BYTES", binary),
                   output("photo_ids", m.photo_ids_array(), "BYTES", binary),
                   output("scores", m.scores, "FP32", binary)]
        for task, labels in m.labels.items():
            names = np.array([s.encode() for s in labels], dtype=object)
            outputs.append(output(f"label_{task}", names, "BYTES", binary))
            outputs.append(output(f"prob_{task}", m.probs[task], "FP32", binary))
        if m.boxes is not None:  # the locator's box per image: the transformer crops to it and answers it
            outputs.append(output(BOXES, m.boxes, "FP32", binary))
            if m.embeddings is not None and parameters_of(request).get(WITH_EMBEDDINGS):
                # what an automatic crop's call sends back to be fused with (cluster-internal: the transformer
                # never passes it on to a client)
                outputs.append(output(EMBEDDINGS, np.ascontiguousarray(m.embeddings, np.float32), "FP32", binary))
        outputs = requested(outputs, request)
        set_serving_versions("predictor", m.model_version, m.index_version)
        params = {"model_version": m.model_version, "index_version": m.index_version,
                  "embed_us": int(m.timings.get("embed", 0) * 1e6), "search_us": int(m.timings.get("search", 0) * 1e6)}
        # kserve 0.21 fails a response without an id; a request without one gets a generated id.
        return InferResponse(response_id=rid, model_name=self.name, infer_outputs=outputs,
                             model_version=m.model_version, parameters=params,
                             use_binary_outputs=request.use_binary_outputs,
                             requested_outputs=request.request_outputs)


def _fuse_input(payload: InferRequest, dim: int) -> np.ndarray | None:
    """The optional second input of an automatic crop's call, removed from the request: the whole photos'
    embeddings [N, D] FP32 to fuse the crops' with (`lookalike.core.boxes.fuse_embeddings`)."""
    found = [i for i in payload.inputs if i.name == FUSE]
    if not found:
        return None
    payload.inputs = [i for i in payload.inputs if i.name != FUSE]
    if found[0].datatype != "FP32":
        raise BadInput(f"input {FUSE!r} must be FP32 embeddings [N, {dim}], got {found[0].datatype}")
    fuse = tensor_as_numpy(found[0])
    if fuse.ndim != 2 or fuse.shape[1] != dim or not np.isfinite(fuse).all():
        raise BadInput(f"input {FUSE!r} must be finite FP32 embeddings [N, {dim}], got shape {list(fuse.shape)}")
    return np.ascontiguousarray(fuse, np.float32)


class ReloadingRepository(ModelRepository):
    """`POST /v2/repository/models/<name>/load` reloads the pair off the event loop and swaps it in."""

    async def load(self, name: str) -> bool:
        model = self.get_model(name)
        if model is None:
            from kserve.errors import ModelNotFound

            raise ModelNotFound(name)
        return await asyncio.get_running_loop().run_in_executor(None, model.load)
