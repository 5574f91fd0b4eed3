"""Publishing loses nothing: updates that overlap both land (additions and delistings), a run that dies at
any step leaves every alias on a complete version, and a model alias never moves before its index exists.
The update and publish steps run as plain functions against a real S3 server."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from test_pipelines import _Artifact, _model_folder

from lookalike.core.artifacts import index_repo, model_repo, new_version
from lookalike.pipelines.steps.index import publish_index, update_index
from lookalike.pipelines.steps.model import publish_model
from lookalike.predictor.index import VectorIndex

DIM = 4


def _vectors(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def served(store, tmp_path):
    """A published model and its production index of 20 listings."""
    version = new_version()
    _model_folder(tmp_path / "model", version)
    publish_model(_Artifact(tmp_path / "model"), "production")
    VectorIndex.build(_vectors(20, 0), [f"l{i}" for i in range(20)], model_version=version).save(tmp_path / "base")
    publish_index(_Artifact(tmp_path / "base"), "production", "")
    return version


def _embedded(folder: Path, version: str, listing_ids: list[str], seed: int) -> _Artifact:
    """What an embed step leaves for the update: the new listings' vectors, rows and info."""
    folder.mkdir(parents=True)
    np.save(folder / "embeddings.npy", _vectors(len(listing_ids), seed))
    (folder / "listings.jsonl").write_text("".join(json.dumps({"listing_id": lid, "labels": {}, "photo_id": "0"})
                                                   + "\n" for lid in listing_ids))
    (folder / "embeddings.json").write_text(json.dumps({"model_version": version, "listings": len(listing_ids)}))
    return _Artifact(folder)


def _update(tmp_path: Path, name: str, version: str, new: list[str], delisted: list[str]) -> _Artifact:
    (tmp_path / f"{name}-delisted.txt").write_text("\n".join(delisted) + "\n")
    index = _Artifact(tmp_path / f"{name}-index")
    update_index(_Artifact(tmp_path / "model"), [_embedded(tmp_path / f"{name}-emb", version, new, hash(name) % 99)],
                 "production", str(tmp_path / f"{name}-delisted.txt"), index, _Artifact(tmp_path / f"{name}.json"))
    return index


def _served_index(store, version: str) -> VectorIndex:
    return VectorIndex.fetch(store, version, "production")


def test_two_updates_at_once_both_land(store, tmp_path, served, capsys):
    # Both read production (the same parent) before either publishes: the race the issue found.
    a = _update(tmp_path, "a", served, ["new-a"], ["l1"])
    b = _update(tmp_path, "b", served, ["new-b"], ["l2"])
    errors = []

    def publish(artifact):
        try:
            publish_index(artifact, "production", "")
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(x,)) for x in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    final = _served_index(store, served)
    assert "new-a" in final and "new-b" in final  # both runs' additions
    assert "l1" not in final and "l2" not in final  # and both runs' delistings
    assert final.listing_count == 20
    assert "applying this run's changes again" in capsys.readouterr().out
    assert not any(k.endswith(".json") for k in store.iter(f"indexes/{served}/_leases/"))  # leases released


@pytest.mark.parametrize("where", ["before publishing", "between files", "before the alias moves"])
def test_a_run_that_dies_leaves_every_alias_on_a_complete_version_and_loses_nothing(store, tmp_path, served,
                                                                                     where):
    import lookalike.core.artifacts as artifacts

    repo = index_repo(store, served)
    before = repo.alias_target("production")
    run = _update(tmp_path, "crash", served, ["new-c"], ["l3"])

    class Crash(Exception):
        pass

    def die(*args, **kwargs):
        raise Crash(where)

    with pytest.MonkeyPatch.context() as patch:
        if where == "before publishing":
            patch.setattr(VectorIndex, "publish", die)
        elif where == "between files":
            real_put = store.__class__.put_file
            calls = {"n": 0}

            def put_file(self, key, path, *a, **k):
                calls["n"] += 1
                if calls["n"] == 2:
                    raise Crash(where)
                return real_put(self, key, path, *a, **k)
            patch.setattr(store.__class__, "put_file", put_file)
        else:
            patch.setattr(artifacts.ArtifactRepo, "set_alias", die)
        with pytest.raises(Crash):
            publish_index(run, "production", "")
    assert repo.alias_target("production") == before  # the alias still names the complete old version
    assert "l3" in _served_index(store, served)  # nothing half-visible: the old index is served whole
    assert before in repo.versions() and all(v not in repo.versions() for v in repo.incomplete_versions())
    # The run failed loudly; run again, the delisting lands.
    again = _update(tmp_path, "again", served, ["new-c"], ["l3"])
    publish_index(again, "production", "")
    final = _served_index(store, served)
    assert "l3" not in final and "new-c" in final


def test_train_and_index_moves_the_model_alias_only_after_its_index(store, tmp_path, served):
    import lookalike.core.artifacts as artifacts

    version = new_version()
    _model_folder(tmp_path / "model2", version)
    publish_model(_Artifact(tmp_path / "model2"), "")  # published without its alias, as train-and-index does
    VectorIndex.build(_vectors(20, 5), [f"m{i}" for i in range(20)], model_version=version).save(tmp_path / "i2")
    real = artifacts.ArtifactRepo.set_alias

    def index_alias_then_crash(self, alias, target):
        real(self, alias, target)
        if "/indexes/" in f"/{self.prefix}/":
            raise RuntimeError("crash between the index alias and the model alias")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(artifacts.ArtifactRepo, "set_alias", index_alias_then_crash)
        with pytest.raises(RuntimeError):
            publish_index(_Artifact(tmp_path / "i2"), "production", "production")
    assert model_repo(store).alias_target("production") == served  # still the old model, which has its index
    publish_index(_Artifact(tmp_path / "i2"), "production", "production")
    assert model_repo(store).alias_target("production") == version
    assert index_repo(store, version).alias_target("production") is not None


def test_a_crashed_holders_lease_expires_and_is_no_version(store):
    from lookalike.core.leases import Lease, LeaseTimeout

    repo = index_repo(store, "m")
    key = "indexes/m/_leases/production.json"
    crashed = Lease(store, key, ttl_s=1.0, settle_s=0.05).acquire()
    crashed._held.clear()  # it dies holding the lease: no renewal, no release
    assert repo.incomplete_versions() == [] and repo.versions() == []  # the lease folder is not a version
    with pytest.raises(LeaseTimeout, match="stayed held by another run"):
        Lease(store, key, ttl_s=1.0, settle_s=0.05, wait_s=0.3).acquire()
    with Lease(store, key, ttl_s=1.0, settle_s=0.05, wait_s=10) as taker:  # after its expiry: taken over
        assert json.loads(store.get_bytes(key))["owner"] == taker.owner
    assert not store.exists(key)
