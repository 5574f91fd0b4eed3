"""The predictor split in parts for a sharded index (docs/capacity.md, 100M photos): an embedding predictor
(the model alone, on a GPU) and k shard predictors (one index shard each, on CPU memory), fanned out to
and merged by the transformer (`lookalike.transformer.shards`).

    python -m lookalike.predictor.parts embed --model_name lookalike --http_port … --grpc_port …
    python -m lookalike.predictor.parts shard --shard 0 --model_name lookalike --http_port … --grpc_port …

embed   input  images FP32|FP16 [N, 3, S, S]  (what the whole predictor takes)
        output embeddings FP32 [N, D] (L2-normalised), label_<task> BYTES [N], prob_<task> FP32 [N],
               boxes FP32 [N, 5] with a locator; parameters model_version, embed_us
shard   input  embeddings FP32 [N, D]
        params top_k, nprobe, filter / filter_<task> with concrete labels (the transformer turns
               "predicted" into each photo's predicted label before it fans out), shard_version
               (model_version/index_version: which held version to answer from; default the newest)
        output listing_ids BYTES [N, k], photo_ids BYTES [N, k], scores FP32 [N, k] ("" / NaN pad a row)
               parameters model_version, index_version (the sharded version: every shard of an answer
               must name the same), shard_version (answered from), shard_versions (held, oldest
               first), shard, shards, search_us

A shard holds two versions while a swap is under way (`ShardPredictor.HELD`): it loads the new one when
its aliases move (`--refresh_seconds`) or on `POST /v2/repository/models/NAME/load`, and the transformer
moves every request to it once all shards hold it. Only the newest is in memory: the one before is mapped
from its files (first before the new one loads), so a pod sized for one version holds both.

Both load from the store (model by version or alias; the shard from
indexes-sharded/<model_version>/<index_version>/, fetched whole and verified against its one MANIFEST) or
from local folders (--model_dir, --index_dir).
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import os
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

import kserve
from kserve import model_server
from kserve.protocol.infer_type import InferRequest, InferResponse
from lookalike.core.artifacts import sharded_index_repo
from lookalike.core.boxes import BOXES, EMBEDDINGS, boxes_table
from lookalike.core.model_card import ModelCard
from lookalike.core.s3 import connect
from lookalike.predictor.embedder import Embedder
from lookalike.predictor.index.shards import ShardedIndex, load_shard, read_card
from lookalike.predictor.service import PREDICTED, parse_filters, resolve_model
from lookalike.serving.errors import BadInput, TooLarge, Unavailable
from lookalike.serving.metrics import RequestTrace, configure_logging
from lookalike.serving.protocol import (MAX_NPROBE, MAX_TOP_K, ModelServer, int_parameter, output, parameters_of,
                                        request_id, requested, single_input, tensor_as_numpy, wants_binary)
from lookalike.serving.shard_merge import SHARD_VERSION, SHARD_VERSIONS, shard_version

log = logging.getLogger(__name__)

IMAGE_DTYPES = ("FP32", "FP16")


def _labels(heads: dict[str, list[str]], probs: dict[str, np.ndarray]) -> dict[str, tuple[list[str], np.ndarray]]:
    out = {}
    for task, p in probs.items():
        idx = p.argmax(axis=1)
        out[task] = ([heads[task][int(i)] for i in idx], p[np.arange(len(p)), idx].astype(np.float32))
    return out


class EmbeddingPredictor(kserve.Model):
    """The model alone: preprocessed images in, the query vectors and the heads' labels out."""

    def __init__(self, name: str, *, model_ref: str = "production", model_dir: str | None = None,
                 backend: str = "auto", max_images: int = 64):
        super().__init__(name)
        self.model_ref, self.model_dir, self.backend, self.max_images = model_ref, model_dir, backend, max_images
        self.embedder: Embedder | None = None

    def load(self) -> bool:
        if self.model_dir:
            card = ModelCard.read(self.model_dir)
        else:
            from lookalike.core.artifacts import model_repo

            store = connect()
            card = ModelCard.read(model_repo(store).fetch(resolve_model(store, self.model_ref)), verify=False)
        self.embedder = Embedder.load(card, self.backend)
        self.ready = True
        return True

    async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        rid = request_id(payload, headers)
        trace = RequestTrace("predictor", rid, model=self.name)
        with trace.v2_errors():
            embedder = self.embedder
            if embedder is None:
                raise Unavailable("the embedding predictor is still loading its model; retry shortly")
            size = embedder.size
            images = tensor_as_numpy(single_input(payload, "images", IMAGE_DTYPES,
                                                  f"preprocessed images [N,3,{size},{size}]"))
            if images.ndim != 4 or images.shape[1:] != (3, size, size) or not len(images):
                raise BadInput(f"input 'images' must have shape [N, 3, {size}, {size}] with N >= 1, "
                               f"got {list(images.shape)}")
            if len(images) > self.max_images:
                raise TooLarge(f"{len(images)} images in one request; the limit is {self.max_images}")
            start = time.perf_counter()
            emb, probs, objectness = await asyncio.get_running_loop().run_in_executor(
                None, embedder.embed_and_locate, images)
            seconds = time.perf_counter() - start
            trace.add("embed", seconds)
        binary = wants_binary(payload)
        outputs = [output(EMBEDDINGS, np.ascontiguousarray(emb, np.float32), "FP32", binary)]
        for task, (names, best) in _labels(embedder.heads, probs).items():
            outputs.append(output(f"label_{task}", np.array([s.encode() for s in names], dtype=object), "BYTES",
                                  binary))
            outputs.append(output(f"prob_{task}", best, "FP32", binary))
        boxes = boxes_table(objectness)
        if boxes is not None:
            outputs.append(output(BOXES, boxes, "FP32", binary))
        trace.finish(images=len(images))
        version = embedder.model_version
        return InferResponse(response_id=rid, model_name=self.name, infer_outputs=requested(outputs, payload),
                             model_version=version, parameters={"model_version": version,
                                                                "embed_us": int(seconds * 1e6)})


