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
               "predicted" into each photo's predicted label before it fans out)
        output listing_ids BYTES [N, k], photo_ids BYTES [N, k], scores FP32 [N, k] ("" / NaN pad a row)
               parameters model_version, index_version (the sharded version: every shard of an answer
               must name the same), shard, shards, search_us

Both load from the store (model by version or alias; the shard from
indexes-sharded/<model_version>/<index_version>/, fetched whole and verified against its one MANIFEST) or
from local folders (--model_dir, --index_dir).
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import time
from typing import Any

import numpy as np

import kserve
from kserve import model_server
from kserve.protocol.infer_type import InferRequest, InferResponse
from lookalike.core.boxes import BOXES, boxes_table
from lookalike.core.model_card import ModelCard
from lookalike.core.s3 import connect
from lookalike.predictor.embedder import Embedder
from lookalike.predictor.index.shards import ShardedIndex, load_shard, read_card
from lookalike.predictor.service import PREDICTED, parse_filters, resolve_model
from lookalike.serving.errors import BadInput, TooLarge, Unavailable, as_v2_error
from lookalike.serving.metrics import RequestTrace, configure_logging
from lookalike.serving.protocol import (MAX_NPROBE, MAX_TOP_K, ModelServer, int_parameter, output, parameters_of,
                                        request_id, requested, single_input, tensor_as_numpy, wants_binary)

EMBEDDINGS = "embeddings"
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
        try:
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
        except Exception as exc:  # noqa: BLE001 - every failure becomes a v2 error with a status
            error = as_v2_error(exc, "predictor", rid)
            trace.finish(error, images=0)
            raise error from exc
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
    """One shard of a sharded index version: query vectors in, that shard's top-k listings out."""

    def __init__(self, name: str, shard: int, *, model_ref: str = "production", index_ref: str = "latest",
                 index_dir: str | None = None, mmap: bool = False, max_queries: int = 64):
        super().__init__(name)
        self.shard, self.model_ref, self.index_ref, self.index_dir = shard, model_ref, index_ref, index_dir
        self.mmap, self.max_queries = mmap, max_queries
        self.index = None
        self.shards = 0
        self.index_version = ""

    def load(self) -> bool:
        folder = self.index_dir
        model_version = None
        if not folder:
            store = connect()
            model_version = resolve_model(store, self.model_ref)
            folder = ShardedIndex.fetch_folder(store, model_version, self.index_ref)
        card = read_card(folder, model_version)
        self.index = load_shard(folder, self.shard, model_version=model_version, verified=not self.index_dir,
                                mmap=self.mmap)
        self.shards, self.index_version = int(card["shards"]), str(card.get("index_version") or "unversioned")
        self.ready = True
        return True

    async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        rid = request_id(payload, headers)
        trace = RequestTrace("predictor", rid, model=self.name)
        try:
            index = self.index
            if index is None:
                raise Unavailable(f"shard {self.shard} is still loading; retry shortly")
            params = parameters_of(payload)
            top_k = int_parameter(params, "top_k", 10, 1, MAX_TOP_K)
            nprobe = int_parameter(params, "nprobe", None, 1, MAX_NPROBE)
            filters = parse_filters(params, index.card.labels)
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
        except Exception as exc:  # noqa: BLE001 - every failure becomes a v2 error with a status
            error = as_v2_error(exc, "predictor", rid)
            trace.finish(error, images=0)
            raise error from exc
        binary = wants_binary(payload)
        scores = np.asarray(result.scores, np.float32)
        outputs = [output("listing_ids", _table(result.listing_ids, k), "BYTES", binary),
                   output("photo_ids", _table(result.photo_ids or [], k, len(q)), "BYTES", binary),
                   output("scores", scores, "FP32", binary)]
        trace.finish(images=len(q))
        params_out = {"model_version": index.model_version, "index_version": self.index_version,
                      "shard": self.shard, "shards": self.shards, "search_us": int(seconds * 1e6)}
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args, _ = build_parser().parse_known_args(argv)
    configure_logging()
    if args.part == "embed":
        model: Any = EmbeddingPredictor(args.model_name, model_ref=args.model_version, model_dir=args.model_dir,
                                        backend=args.backend, max_images=args.max_images)
        max_bytes = args.max_images * 3 * 512 * 512 * 4
    else:
        model = ShardPredictor(args.model_name, args.shard, model_ref=args.model_version,
                               index_ref=args.index_version, index_dir=args.index_dir, mmap=args.mmap_index,
                               max_queries=args.max_images)
        max_bytes = args.max_images * 4096 * 4 + (1 << 20)
    try:
        model.load()
    except Exception as exc:  # noqa: BLE001 - one clear line, then a non-zero exit (the pod restarts)
        print(f"predictor ({args.part}): cannot load: {exc}", file=sys.stderr, flush=True)
        return 1
    ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=args.workers,
                enable_grpc=args.enable_grpc, unit="predictor", host=args.host,
                max_request_bytes=max_bytes).start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())
