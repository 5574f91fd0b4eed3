"""The KServe transformer: shoppers' photos in, listings out (KServe v2, REST and gRPC).

Input (one tensor):  image  BYTES [N] (or [N,1])  encoded JPEG, PNG, WebP, HEIC or AVIF photos; over REST JSON, as
                                                  base64 strings; over gRPC or REST's binary extension,
                                                  raw bytes
  or:                listing_id (photo_id) BYTES [N]: search by listing ("more like this"), no photo sent,
                     the listing left out of its own results (predictor/by_listing.py); unknown: 404
Parameters:          top_k, nprobe, filter / filter_<task> (passed on to the predictor, see predictor/server.py);
                     box "x0,y0,x1,y1" (fractions of the photo: search only the product inside it);
                     crop "auto" (default: search the product the model's locator finds) or "off"
Outputs:             listing_ids, photo_ids, scores, label_<task>, prob_<task> (from the predictor: top-k
                     listings, each once, and the photo of each that matched), and joined from the
                     catalogs: titles, categories, image_uris (fetchable URLs)  BYTES [N, k]; matches
                     BYTES [N]: one JSON document per photo with what an app displays per listing (title,
                     metadata, all labels, the matched photo's URL and all its photos' URLs, score; see
                     `lookalike.transformer.answers`, with the box searched); boxes FP32 [N, 5]: the
                     box searched per photo (x0, y0, x1, y1 fractions, the locator's confidence or NaN)

preprocess: check limits (images per request, bytes, pixels), decode with EXIF orientation, apply the
            model's own preprocessing spec (read from its model.json, never copied) -> [N,3,S,S]; a photo
            sent before is asked for by content key first (`lookalike.serving.photo_cache`)
predict:    send the tensor to the predictor over gRPC v2 (binary, no JSON lists) with a deadline, as FP16
            by default: half the bytes of FP32 and still exact to the pixel (see `predictor_tensor`); where
            the model's locator is sure where the product is, search that crop fused with the whole photo
            (one more call: `lookalike.transformer.localise`)
postprocess: join listing metadata from every catalog the served index names, photos as fetchable URLs

Failures are v2 errors with the status a client can act on: 400 bad input, 413 too large, 404 unknown
model (kserve), 503 predictor down, 504 predictor too slow; the message says what was wrong.

Why this file is long: KServe's Model contract (preprocess, predict, postprocess) is one class, and a
request's detours between them (the cache probe that falls back to pixels, following a model swap, the
automatic crop's second call) share the request's state; their pieces that stand alone live beside it
(predictor_requests.py, localise.py, answers.py, metadata.py).
"""
from __future__ import annotations

import asyncio
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

import kserve
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.infer_type import InferInput, InferRequest, InferResponse
from lookalike.core.artifacts import index_repo, model_repo
from lookalike.core.s3 import ObjectStore, connect
from lookalike.core.decoding import ImageLimits, decode_images
from lookalike.core.boxes import BOXES, EMBEDDINGS, FUSE, WITH_EMBEDDINGS, crop_to_box
from lookalike.transformer.answers import join, text
from lookalike.transformer.localise import (AUTO_CROP_KEY, CROP, CROP_DECODE_SCALE, CROPPED_KEY, WHOLE, Searched,
                                            box_and_crop, locate, plan_crops)
from lookalike.transformer.shards import MISSING, PARTIAL, ShardFanout, flag_partial, sharded_card
from lookalike.transformer.predictor_requests import (content_keys, is_miss, listing_request,
                                                      predictor_error, predictor_tensor, probe_request, to_plain)
from lookalike.serving.photo_cache import KEYS_PARAMETER, RecentKeys
from lookalike.transformer.metadata import ListingMetadata, PhotoUrls
from lookalike.serving.metrics import RequestTrace, set_serving_versions
from lookalike.core.index_card import CARD_FILE as INDEX_CARD_FILE
from lookalike.core.index_card import IndexCard
from lookalike.core.model_card import CARD_FILE, ModelCard
from lookalike.core.preprocessing import preprocess_batch
from lookalike.core.budget import transformer_plan
from lookalike.core.settings import cpu_limit, decode_threads
from lookalike.serving.limits import AdmissionGate
from lookalike.serving.errors import (BadInput, ModelMoved, TooLarge, Unavailable, as_v2_error)
from lookalike.serving.protocol import (LISTING_INPUT, MAX_NPROBE, MAX_TOP_K, REQUEST_ID_HEADER, int_parameter,
                                        listing_query, maybe_base64, output, parameters_of, request_id, requested,
                                        shown, single_input, tensor_as_numpy, wants_binary)