class ShardPredictor(kserve.Model):
    """One shard of a sharded index version: query vectors in, that shard's top-k listings out.

    Swaps move every shard together: a shard loads a new version beside the one it serves and holds
    both (`HELD`), answering whichever the transformer names (`shard_version`); the transformer moves
    to the new version only once every shard holds it (`lookalike.transformer.shards`), so no answer
    mixes versions and no request fails while shards load at different moments.
    """

    HELD = 2  # versions held at once: the one served and the one a swap moves to

    def __init__(self, name: str, shard: int, *, model_ref: str = "production", index_ref: str = "latest",
                 index_dir: str | None = None, mmap: bool = False, max_queries: int = 64,
                 refresh_seconds: float = 0.0, previous_index_ref: str | None = None):
        super().__init__(name)
        self.shard, self.model_ref, self.index_ref, self.index_dir = shard, model_ref, index_ref, index_dir
        self.previous_index_ref = previous_index_ref if previous_index_ref not in (None, "", "none") else None
        self.mmap, self.max_queries, self.refresh_seconds = mmap, max_queries, refresh_seconds
        self.held: dict[str, Any] = {}  # shard_version "model/index" -> VectorIndex, oldest first
        self._folders: dict[str, str] = {}  # shard_version -> the local folder it was loaded from
        self.shards = 0
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def index(self) -> Any:
        """The newest version held (what a request that names none is answered from)."""
        return next(reversed(self.held.values()), None)

    def load(self) -> bool:
        """Load the version the refs name now, beside the one served; drop the oldest past `HELD`. At the
        first load, the previous version (a rollout's `--previous_index_version`) is loaded before it, so
        a new pod answers what the old pods of other shards still answer while a swap rolls out."""
        if not self.held and self.previous_index_ref and not self.index_dir:
            try:  # memory-mapped: the pod's memory is sized for one version in memory (docs/capacity.md)
                self._load(self.previous_index_ref, mmap=True)
            except Exception as exc:  # noqa: BLE001 - the version to serve matters; the previous one helps
                log.warning("shard %d could not load the previous version %s (serving only %s): %s",
                            self.shard, self.previous_index_ref, self.index_ref, exc)
        return self._load(self.index_ref)

    def _load(self, index_ref: str, mmap: bool | None = None) -> bool:
        with self._reload_lock:
            folder = self.index_dir
            model_version = None
            if not folder:
                store = connect()
                model_version = resolve_model(store, self.model_ref)
                index_version = sharded_index_repo(store, model_version).resolve(index_ref)
                if self._serve_held(shard_version(model_version, index_version)):
                    return self.ready
                folder = ShardedIndex.fetch_folder(store, model_version, index_version)
            card = read_card(folder, model_version)
            key = shard_version(card["model_version"], str(card.get("index_version") or "unversioned"))
            if self._serve_held(key):
                return self.ready
            self._demote_held()  # before the new version loads: a pod holds one version in memory at a time
            index = load_shard(folder, self.shard, model_version=model_version, verified=not self.index_dir,
                               mmap=self.mmap if mmap is None else mmap)
            held = {**self.held, key: index}  # a new dict, assigned at once: readers see old or new
            while len(held) > self.HELD:
                held.pop(next(iter(held)))
            self._folders = {k: v for k, v in {**self._folders, key: str(folder)}.items() if k in held}
            self.held, self.shards = held, int(card["shards"])
            log.info("shard %d holds %s", self.shard, ", ".join(held))
            self.ready = True
            return True

    def _demote_held(self) -> None:
        """Map the versions held in memory from their files instead, so that loading the next version never
        holds two in memory: a pod's memory is sized for one (docs/capacity.md). A mapped version answers the
        same; its lists are paged in from local disk as queries touch them."""
        for key, index in list(self.held.items()):
            if index.mapped or key not in self._folders:
                continue
            try:
                mapped = load_shard(Path(self._folders[key]), self.shard, verified=True, mmap=True)
            except Exception as exc:  # noqa: BLE001 - keep the copy in memory rather than lose the version
                log.warning("shard %d could not map %s from its files (kept in memory): %s", self.shard, key, exc)
                continue
            self.held = {k: (mapped if k == key else v) for k, v in self.held.items()}  # same order, at once
            log.info("shard %d maps %s from its files", self.shard, key)

    def _serve_held(self, key: str) -> bool:
        """True when `key` is held already; it becomes the newest (a rollback to the version before)."""
        if key not in self.held:
            return False
        if next(reversed(self.held)) != key:
            self.held = {**{k: v for k, v in self.held.items() if k != key}, key: self.held[key]}
            log.info("shard %d holds %s (back to %s)", self.shard, ", ".join(self.held), key)
        return True

    def start(self) -> None:
        if self.refresh_seconds > 0 and not self.index_dir and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="shard-watcher", daemon=True)
            self._watcher.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.refresh_seconds):
            try:
                self.load()
            except Exception as exc:  # noqa: BLE001 - keep serving what is held
                log.error("shard %d could not load the version its refs name (still holding %s): %s",
                          self.shard, ", ".join(self.held), exc)

    async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        rid = request_id(payload, headers)
        trace = RequestTrace("predictor", rid, model=self.name)
        with trace.v2_errors():
            held = self.held
            if not held:
                raise Unavailable(f"shard {self.shard} is still loading; retry shortly")
            params = parameters_of(payload)
            wanted = params.get(SHARD_VERSION)
            # A version this shard does not hold (it restarted, or dropped it): answer the newest and say so;
            # the transformer sees the mix and asks again for a version every shard holds.
            version = wanted if wanted in held else next(reversed(held))
            index = held[version]
            top_k = int_parameter(params, "top_k", 10, 1, MAX_TOP_K)
            nprobe = int_parameter(params, "nprobe", None, 1, MAX_NPROBE)
            filters = parse_filters(params, index.labels)
            if any(v == PREDICTED for v in filters.values()):
                raise BadInput("a shard searches concrete labels: the transformer resolves 'predicted' filters")
            q = tensor_as_numpy(single_input(payload, EMBEDDINGS, "FP32", f"query vectors [N,{index.dim}]"))
            if q.ndim != 2 or q.shape[1] != index.dim or not len(q):
                raise BadInput(f"input {EMBEDDINGS!r} must have shape [N, {index.dim}], got {list(q.shape)}")
            if len(q) > self.max_queries:
                raise TooLarge(f"{len(q)} queries in one request; the limit is {self.max_queries}")
            k = min(top_k, index.listing_count)
            start = time.perf_counter()
            result = await asyncio.get_running_loop().run_in_executor(None, functools.partial(
                index.search, np.ascontiguousarray(q, np.float32), top_k=k, nprobe=nprobe,
                label_filter=filters or None))
            seconds = time.perf_counter() - start
            trace.add("search", seconds)
        binary = wants_binary(payload)
        scores = np.asarray(result.scores, np.float32)
        outputs = [output("listing_ids", _table(result.listing_ids, k), "BYTES", binary),
                   output("photo_ids", _table(result.photo_ids or [], k, len(q)), "BYTES", binary),
                   output("scores", scores, "FP32", binary)]
        trace.finish(images=len(q))
        params_out = {"model_version": index.model_version, "index_version": version.split("/", 1)[1],
                      SHARD_VERSION: version, SHARD_VERSIONS: ",".join(held), "shard": self.shard,
                      "shards": self.shards, "search_us": int(seconds * 1e6)}
        return InferResponse(response_id=rid, model_name=self.name, infer_outputs=requested(outputs, payload),
                             model_version=index.model_version, parameters=params_out)


