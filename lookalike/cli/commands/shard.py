"""`lookalike shard`: publish a sharded version of a published index version, for `lookalike serve --shards K`."""
from __future__ import annotations

import argparse
import os
from typing import Any

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
    p.add_argument("--index-version", default=None,
                   help="the index version or alias to split (default: the index the --alias names, else latest). "
                        "With --alias it must be the index that alias names: the sharded version serves in its place")
    p.add_argument("--alias", default="production",
                   help="alias to point at the sharded version (default production; '' publishes without moving one)")
    p.set_defaults(func=_shard)


def split_and_publish(store: Any, model_version: str, shards: int, index_ref: str | None, alias: str
                      ) -> tuple[str, Any]:
    """Split an index version into `shards` and publish them as one sharded version, moving `alias` to it, as
    the pipelines' publish step does (`publish_sharded`, which logs what it published): (sharded version,
    the split index).

    Moving an alias happens under the index alias's lease, as the pipelines publish an index and its sharded
    version, and only for the index that alias names: a split of an older index, or one that a pipeline run
    published over meanwhile, would bring back listings taken down since."""
    from lookalike.core.artifacts import index_repo
    from lookalike.core.errors import InputError
    from lookalike.pipelines.steps.sharded import publish_sharded
    from lookalike.predictor.index import VectorIndex
    from lookalike.predictor.index.shards import check_shards

    count = check_shards(shards)
    if not alias:
        full = VectorIndex.fetch(store, model_version, ref=index_ref or "latest")
        return publish_sharded(store, full, "", count, None, None), full
    repo = index_repo(store, model_version)
    with repo.lease(alias):
        named = repo.alias_target(alias)
        wanted = repo.resolve(index_ref or (alias if named is not None else "latest"))
        if named is not None and wanted != named:
            raise InputError(f"index alias {alias!r} names index {named}, not {wanted}: the sharded alias "
                             f"{alias!r} serves in place of that index, and a split of another one would bring back "
                             f"listings taken down since. Split {named} (leave out --index-version), or publish "
                             f"under another --alias")
        full = VectorIndex.fetch(store, model_version, ref=wanted)
        return publish_sharded(store, full, alias, count, None, None), full


def _shard(args: argparse.Namespace) -> int:
    from lookalike.core.s3 import connect
    from lookalike.predictor.service import resolve_model

    store = connect()
    split_and_publish(store, resolve_model(store, args.model_version), args.shards, args.index_version, args.alias)
    return 0
