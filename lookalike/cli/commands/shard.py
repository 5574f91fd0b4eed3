"""`lookalike shard`: publish a sharded version of a published index version, for `lookalike serve --shards K`."""
from __future__ import annotations

import argparse
import os

ORDER = 55


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shard", help="split a published index version into K shards, published as one version",
                       description="Split an index version into K shards by listing (a listing's photos stay "
                                   "together; every shard keeps the index's trained centroids and tuned nprobe, so "
                                   "the merged answer is the index's own) and publish them as one version under "
                                   "indexes-sharded/MODEL_VERSION/, which `lookalike serve --shards K` serves.")
    p.add_argument("--shards", type=int, required=True, metavar="K", help="how many shards (1-256)")
    p.add_argument("--model-version", default=os.environ.get("LOOKALIKE_MODEL_VERSION", "production"),
                   help="model version or alias (default production)")
    p.add_argument("--index-version", default="latest", help="the index version or alias to split (default latest)")
    p.add_argument("--alias", default="production", help="alias to point at the sharded version (default production)")
    p.set_defaults(func=_shard)


def _shard(args: argparse.Namespace) -> int:
    from lookalike.core.s3 import connect
    from lookalike.predictor.index import VectorIndex
    from lookalike.predictor.index.shards import ShardedIndex, check_shards
    from lookalike.predictor.service import resolve_model

    store = connect()
    model_version = resolve_model(store, args.model_version)
    full = VectorIndex.fetch(store, model_version, ref=args.index_version)
    sharded = ShardedIndex.from_index(full, check_shards(args.shards))
    version = sharded.publish(store, alias=args.alias or None)
    print(f"published sharded index {version} of model {model_version}: {args.shards} shards of "
          f"{sharded.card['shard_counts']} photos, from index {full.version}"
          + (f"; alias {args.alias}" if args.alias else ""))
    return 0