log = logging.getLogger(__name__)

# The slots a request holds until it is answered (see LookalikeTransformer.__call__).
_held: ContextVar[AsyncExitStack | None] = ContextVar("lookalike_held", default=None)

INPUT_NAME = "image"
PREPROCESSED_FOR = "preprocessed_for"  # tells the predictor which model's preprocessing the tensor has
FORWARDED_PARAMETERS = ("top_k", "nprobe", "filter")
BOX = "box"  # the part of the photo the shopper cares about: "x0,y0,x1,y1" as fractions of width and height
DEFAULT_MODEL_REF = "production"


@dataclass
class TransformerSettings:
    model_ref: str = DEFAULT_MODEL_REF  # which model's preprocessing to start with (version or alias)
    model_dir: str | None = None  # a local model version folder instead of the store
    limits: ImageLimits = field(default_factory=ImageLimits)
    predictor_timeout_s: float = 10.0
    predictor_datatype: str = "FP16"  # the preprocessed tensor on the wire: FP16 (default) or FP32
    catalogs: list[str] = field(default_factory=list)  # explicit listing catalogs (default: the index's)
    # Requests worked on at once and waiting (0 / -1: from the pod's CPU limit, lookalike/core/budget.py, whose
    # worst case the manifest checks hold under the pod's memory limit).
    max_in_work: int = 0
    max_waiting: int = -1
    # Content keys sent with pixels, to ask the predictor's caches first (8 MiB: ~35,000 photos); 0: never.
    recent_keys_bytes: int = 8 * 1024 * 1024
    # gRPC ports of the index shard predictors: the predictor is then the embedding predictor, and the
    # query vectors fan out to every shard (lookalike/transformer/shards.py); empty: one predictor does all
    shard_hosts: list[str] = field(default_factory=list)


class _State:
    """What one request carries from preprocess to postprocess."""

    def __init__(self, trace: RequestTrace, params: dict[str, Any]):
        self.trace = trace
        self.params = params
        self.images: list = []
        self.spec: ModelCard | None = None
        self.client_request: InferRequest | None = None
        self.searched: list[Searched] | None = None  # the box searched per photo, for the answer
        self.count, self.items, self.keys = 0, [], []  # photos (or listings), their bytes and content keys
        self.probe = self.by_listing = False  # asked by content key alone; a search by listing


