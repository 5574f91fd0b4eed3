"""The sharded version a run publishes beside its index (`index_shards` > 0), for `lookalike serve --shards K`.

The index publish step calls `publish_sharded` right after the index version is published and its alias
moved, still under that alias's lease, so a reader never finds a sharded version whose parent index
version does not exist, and two runs that overlap publish their pairs one after the other.

    index / train-and-index   split the very index just published (`ShardedIndex.from_index`)
    update                    the run's change set applied to the sharded version the alias names, each
                              listing in its own shard (only those shards change), published whole; split
                              the updated index instead when there is none yet, when it has another number of
                              shards, or when it does not hold the listings of the index the run updated

Either way the sharded version holds exactly the listings and photos of the index version published by
the same run, and its card (shards.json) names that index version as `parent_version`.
"""
from __future__ import annotations

from typing import Any

from lookalike.pipelines.steps.changes import ChangeSet
from lookalike.pipelines.steps.runner import StepError


def check_index_shards(shards: Any) -> int:
    """0 (no sharded version) or a shard count the sharded index takes (1 to MAX_SHARDS)."""
    from lookalike.predictor.index.shards import MAX_SHARDS

    if isinstance(shards, bool) or not isinstance(shards, int) or not 0 <= shards <= MAX_SHARDS:
        raise StepError(f"index_shards must be 0 (no sharded version) or a shard count from 1 to {MAX_SHARDS}, "
                        f"got {shards!r}; nothing was published")
    return shards


def publish_sharded(store: Any, built: Any, alias: str, shards: int, changes: ChangeSet | None,
                    base: str | None) -> str:
    """Publish the sharded version of `built` (a VectorIndex just published) and point `alias` at it.

    `changes` is an update's change set, applied to `base`, the index version it updated; None for a
    build. Returns the sharded version."""
    from lookalike.core.artifacts import sharded_index_repo

    sharded, how = _next(store, sharded_index_repo(store, built.model_version), built, alias, shards, changes, base)
    # ShardedIndex.publish records the card's index_version as parent_version: the index version this one
    # holds the listings of, whether it was split from it or updated alongside it.
    sharded.card["index_version"] = built.version
    version = sharded.publish(store, alias=alias or None)
    moved = f"; sharded alias {alias} → {version}" if alias else ""
    print(f"published sharded index {version} of model {built.model_version}: {len(sharded.shards)} shards of "
          f"{sharded.card['shard_counts']} photos, parent index {built.version}; {how}{moved}", flush=True)
    return version


def _next(store: Any, repo: Any, built: Any, alias: str, shards: int, changes: ChangeSet | None,
          base: str | None) -> tuple[Any, str]:
    """The sharded index to publish, and how it was made (for the log line)."""
    from lookalike.predictor.index.shards import ShardedIndex, read_card

    def split(why: str) -> tuple[Any, str]:
        return ShardedIndex.from_index(built, shards), why

    if changes is None:
        return split("split from the index")
    if not alias:
        return split("no alias names a sharded version to update: split the updated index")
    current = repo.alias_target(alias)
    if current is None:
        return split(f"no sharded version under alias {alias} to update yet: split the updated index")
    folder = ShardedIndex.fetch_folder(store, built.model_version, current)
    card = read_card(folder, built.model_version)
    if card["shards"] != shards:
        return split(f"sharded version {current} has {card['shards']} shards, index_shards is {shards}: re-split "
                     f"the updated index")
    if card.get("parent_version") != base:
        return split(f"sharded version {current} holds index {card.get('parent_version')}'s listings, this run "
                     f"updated index {base}: re-split the updated index")
    sharded = ShardedIndex.load(folder, model_version=built.model_version, verified=True)
    changed = changes.apply_sharded(sharded)
    if (sharded.card["count"], sharded.listing_count) != (built.count, built.listing_count):
        return split(f"sharded version {current} updated holds {sharded.card['count']} photos of "
                     f"{sharded.listing_count} listings, the index {built.count} of {built.listing_count}: "
                     f"re-split the updated index")
    shown = ", ".join(map(str, changed)) or "none"
    return sharded, f"updated sharded version {current}: shards changed: {shown} of {shards}"
