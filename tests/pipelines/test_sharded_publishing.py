"""`index_shards`: the publish step publishes a sharded version of the very index it publishes, after it and
under the same alias; an update changes only its listings' shards, and re-splits when the sharded version
cannot be updated (none yet, another shard count, another parent). The steps run as plain functions
against a real S3 server."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import test_publishing
from test_pipelines import _Artifact
from test_publishing import _update, _vectors

from lookalike.core.artifacts import index_repo, sharded_index_repo
from lookalike.pipelines.steps import StepError
from lookalike.pipelines.steps.index import publish_index, update_index
from lookalike.predictor.index import VectorIndex
from lookalike.predictor.index.shards import ShardedIndex, shard_folder, shard_of

NEW_CATALOG = "s3://shop/catalogs/spring/catalog.jsonl"
served = test_publishing.served  # the fixture: a published model and its production index of 20 listings


def _photos(index) -> list[tuple[str, str]]:
    """Every (listing, photo) an index or a sharded index holds."""
    parts = index.shards if isinstance(index, ShardedIndex) else [index]
    return sorted(pair for part in parts for pair in zip(part._table.listing_ids, part._table.photo_ids))


def _sharded(store, model_version: str, ref: str = "production") -> ShardedIndex:
    return ShardedIndex.load(ShardedIndex.fetch_folder(store, model_version, ref), model_version=model_version)


def _shard_files(store, model_version: str, version: str) -> dict[int, dict[str, str]]:
    """Each shard's files and their sha256, from the version's MANIFEST."""
    files = sharded_index_repo(store, model_version).manifest(version)["files"]
    out: dict[int, dict[str, str]] = {}
    for path, entry in files.items():
        if path.startswith("shard-"):
            out.setdefault(int(path[6:9]), {})[path] = json.dumps(entry, sort_keys=True)
    return out


def _update_from(tmp_path: Path, name: str, version: str, new: list[str], delisted: list[str]) -> _Artifact:
    """An update run whose new listings come from a catalog the index does not name yet."""
    emb = tmp_path / f"{name}-emb"
    emb.mkdir()
    np.save(emb / "embeddings.npy", _vectors(len(new), 31))
    (emb / "listings.jsonl").write_text("".join(json.dumps({"listing_id": lid, "labels": {}, "photo_id": "0"})
                                                + "\n" for lid in new))
    (emb / "embeddings.json").write_text(json.dumps({"model_version": version, "listings": len(new),
                                                     "catalog": NEW_CATALOG}))
    (tmp_path / f"{name}-delisted.txt").write_text("\n".join(delisted) + "\n")
    index = _Artifact(tmp_path / f"{name}-index")
    update_index(_Artifact(tmp_path / "model"), [_Artifact(emb)], "production", str(tmp_path / f"{name}-delisted.txt"),
                 index, _Artifact(tmp_path / f"{name}.json"))
    return index


def test_publish_with_shards_publishes_the_index_then_its_sharded_version(store, tmp_path, served, capsys):
    VectorIndex.build(_vectors(30, 1), [f"b{i}" for i in range(30)], model_version=served).save(tmp_path / "b")
    version = publish_index(_Artifact(tmp_path / "b"), "production", "", index_shards=2)
    repo = sharded_index_repo(store, served)
    assert len(repo.versions()) == 1 and repo.aliases() == {"production": repo.versions()[0]}
    sharded, index = _sharded(store, served), VectorIndex.fetch(store, served, "production")
    assert index.version == version
    assert sharded.card["parent_version"] == version and len(sharded.shards) == 2
    assert _photos(sharded) == _photos(index) and len(_photos(index)) == 30
    assert all(shard_of(lid, 2) == s for s, part in enumerate(sharded.shards) for lid in part._table.listing_ids)
    out = capsys.readouterr().out
    assert (f"published sharded index {repo.versions()[0]} of model {served}: 2 shards of "
            f"{sharded.card['shard_counts']} photos, parent index {version}; split from the index") in out
    assert out.index(f"published index {version}") < out.index("published sharded index")


def test_an_update_changes_only_its_listings_shards(store, tmp_path, served, capsys):
    k = 4
    production = VectorIndex.fetch(store, served, "production")
    first = ShardedIndex.from_index(production, k).publish(store, alias="production")
    touched = {shard_of(lid, k) for lid in ("fresh-1", "l5", "l1")}
    assert len(touched) < k  # three listings, four shards: one shard at least is left alone
    run = _update_from(tmp_path, "u", served, ["fresh-1", "l5"], ["l1"])  # one new, one replaced, one delisted
    capsys.readouterr()
    version = publish_index(run, "production", "", index_shards=k)
    repo = sharded_index_repo(store, served)
    second = repo.alias_target("production")
    assert second != first
    out = capsys.readouterr().out
    shown = ", ".join(map(str, sorted(touched)))
    assert f"updated sharded version {first}: shards changed: {shown} of {k}" in out
    before, after = _shard_files(store, served, first), _shard_files(store, served, second)
    for s in range(k):  # the files of a shard no listing of the run lives in are the very same bytes
        assert (before[s] == after[s]) == (s not in touched), shard_folder(s)
    sharded, index = _sharded(store, served), VectorIndex.fetch(store, served, "production")
    assert sharded.card["parent_version"] == version
    assert _photos(sharded) == _photos(index)
    assert "l1" not in sharded and "fresh-1" in sharded and "l5" in sharded
    assert sharded.card["catalogs"][-1] == NEW_CATALOG  # the transformer finds the new listings' metadata
    assert all((NEW_CATALOG in (part.card.catalogs or [])) == (s in {shard_of("fresh-1", k), shard_of("l5", k)})
               for s, part in enumerate(sharded.shards))
    np.testing.assert_array_equal(sharded.search(_vectors(5, 9), 5).listing_ids, index.search(_vectors(5, 9), 5)
                                  .listing_ids)


def test_an_update_splits_when_the_sharded_version_cannot_be_updated(store, tmp_path, served, capsys):
    repo = sharded_index_repo(store, served)
    # None yet: the updated index is split.
    publish_index(_update(tmp_path, "a", served, ["new-a"], ["l1"]), "production", "", index_shards=2)
    assert "no sharded version under alias production to update yet: split the updated index" in capsys.readouterr().out
    # Another shard count: re-split.
    publish_index(_update(tmp_path, "b", served, ["new-b"], ["l2"]), "production", "", index_shards=3)
    assert "has 2 shards, index_shards is 3: re-split" in capsys.readouterr().out
    assert len(_sharded(store, served).shards) == 3
    # A run without shards leaves the sharded version behind its index: the next one re-splits.
    stale = repo.alias_target("production")
    publish_index(_update(tmp_path, "c", served, ["new-c"], ["l3"]), "production", "")
    assert repo.alias_target("production") == stale
    version = publish_index(_update(tmp_path, "d", served, ["new-d"], ["l4"]), "production", "", index_shards=3)
    assert f"sharded version {stale} holds index" in capsys.readouterr().out
    sharded, index = _sharded(store, served), VectorIndex.fetch(store, served, "production")
    assert sharded.card["parent_version"] == version and _photos(sharded) == _photos(index)
    assert not any(lid in sharded for lid in ("l1", "l2", "l3", "l4"))
    assert all(lid in sharded for lid in ("new-a", "new-b", "new-c", "new-d"))


def test_overlapping_updates_both_land_in_the_sharded_version(store, tmp_path, served, capsys):
    ShardedIndex.from_index(VectorIndex.fetch(store, served, "production"), 2).publish(store, alias="production")
    a = _update(tmp_path, "a", served, ["new-a"], ["l1"])
    b = _update(tmp_path, "b", served, ["new-b"], ["l2"])  # both read the same index
    publish_index(a, "production", "", index_shards=2)
    capsys.readouterr()
    publish_index(b, "production", "", index_shards=2)  # b's changes are applied again on a's index
    out = capsys.readouterr().out
    assert "applying this run's changes again" in out and "shards changed:" in out
    sharded, index = _sharded(store, served), VectorIndex.fetch(store, served, "production")
    assert _photos(sharded) == _photos(index)
    assert "new-a" in sharded and "new-b" in sharded and "l1" not in sharded and "l2" not in sharded


@pytest.mark.parametrize("bad", [-1, 257, True, "2", 1.5])
def test_a_bad_shard_count_is_refused_before_anything_is_published(store, tmp_path, served, bad):
    before = index_repo(store, served).versions()
    run = _update(tmp_path, "x", served, ["new-x"], [])
    with pytest.raises(StepError, match="index_shards must be 0 .* from 1 to 256"):
        publish_index(run, "production", "", index_shards=bad)
    assert index_repo(store, served).versions() == before and sharded_index_repo(store, served).versions() == []


def test_without_an_alias_the_sharded_version_is_split_and_no_alias_moves(store, tmp_path, served, capsys):
    version = publish_index(_update(tmp_path, "n", served, ["new-n"], ["l1"]), "", "", index_shards=2)
    repo = sharded_index_repo(store, served)
    (sharded_version,) = repo.versions()
    assert repo.aliases() == {}
    assert "no alias names a sharded version to update: split the updated index" in capsys.readouterr().out
    sharded = _sharded(store, served, sharded_version)
    assert sharded.card["parent_version"] == version
    assert _photos(sharded) == _photos(VectorIndex.fetch(store, served, version))