class LookalikeTransformer(kserve.Model):
    def __init__(self, name: str, predictor_host: str, settings: TransformerSettings | None = None,
                 store: ObjectStore | None = None):
        super().__init__(name)
        self.predictor_host, self.settings = predictor_host, settings or TransformerSettings()
        plan = transformer_plan(cpu_limit(), self.settings.limits)
        self.gate = AdmissionGate(self.settings.max_in_work or plan.in_work,
                                  plan.waiting if self.settings.max_waiting < 0 else self.settings.max_waiting)
        # requests that decode nothing hold only their encoded bytes (already received): four times as many
        self.light_gate = AdmissionGate(4 * self.gate.limit, 4 * self.gate.queue)
        self._store = store
        self.spec: ModelCard | None = None
        self._specs: dict[str, ModelCard] = {}
        self.metadata = ListingMetadata(store, ())
        self.photo_urls = PhotoUrls(store)
        self._seen_pairs: set[tuple[str, str]] = set()
        # A sharded stack has no predictor cache to probe (the embedder keeps none): never probe it.
        self.recent = RecentKeys(0 if self.settings.shard_hosts else self.settings.recent_keys_bytes)
        self.fanout = (ShardFanout(self.settings.shard_hosts, self.settings.predictor_timeout_s, name)
                       if self.settings.shard_hosts else None)
        self._channel: grpc.aio.Channel | None = None
        self._stub = None
        # Pixel work (decode, preprocess) is CPU-bound: one thread per core, since more would only
        # time-slice the same cores against each other and against the predictor beside us.
        self._pixels = ThreadPoolExecutor(max_workers=decode_threads() or cpu_limit(), thread_name_prefix="pixels")

    # ---- loading -----------------------------------------------------------------------------
    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            self._store = connect()
            self.metadata.store = self.photo_urls.store = self._store
        return self._store

    def _read_card(self, ref: str | None) -> ModelCard:
        if self.settings.model_dir and ref is None:
            return ModelCard.read(self.settings.model_dir)
        # read_json checks model.json against the version's manifest
        return ModelCard.from_dict(model_repo(self.store).read_json(ref or self._resolve(self.settings.model_ref),
                                                                    CARD_FILE))

    def _resolve(self, ref: str) -> str:
        from lookalike.core.artifacts import VersionNotFound

        repo = model_repo(self.store)
        try:
            return repo.resolve(ref)
        except VersionNotFound:
            if ref != DEFAULT_MODEL_REF:
                raise
            return repo.resolve("latest")

    def spec_for(self, model_version: str) -> ModelCard:
        """The preprocessing of a model version, read from its own published model.json (cached)."""
        if model_version not in self._specs:
            self._specs[model_version] = self._read_card(model_version)
        return self._specs[model_version]

    def load(self) -> bool:
        spec = self._read_card(None)
        self._specs[spec.model_version] = spec
        self.spec = spec
        for uri in self.settings.catalogs:
            self.metadata.add_catalog(uri)
        if not self.settings.catalogs:
            self.metadata.ensure_for(spec.to_dict())
        log.info("transformer %r: preprocessing of model %s: %s; %d listings", self.name, spec.model_version,
                 spec.preprocessing.to_dict(), len(self.metadata))
        self.ready = True
        return True

    def start(self) -> None:  # readiness is "model.json loaded", set by load()
        pass

    # ---- v2 metadata -------------------------------------------------------------------------
    def get_input_types(self) -> list[dict[str, Any]]:
        # the photos; a search by listing sends `listing_id` instead (v2 metadata cannot say "one of")
        return [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        out = [{"name": n, "datatype": d, "shape": [-1, -1]} for n, d in
               (("listing_ids", "BYTES"), ("photo_ids", "BYTES"), ("scores", "FP32"), ("titles", "BYTES"),
                ("categories", "BYTES"), ("image_uris", "BYTES"))]
        for task in (self.spec.heads if self.spec else {}):
            out += [{"name": f"label_{task}", "datatype": "BYTES", "shape": [-1]},
                    {"name": f"prob_{task}", "datatype": "FP32", "shape": [-1]}]
        out.append({"name": "matches", "datatype": "BYTES", "shape": [-1]})
        out.append({"name": BOXES, "datatype": "FP32", "shape": [-1, 5]})
        return out

    async def __call__(self, body: Any, headers: dict[str, str] | None = None, verb: Any = None) -> Any:
        """A request that decodes holds a gate slot to its answer (REST: taken before the body is read;
        gRPC: before the decode, `_pixel_request`); over gRPC one that decodes nothing (by listing, or by
        content key) holds only a light-gate slot, so it never queues behind other requests' decodes."""
        async with AsyncExitStack() as held:
            token = _held.set(held)
            try:
                async with self.light_gate.admit():
                    if verb is None:
                        return await super().__call__(body, headers=headers)
                    return await super().__call__(body, headers=headers, verb=verb)
            finally:
                _held.reset(token)

    # ---- preprocess --------------------------------------------------------------------------
    async def preprocess(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferRequest:
        if not isinstance(payload, InferRequest):
            raise BadInput("this model speaks the KServe v2 protocol: POST /v2/models/<name>/infer")
        rid = request_id(payload, headers)
        trace = RequestTrace("transformer", rid, model=self.name)
        try:
            params = self._parameters(payload)
            state = _State(trace, params)
            state.client_request = payload
            state.spec = self.spec
            forwarded = {k: v for k, v in params.items() if v is not None and k not in (BOX, CROP)}
            query = listing_query(payload, self.settings.limits.max_images)
            if query is not None:
                if self.fanout is not None:
                    raise BadInput("search by listing is not served by a sharded index yet: search with a photo")
                if params.get(BOX) is not None:
                    raise BadInput("parameter 'box' cuts a photo; a search by listing has none")
                state.by_listing, state.count = True, len(query[0])
                request = listing_request(self.name, rid, *query, forwarded)
            else:
                tensor = single_input(payload, INPUT_NAME, "BYTES",
                                      "encoded JPEG, PNG, WebP, HEIC or AVIF photos, one per element; or "
                                      f"{LISTING_INPUT!r} to search by listing")
                state.items = self._items(tensor)
                state.count = len(state.items)
                request = await self._photo_request(rid, state, forwarded)
        except Exception as exc:
            error = _as_v2_error(exc, rid)
            trace.finish(error)
            raise error from exc
        request.lookalike_state = state  # carried to predict/postprocess with the request itself
        return request

    async def _photo_request(self, rid: str, state: _State, forwarded: dict[str, Any]) -> InferRequest:
        """Photos sent before: asked for by content key alone; the others: pixels, with their keys."""
        loop = asyncio.get_running_loop()
        if self.settings.recent_keys_bytes > 0:
            # off the event loop (hashing MBs releases the GIL), not queued behind decodes in the pixel pool
            state.keys = await loop.run_in_executor(None, content_keys, state.items, state.params.get(BOX))
            if self._may_crop(state):  # the answer depends on the crop: never shares a key with crop=off
                state.keys = [key + AUTO_CROP_KEY for key in state.keys]
            if self.recent.all_known(state.keys):
                # What each photo searched last time (the automatic crop's box, or None); a photo that was
                # cropped is asked for by its crop's key, whose answer the predictor keeps.
                remembered = [self.recent.get(key) for key in state.keys]
                state.probe = True
                if self._may_crop(state):
                    state.searched = [r if isinstance(r, Searched) else Searched(WHOLE, "whole") for r in remembered]
                probe_keys = [key + CROPPED_KEY if isinstance(r, Searched) and r.source == "crop" else key
                              for key, r in zip(state.keys, remembered)]
                return probe_request(self.name, rid, probe_keys, forwarded)
        return await self._pixel_request(rid, state, forwarded)

    async def _pixel_request(self, rid: str, state: _State, forwarded: dict[str, Any]) -> InferRequest:
        if (held := _held.get()) is not None:  # a gate slot, held to the end of the request (see __call__)
            await held.enter_async_context(self.gate.admit())
        # Decoding and preprocessing share one trip to a worker thread (one hop, not two).
        batch = await asyncio.get_running_loop().run_in_executor(self._pixels, self._decode_and_preprocess,
                                                                 state.items, state)
        parameters = {**forwarded, PREPROCESSED_FOR: state.spec.model_version}
        if self._may_crop(state):  # the whole photos' embeddings, for the crop's search to fuse with
            parameters[WITH_EMBEDDINGS] = True
        if state.keys:
            parameters[KEYS_PARAMETER] = ",".join(state.keys)
        tensor_out = predictor_tensor(batch, self.settings.predictor_datatype)
        return InferRequest(model_name=self.name, infer_inputs=[tensor_out], request_id=rid, parameters=parameters)

    def _parameters(self, payload: InferRequest) -> dict[str, Any]:
        params = parameters_of(payload)
        out: dict[str, Any] = {"top_k": int_parameter(params, "top_k", 10, 1, MAX_TOP_K),
                               "nprobe": int_parameter(params, "nprobe", None, 1, MAX_NPROBE)}
        for key, value in params.items():
            if key == "filter" or key.startswith("filter_"):
                if not isinstance(value, str):
                    raise BadInput(f"parameter {shown(key)} must be a string, got {shown(value)}")
                out[key] = value
        out[BOX], out[CROP] = box_and_crop(params)
        return out

    def _items(self, tensor: InferInput) -> list[bytes]:
        limits = self.settings.limits
        shape = list(tensor.shape)
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
            raise BadInput(f"input {INPUT_NAME!r} must have shape [N] or [N, 1] (one encoded photo per element), "
                           f"got {shape}")
        if shape[0] == 0:
            raise BadInput(f"input {INPUT_NAME!r} holds no images: send at least one encoded photo")
        if shape[0] > limits.max_images:
            raise TooLarge(f"{shape[0]} images in one request; the limit is {limits.max_images} - split the request")
        values = tensor_as_numpy(tensor).reshape(-1)
        items = []
        for i, value in enumerate(values):
            name = f"image {i}" if len(values) > 1 else "the image"
            if isinstance(value, str):
                value = value.encode()
            if not isinstance(value, (bytes, bytearray, np.bytes_)):
                raise BadInput(f"{name} is a {type(value).__name__}; send the encoded photo's bytes")
            value = bytes(value)
            if len(value) > limits.max_bytes * 4 // 3 + 4:
                raise TooLarge(f"{name} is {len(value):,} bytes; the limit is {limits.max_bytes:,}")
            items.append(maybe_base64(value))
        return items

    def _decode_all(self, items: list[bytes], state: _State) -> list:
        """Decode the request's photos no larger than the preprocessing needs (JPEG in the DCT domain),
        within one pixel budget for the whole request, and cut each to the `box` when one was given."""
        box = state.params.get(BOX)
        min_side = state.spec.preprocessing.resize
        if box is not None:  # the box must still hold `resize` pixels on its shorter side
            min_side = math.ceil(min_side / min(box[2] - box[0], box[3] - box[1]))
        elif self._may_crop(state):
            min_side = math.ceil(min_side * CROP_DECODE_SCALE)
        # An ImageError carries its own status (400 or 413): as_v2_error answers with it.
        images = decode_images(items, self.settings.limits, min_side=min_side)
        return [crop_to_box(img, box) for img in images] if box is not None else images

    def _decode_and_preprocess(self, items: list[bytes], state: _State) -> np.ndarray:
        with state.trace.stage("decode"):
            state.images = self._decode_all(items, state)
        with state.trace.stage("preprocess"):
            return preprocess_batch(state.images, state.spec.preprocessing)

    # ---- predict -----------------------------------------------------------------------------
    def _predictor_stub(self):
        if self._stub is None:
            options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
                       ("grpc.enable_retries", 0)]
            self._channel = grpc.aio.insecure_channel(self.predictor_host, options=options)
            self._stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    async def _call_predictor(self, request: InferRequest) -> InferResponse:
        timeout = self.settings.predictor_timeout_s
        by_listing = request.lookalike_state.by_listing if hasattr(request, "lookalike_state") else False
        fuse = None
        if self.fanout is not None:  # the embedder takes the images alone; the fan-out fuses the vectors
            fuse = next((i.as_numpy() for i in request.inputs if i.name == FUSE), None)
            request.inputs = [i for i in request.inputs if i.name != FUSE]
        try:
            reply = await self._predictor_stub().ModelInfer(
                request.to_grpc(), timeout=timeout, metadata=((REQUEST_ID_HEADER, str(request.id)),))
        except grpc.aio.AioRpcError as exc:
            raise predictor_error(exc, self.predictor_host, timeout, by_listing) from None
        if self.fanout is not None:  # the predictor embedded the photos: search every shard with them
            return await self.fanout.search(InferResponse.from_grpc(reply), request, fuse)
        return InferResponse.from_grpc(reply)

    async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        state: _State = payload.lookalike_state
        try:
            if state.probe:
                with state.trace.stage("predict"):
                    response = await self._call_predictor(payload)
                if not is_miss(response):
                    response.lookalike_state, response.lookalike_request = state, payload
                    return response
                self.recent.forget(state.keys)  # evicted there, or another predictor: send the pixels
                payload = await self._pixel_request(str(payload.id), state, dict(payload.parameters or {}))
                payload.lookalike_state = state
            for attempt in range(2):  # a second try only after following the predictor to a new model
                try:
                    with state.trace.stage("predict"):
                        response = await self._call_predictor(payload)
                except ModelMoved as moved:
                    if attempt:
                        raise
                    await self._follow(moved.model_version, state, payload)
                    continue
                served = str(to_plain(response.parameters).get("model_version") or response.model_version or "")
                if served and state.spec is not None and served != state.spec.model_version and state.images:
                    if await self._follow(served, state, payload) and attempt == 0:
                        continue  # answered on input preprocessed for the old model: redo it
                break
            response = await self._search_crops(response, state, payload)
        except Exception as exc:
            error = _as_v2_error(exc, state.trace.request_id)
            state.trace.finish(error)
            raise error from exc
        if state.keys and not state.probe:
            # The predictor holds their embeddings and answers now (the crops' under their own keys); what
            # each photo searched is remembered beside its key for the answer to a repeat.
            self.recent.add(state.keys, state.searched)
        response.lookalike_state = state
        response.lookalike_request = payload
        return response

    def _may_crop(self, state: _State) -> bool:
        return (state.params.get(CROP) == "auto" and state.params.get(BOX) is None and state.spec is not None
                and state.spec.has_locator)

    async def _search_crops(self, response: InferResponse, state: _State, request: InferRequest) -> InferResponse:
        """Where the locator found the product surely enough, search the crop instead (one more predictor
        call for the whole batch); record which box each photo searched."""
        app_box = state.params.get(BOX)
        if app_box is not None:
            state.searched = [Searched(app_box, "app") for _ in range(state.count)]
            return response
        found = next((o for o in response.outputs if o.name == BOXES), None)
        if found is None or state.params.get(CROP) != "auto":
            return response
        loop = asyncio.get_running_loop()
        with state.trace.stage("crop"):
            located = locate(found.as_numpy(), state.images, state.spec.preprocessing)
            photos, state.searched = plan_crops(state.images, located)
            if all(s.source != "crop" for s in state.searched):
                return response
            batch = await loop.run_in_executor(self._pixels, preprocess_batch, photos, state.spec.preprocessing)
        request.inputs = [predictor_tensor(batch, self.settings.predictor_datatype)]
        whole = next((o for o in response.outputs if o.name == EMBEDDINGS), None)
        if whole is not None:  # searched fused with the whole photo (lookalike.core.boxes.fuse_embeddings)
            fuse = InferInput(FUSE, list(whole.shape), "FP32")
            fuse.set_data_from_numpy(np.ascontiguousarray(whole.as_numpy(), np.float32), binary_data=True)
            request.inputs.append(fuse)
        request.parameters = {k: v for k, v in (request.parameters or {}).items() if k != WITH_EMBEDDINGS}
        if state.keys:  # the crops' answers are kept under their own keys (the whole photos' stay)
            request.parameters = {**request.parameters,
                                  KEYS_PARAMETER: ",".join(key + CROPPED_KEY for key in state.keys)}
        with state.trace.stage("predict"):
            return await self._call_predictor(request)

    async def _follow(self, model_version: str, state: _State, request: InferRequest) -> bool:
        """Switch to the preprocessing of the model the predictor now serves (read from its model.json).

        Returns True when the input had to be preprocessed again (the spec changed), so the call is redone.
        """
        loop = asyncio.get_running_loop()
        spec = await loop.run_in_executor(None, self.spec_for, model_version)
        if self.spec is None or self.spec.model_version != spec.model_version:
            log.info("the predictor serves model %s now: following it", spec.model_version)
        self.spec = spec
        old, state.spec = state.spec, spec
        request.parameters = {**(request.parameters or {}), PREPROCESSED_FOR: spec.model_version}
        if old is not None and old.preprocessing == spec.preprocessing:
            return False
        with state.trace.stage("preprocess"):
            batch = await loop.run_in_executor(self._pixels, preprocess_batch, state.images, spec.preprocessing)
        request.inputs[0] = predictor_tensor(batch, self.settings.predictor_datatype)
        return True

    # ---- postprocess -------------------------------------------------------------------------
    async def postprocess(self, result: InferResponse, headers: dict[str, str] | None = None,
                          response_headers: dict[str, str] | None = None) -> InferResponse:
        state: _State = result.lookalike_state
        try:
            with state.trace.stage("postprocess"):
                response = await self._join(result, state)
        except Exception as exc:
            error = _as_v2_error(exc, state.trace.request_id)
            state.trace.finish(error)
            raise error from exc
        params = to_plain(result.parameters)
        state.trace.fields.update(model_version=params.get("model_version"), index_version=params.get("index_version"),
                                  predictor_embed_ms=params.get("embed_us", 0) / 1000,
                                  predictor_search_ms=params.get("search_us", 0) / 1000)
        cached = state.probe and not state.images
        state.trace.fields["query"] = "listing" if state.by_listing else "cached photo" if cached else "photo"
        state.trace.finish(images=0 if state.by_listing else state.count)
        set_serving_versions("transformer", str(params.get("model_version")), str(params.get("index_version")))
        return response

    async def _join(self, result: InferResponse, state: _State) -> InferResponse:
        outputs = {o.name: o for o in result.outputs}
        params = to_plain(result.parameters)
        model_version, index_version = str(params.get("model_version", "")), str(params.get("index_version", ""))
        if not self.settings.catalogs and (model_version, index_version) not in self._seen_pairs:
            await asyncio.get_running_loop().run_in_executor(None, self._load_catalogs_of, model_version, index_version)
        ids = outputs["listing_ids"].as_numpy()
        scores = outputs["scores"].as_numpy().astype(np.float32)
        n, k = scores.shape if scores.ndim == 2 else (state.count, 0)
        ids = ids.reshape(n, k)
        photo_ids = outputs["photo_ids"].as_numpy().reshape(n, k) if "photo_ids" in outputs else None
        tasks = [name[len("label_"):] for name in outputs if name.startswith("label_")]
        labels = {t: [text(v) for v in outputs[f"label_{t}"].as_numpy().reshape(-1)] for t in tasks}
        probs = {t: outputs[f"prob_{t}"].as_numpy().reshape(-1).astype(np.float32) for t in tasks}
        # Off the event loop: signing a photo URL is an HMAC per photo (cached while young), and a page of
        # results may sign hundreds.
        searched = state.searched or [Searched(WHOLE, "whole") for _ in range(n)]
        joined = await asyncio.get_running_loop().run_in_executor(
            None, join, ids, photo_ids, scores, labels, probs, self.metadata, self.photo_urls,
            [s.to_dict() for s in searched])
        binary = wants_binary(state.client_request)
        out = [output("listing_ids", ids.astype(object), "BYTES", binary),
               output("photo_ids", joined.photo_ids, "BYTES", binary), output("scores", scores, "FP32", binary),
               output("titles", joined.titles, "BYTES", binary),
               output("categories", joined.categories, "BYTES", binary),
               output("image_uris", joined.image_uris, "BYTES", binary)]
        for t in tasks:
            out.append(output(f"label_{t}", np.array([s.encode() for s in labels[t]], dtype=object), "BYTES", binary))
            out.append(output(f"prob_{t}", probs[t], "FP32", binary))
        missing = params.get(MISSING)
        documents = joined.documents if missing is None else flag_partial(joined.documents, str(missing))
        out.append(output("matches", documents, "BYTES", binary))
        out.append(output(BOXES, np.array([s.row() for s in searched], np.float32).reshape(-1, 5), "FP32", binary))
        out = requested(out, state.client_request)
        request = result.lookalike_request
        client_request = state.client_request
        return InferResponse(response_id=str(request.id), model_name=self.name, infer_outputs=out,
                             model_version=model_version or None,
                             parameters={"model_version": model_version, "index_version": index_version,
                                         **({PARTIAL: bool(params.get(PARTIAL)), MISSING: str(missing)}
                                            if missing is not None else {})},
                             use_binary_outputs=getattr(client_request, "use_binary_outputs", False),
                             requested_outputs=getattr(client_request, "request_outputs", None))

    def _load_catalogs_of(self, model_version: str, index_version: str) -> None:
        """Load every catalog the served index names (the build's, then each update's: later ones win on a
        listing they share), after the model's lineage, which the index's own catalogs override."""
        self._seen_pairs.add((model_version, index_version))
        try:
            if model_version:
                self.metadata.ensure_for(self.spec_for(model_version).to_dict())
            if model_version and index_version and self.fanout is not None:  # a sharded version's card
                self.metadata.ensure_for(sharded_card(self.store, model_version, index_version))
            elif model_version and index_version:
                card = index_repo(self.store, model_version).read_json(index_version, INDEX_CARD_FILE)
                self.metadata.ensure_for(IndexCard.from_dict(card).to_dict())
        except Exception as exc:  # noqa: BLE001 - metadata is decoration; the ids still answer
            log.warning("no listing metadata for model %s index %s: %s", model_version, index_version, exc)


# ---- helpers -------------------------------------------------------------------------------------

def _as_v2_error(exc: BaseException, rid: str) -> BaseException:
    if isinstance(exc, ModelMoved):  # still moving after one retry: a swap is under way
        exc = Unavailable(f"the model is being swapped ({exc.details}); retry shortly")
    return as_v2_error(exc, "transformer", rid)


__all__ = ["LookalikeTransformer", "TransformerSettings", "predictor_tensor"]
