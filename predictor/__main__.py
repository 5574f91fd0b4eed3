"""`python -m lookalike.predictor`: the KServe predictor server (REST and gRPC, KServe v2).

    python -m lookalike.predictor --model_name lookalike --http_port 8081 --grpc_port 8082 \
        --model_version production --index_version latest

Takes kserve's model-server options (ports, workers, logging) plus where to find the model/index pair:
from the store configured by LOOKALIKE_S3_* (by version or alias), or from a local folder (--model_dir,
e.g. /mnt/models filled by KServe's storage initializer).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kserve import model_server


MOUNTED_MODELS = Path("/mnt/models")  # where KServe's storage initializer puts a storageUri


def _mounted_models() -> str | None:
    from lookalike.core.model_card import ModelCard, ModelCardError

    try:
        ModelCard.locate(MOUNTED_MODELS)
    except ModelCardError:
        return None
    return str(MOUNTED_MODELS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lookalike.predictor", parents=[model_server.parser],
        description="Lookalike predictor: embeds preprocessed images and searches the FAISS index (KServe v2).")
    parser.set_defaults(model_name="lookalike")
    env = os.environ.get
    parser.add_argument("--model_version", default=env("LOOKALIKE_MODEL_VERSION", "production"),
                        help="model version or alias to serve ('production' falls back to the newest version "
                             "while no alias exists) [env LOOKALIKE_MODEL_VERSION]")
    parser.add_argument("--index_version", default=env("LOOKALIKE_INDEX_VERSION", "latest"),
                        help="index version or alias of that model [env LOOKALIKE_INDEX_VERSION]")
    parser.add_argument("--model_dir", default=env("LOOKALIKE_MODEL_DIR") or _mounted_models(),
                        help="serve from this local folder (a model version folder, or one holding model/ and "
                             "index/) instead of the store; checksums are verified (default: /mnt/models when "
                             "KServe's storage initializer filled it) [env LOOKALIKE_MODEL_DIR]")
    parser.add_argument("--backend", default=env("LOOKALIKE_BACKEND", "auto"), choices=["auto", "onnxruntime", "torch"],
                        help="auto: CUDA torch (half precision when it keeps results) on a GPU, ONNX Runtime on a CPU")
    parser.add_argument("--max_batch", type=int, default=int(env("LOOKALIKE_MAX_BATCH", "4")),
                        help="most images embedded together when requests arrive concurrently (default 4)")
    parser.add_argument("--batching", choices=["auto", "on", "off"], default=env("LOOKALIKE_BATCHING", "auto"),
                        help="micro-batch concurrent requests: auto measures at start whether a batch of "
                             "--max_batch images embeds faster than --max_batch one-image requests run side by "
                             "side, and batches only then")
    parser.add_argument("--host", default=env("LOOKALIKE_HOST", "0.0.0.0"),
                        help="address both transports listen on: 0.0.0.0 in a pod (the kubelet's probes and the "
                             "cluster reach it), 127.0.0.1 for a local stack [env LOOKALIKE_HOST]")
    parser.add_argument("--max_images", type=int, default=64, help="most images per request (more: 413)")
    parser.add_argument("--mmap_index", action="store_true",
                        default=env("LOOKALIKE_MMAP_INDEX", "") in ("1", "true"),
                        help="map the index's inverted lists from its file instead of reading them into memory: "
                             "serves an index larger than the pod's memory, paging from disk "
                             "(docs/capacity.md) [env LOOKALIKE_MMAP_INDEX]")
    parser.add_argument("--enable_reload_route", action="store_true",
                        default=env("LOOKALIKE_ENABLE_RELOAD_ROUTE", "") in ("1", "true"),
                        help="answer POST /v2/repository/models/NAME/load (swap to the pair the refs name now); "
                             "off by default: only inference, health and metadata routes are served "
                             "[env LOOKALIKE_ENABLE_RELOAD_ROUTE]")
    parser.add_argument("--refresh_seconds", type=float, default=float(env("LOOKALIKE_REFRESH_SECONDS", "0")),
                        help="poll the model/index aliases this often and swap when they move (0: only on "
                             "POST /v2/repository/models/NAME/load)")
    parser.add_argument("--cache_mb", type=float, default=float(env("LOOKALIKE_CACHE_MB", "64")),
                        help="memory for the embeddings and answers of repeated photos, in MiB (0: no cache) "
                             "[env LOOKALIKE_CACHE_MB]")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, _ = build_parser().parse_known_args(argv)
    from lookalike.predictor.server import LookalikePredictor, PredictorSettings, ReloadingRepository
    from lookalike.serving.metrics import configure_logging
    from lookalike.serving.protocol import ModelServer

    configure_logging()
    settings = PredictorSettings(model_ref=args.model_version, index_ref=args.index_version, model_dir=args.model_dir,
                                 backend=args.backend, max_batch=args.max_batch, batching=args.batching,
                                 max_images=args.max_images, refresh_seconds=args.refresh_seconds,
                                 mmap_index=args.mmap_index, cache_bytes=int(args.cache_mb * 1024 * 1024))
    model = LookalikePredictor(args.model_name, settings)
    try:
        model.load()
    except Exception as exc:  # noqa: BLE001 - one clear line, then a non-zero exit (the pod restarts)
        print(f"predictor: cannot load the model/index pair: {exc}", file=sys.stderr, flush=True)
        return 1
    repository = ReloadingRepository()
    ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, registered_models=repository,
                workers=args.workers, enable_grpc=args.enable_grpc, unit="predictor", host=args.host, gate=model.gate,
                allow_reload=args.enable_reload_route,
                max_request_bytes=args.max_images * 3 * 512 * 512 * 4).start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())