def _table(rows: list[list[str]], k: int, n: int | None = None) -> np.ndarray:
    n = len(rows) if n is None else n
    out = np.empty((n, k), dtype=object)
    for i in range(n):
        row = list(rows[i]) if i < len(rows) else []
        out[i, :] = [s.encode() for s in (row + [""] * k)[:k]]
    return out


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m lookalike.predictor.parts", parents=[model_server.parser],
                                     description="Lookalike's predictor in parts: the embedder, or one index shard.")
    parser.set_defaults(model_name="lookalike")
    parser.add_argument("part", choices=["embed", "shard"])
    parser.add_argument("--shard", type=int, default=int(env("LOOKALIKE_SHARD", "0")),
                        help="which shard this predictor serves [env LOOKALIKE_SHARD]")
    parser.add_argument("--model_version", default=env("LOOKALIKE_MODEL_VERSION", "production"))
    parser.add_argument("--index_version", default=env("LOOKALIKE_INDEX_VERSION", "latest"),
                        help="sharded index version or alias of that model")
    parser.add_argument("--model_dir", default=env("LOOKALIKE_MODEL_DIR"), help="a local model version folder")
    parser.add_argument("--index_dir", default=env("LOOKALIKE_INDEX_DIR"), help="a local sharded index folder")
    parser.add_argument("--backend", default=env("LOOKALIKE_BACKEND", "auto"), choices=["auto", "onnxruntime", "torch"])
    parser.add_argument("--host", default=env("LOOKALIKE_HOST", "0.0.0.0"))
    parser.add_argument("--max_images", type=int, default=64)
    parser.add_argument("--mmap_index", action="store_true", default=env("LOOKALIKE_MMAP_INDEX", "") in ("1", "true"))
    parser.add_argument("--previous_index_version", default=env("LOOKALIKE_PREVIOUS_INDEX_VERSION", "none"),
                        help="shard: also hold this version (the one a rollout moves from; none: no other) "
                             "[env LOOKALIKE_PREVIOUS_INDEX_VERSION]")
    parser.add_argument("--refresh_seconds", type=float, default=float(env("LOOKALIKE_REFRESH_SECONDS", "0")),
                        help="shard: poll the aliases this often and load the version they name beside the one "
                             "served (0: only on POST /v2/repository/models/NAME/load) [env LOOKALIKE_REFRESH_SECONDS]")
    parser.add_argument("--enable_reload_route", action="store_true",
                        default=env("LOOKALIKE_ENABLE_RELOAD_ROUTE", "") in ("1", "true"),
                        help="shard: answer POST /v2/repository/models/NAME/load (load the version the refs name "
                             "now); keep that port cluster-internal [env LOOKALIKE_ENABLE_RELOAD_ROUTE]")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, _ = build_parser().parse_known_args(argv)
    configure_logging()
    if args.part == "embed":
        model: Any = EmbeddingPredictor(args.model_name, model_ref=args.model_version, model_dir=args.model_dir,
                                        backend=args.backend, max_images=args.max_images)
        max_bytes = args.max_images * 3 * 512 * 512 * 4
        reload = False
    else:
        model = ShardPredictor(args.model_name, args.shard, model_ref=args.model_version,
                               index_ref=args.index_version, index_dir=args.index_dir, mmap=args.mmap_index,
                               max_queries=args.max_images, refresh_seconds=args.refresh_seconds,
                               previous_index_ref=args.previous_index_version)
        max_bytes = args.max_images * 4096 * 4 + (1 << 20)
        reload = args.enable_reload_route
    try:
        model.load()
    except Exception as exc:  # noqa: BLE001 - one clear line, then a non-zero exit (the pod restarts)
        print(f"predictor ({args.part}): cannot load: {exc}", file=sys.stderr, flush=True)
        return 1
    from lookalike.predictor.server import ReloadingRepository

    ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=args.workers,
                registered_models=ReloadingRepository(), enable_grpc=args.enable_grpc, unit="predictor",
                host=args.host, allow_reload=reload, max_request_bytes=max_bytes).start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())
