"""`python -m lookalike.transformer --predictor_host HOST:GRPC_PORT`: the KServe transformer server (REST and gRPC).

It reads the model's preprocessing from the model's own model.json (from the store configured by
LOOKALIKE_S3_*, or --model_dir), and calls the predictor over gRPC v2.
"""
from __future__ import annotations

import argparse
import os
import sys

from kserve import model_server

from lookalike.core.decoding import ImageLimits


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lookalike.transformer", parents=[model_server.parser],
        description="Lookalike transformer: decodes and preprocesses shoppers' photos, calls the predictor, joins "
                    "listing metadata (KServe v2).")
    parser.set_defaults(model_name="lookalike", predictor_protocol="grpc-v2")
    env = os.environ.get
    parser.add_argument("--model_version", default=env("LOOKALIKE_MODEL_VERSION", "production"),
                        help="model version or alias whose preprocessing to start with; the transformer follows "
                             "the version the predictor reports [env LOOKALIKE_MODEL_VERSION]")
    parser.add_argument("--model_dir", default=env("LOOKALIKE_MODEL_DIR"),
                        help="read model.json from this local model version folder instead of the store")
    parser.add_argument("--catalog", action="append", default=[],
                        help="catalog JSONL (s3:// or path) for listing metadata; repeatable (default: the catalogs "
                             "the served index names) [env LOOKALIKE_CATALOG, comma-separated]")
    parser.add_argument("--predictor_timeout", type=float, default=float(env("LOOKALIKE_PREDICTOR_TIMEOUT", "10")),
                        help="seconds to wait for the predictor before answering 504")
    parser.add_argument("--predictor_datatype", choices=["FP16", "FP32"],
                        default=env("LOOKALIKE_PREDICTOR_DATATYPE", "FP16"),
                        help="datatype of the preprocessed tensor sent to the predictor: FP16 (default) is half "
                             "the bytes and exact to the pixel; FP32 for a predictor that takes nothing else")
    parser.add_argument("--host", default=env("LOOKALIKE_HOST", "0.0.0.0"),
                        help="address both transports listen on: 0.0.0.0 in a pod (the kubelet's probes and the "
                             "cluster reach it), 127.0.0.1 for a local stack [env LOOKALIKE_HOST]")
    parser.add_argument("--max_images", type=int, default=ImageLimits.max_images,
                        help="most photos per request (more: 413)")
    parser.add_argument("--max_image_bytes", type=int, default=ImageLimits.max_bytes,
                        help="largest encoded photo in bytes (more: 413)")
    parser.add_argument("--max_in_work", type=int, default=int(env("LOOKALIKE_MAX_IN_WORK", "0")),
                        help="requests worked on at once (0: one per CPU of the pod's limit) [env "
                             "LOOKALIKE_MAX_IN_WORK]")
    parser.add_argument("--max_waiting", type=int, default=int(env("LOOKALIKE_MAX_WAITING", "-1")),
                        help="requests waiting for a turn; more are answered 503 + Retry-After (-1: three per CPU, "
                             "what the pod's memory holds, docs/capacity.md; in a cluster Knative queues the rest) "
                             "[env LOOKALIKE_MAX_WAITING]")
    parser.add_argument("--max_pixels", type=int, default=ImageLimits.max_pixels,
                        help="largest photo in pixels, read from its header before decoding (more: 413)")
    parser.add_argument("--shard_hosts", default=env("LOOKALIKE_SHARD_HOSTS", ""),
                        help="HOST:PORT,... the gRPC ports of the index shard predictors: the predictor is then the "
                             "embedding predictor, and each query vector is searched on every shard and merged "
                             "here (lookalike/transformer/shards.py) [env LOOKALIKE_SHARD_HOSTS]")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, _ = build_parser().parse_known_args(argv)
    if not args.predictor_host:
        print("transformer: --predictor_host HOST:PORT (the predictor's gRPC port) is required", file=sys.stderr)
        return 2
    if args.predictor_protocol != "grpc-v2":
        print("transformer: only --predictor_protocol grpc-v2 is supported (tensors travel binary over gRPC)",
              file=sys.stderr)
        return 2
    from lookalike.core.budget import request_cap
    from lookalike.serving.metrics import configure_logging
    from lookalike.serving.protocol import ModelServer
    from lookalike.transformer.server import LookalikeTransformer, TransformerSettings

    configure_logging()
    catalogs = list(args.catalog) + [c for c in os.environ.get("LOOKALIKE_CATALOG", "").split(",") if c]
    limits = ImageLimits(max_bytes=args.max_image_bytes, max_pixels=args.max_pixels, max_images=args.max_images)
    settings = TransformerSettings(model_ref=args.model_version, model_dir=args.model_dir, limits=limits,
                                   predictor_timeout_s=args.predictor_timeout, catalogs=catalogs,
                                   predictor_datatype=args.predictor_datatype, max_in_work=args.max_in_work,
                                   max_waiting=args.max_waiting,
                                   shard_hosts=[h for h in args.shard_hosts.split(",") if h])
    model = LookalikeTransformer(args.model_name, args.predictor_host, settings)
    try:
        model.load()
    except Exception as exc:  # noqa: BLE001 - one clear line, then a non-zero exit
        print(f"transformer: cannot read the model's preprocessing spec: {exc}", file=sys.stderr, flush=True)
        return 1
    from kserve.predictor_config import PredictorConfig

    # kserve's own view of the predictor (used by --enable_predictor_health_check) matches ours: gRPC v2.
    predictor = PredictorConfig(predictor_host=args.predictor_host, predictor_protocol="grpc-v2",
                                predictor_request_timeout_seconds=max(1, round(args.predictor_timeout)),
                                predictor_health_check=args.enable_predictor_health_check)
    ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=args.workers,
                enable_grpc=args.enable_grpc, predictor_config=predictor, unit="transformer", host=args.host,
                gate=model.gate,
                max_request_bytes=request_cap(limits)).start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())
