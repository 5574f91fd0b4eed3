"""End to end, for real: train-and-index with kfp.local on a tiny Fashion-MNIST catalog (named as on the
command line) into a real S3 server, then the two KServe servers serve what it published; and a run
whose gate fails publishes nothing and leaves production where it was."""
from __future__ import annotations

import io
import json

import pytest
from conftest import fresh_bucket

from lookalike.pipelines.local import PipelineFailed, run_local
from lookalike.core.artifacts import index_repo, model_repo, sharded_index_repo

pytestmark = pytest.mark.slow

# Four training steps cannot beat the pretrained model: the comparison gate is relaxed here (it has tests of
# its own) so the run goes on to index and publish.
TINY = {"holdout_fraction": 0.2, "image_size": 64, "steps": 4, "samples_per_task": 4, "phone_queries": 20,
        "check_images": False, "min_recall_at_10": 0.0, "min_head_accuracy": 0.0, "min_index_recall": 0.5,
        "pretrained_margin": 1.0}


@pytest.fixture(scope="module")
def published(s3_server, tmp_path_factory):
    """A fresh bucket, a 100-row catalog and one successful train-and-index run into it."""

    from lookalike.catalogs.importers import import_fashion_mnist

    home = tmp_path_factory.mktemp("home")
    with fresh_bucket(s3_server, "e2e", LOOKALIKE_CACHE=str(home / "cache"), LOOKALIKE_HOME=str(home)) as store:
        uri = import_fashion_mnist(store, split_names=("test",), limit=100, progress=False)["test"]
        # By name, as `lookalike train --catalog` takes it: catalogs/fashion-mnist-test/ in this bucket.
        # With a 2-shard version of the index beside it (`lookalike serve --shards 2` serves that).
        run = run_local("train-and-index", {"catalog_uri": "fashion-mnist-test", **TINY, "index_shards": 2},
                        root=home / "runs")
        yield store, uri, run, home


def test_train_and_index_publishes_model_and_index(published):
    from lookalike.core.model_card import CARD_FILE, ModelCard

    store, uri, run, _ = published
    model_version, index_version = run.outputs["model_version"], run.outputs["index_version"]
    models = model_repo(store)
    assert models.versions() == [model_version] and models.aliases() == {"production": model_version}
    indexes = index_repo(store, model_version)
    assert indexes.versions() == [index_version] and indexes.aliases() == {"production": index_version}
    card = ModelCard.from_dict(models.read_json(model_version, CARD_FILE))
    assert card.model_version == model_version and card.preprocessing.size == 64
    assert card.lineage["catalog"] == uri  # the name was resolved to the catalog it means
    evaluation = card.metrics["evaluation"]  # the held-out evaluation travels with the model
    assert 0.0 <= evaluation["phone_recall@10"] <= 1.0 and "baseline_phone_recall@10" in evaluation
    assert "report.html" in models.manifest(model_version)["files"]
    info = indexes.read_json(index_version, "index.json")
    assert info["model_version"] == model_version and info["count"] == 100
    assert [name for name, _ in run.steps][-2:] == ["publish-model", "publish-index"]
    sharded = sharded_index_repo(store, model_version)
    (sharded_version,) = sharded.versions()
    assert sharded.aliases() == {"production": sharded_version}
    shards_card = sharded.read_json(sharded_version, "shards.json")
    assert shards_card["parent_version"] == index_version and shards_card["shards"] == 2
    assert sum(shards_card["shard_counts"]) == 100
    # One confusion matrix per head the model has, drawn by the KFP UI from a ClassificationMetrics artifact.
    sizes = []
    for path in run.run_dir.glob("for-loop-*-iteration-*/show-confusion-matrix/executor_output.json"):
        artifact = json.loads(path.read_text())["artifacts"]["confusion"]["artifacts"][0]
        sizes.append(len(artifact["metadata"]["confusionMatrix"]["rows"]))
    assert sorted(sizes) == sorted(len(labels) for labels in card.heads.values())


def test_the_servers_serve_what_the_pipeline_published(published):
    from lookalike.app.client import query_photos
    from lookalike.app.serving_stack import ServingStack
    from lookalike.catalogs.rows import Catalog

    store, uri, run, home = published
    catalog = Catalog.open(uri, store)
    rows = catalog.rows[:3]
    photos = [catalog.image_bytes(r) for r in rows]
    with ServingStack(model_version="production", index_version="production", log_dir=home / "logs") as stack:
        results = query_photos(stack.endpoints["transformer_rest"], photos, top_k=10)
    assert len(results) == 3
    known = {r.listing_id for r in catalog.rows}
    for row, result in zip(rows, results):
        ids = [m["listing_id"] for m in result["matches"]]
        assert len(ids) == 10 and set(ids) <= known
        # The very catalog image embeds to the vector the pipeline indexed: it finds its own listing first.
        assert ids[0] == row.listing_id
        assert set(result["labels"]) == {"category", "fine_category", "shade"}


def test_a_failing_gate_publishes_nothing_and_leaves_production(published):
    store, uri, run, home = published
    models = model_repo(store)
    before_versions, before_aliases = models.versions(), models.aliases()
    with pytest.raises(PipelineFailed) as failed:
        run_local("train", {"catalog_uri": uri, **{k: v for k, v in TINY.items() if k != "min_index_recall"},
                            "steps": 1, "min_recall_at_10": 1.01, "max_regression": 1.0},
                  root=home / "runs")
    message = str(failed.value)
    assert failed.value.step == "check-model-gates"
    assert "phone_recall@10" in message and "is not >= 1.0100" in message
    assert f"production still points at {run.outputs['model_version']}" in message
    assert "lower it (--param min_recall_at_10" in message
    assert models.versions() == before_versions and models.aliases() == before_aliases
    assert not store.list("models/", recursive=True) or all(
        key.split("/")[1] in (*before_versions, "_aliases") for key in store.list("models/"))


def test_update_adds_new_listings_and_removes_delisted_ones(published):
    from lookalike.predictor.index import VectorIndex
    from lookalike.predictor.index.shards import ShardedIndex
    from lookalike.catalogs.rows import Catalog
    from lookalike.catalogs.importers import import_fashion_mnist

    store, uri, run, home = published
    model_version, before = run.outputs["model_version"], run.outputs["index_version"]
    new_uri = import_fashion_mnist(store, split_names=("train",), limit=10, progress=False)["train"]
    new_ids = [r.listing_id for r in Catalog.open(new_uri, store).rows]
    gone = [r.listing_id for r in Catalog.open(uri, store).rows[:2]]
    store.put_bytes("delisted/today.txt", ("\n".join(gone) + "\n").encode())
    log = io.StringIO()
    result = run_local("update", {"new_listings_uri": new_uri, "delisted_uri": store.uri("delisted/today.txt"),
                                  "phone_queries": 10, "min_recall_at_10": 0.0, "min_index_recall": 0.5,
                                  "check_images": False, "index_shards": 2}, root=home / "runs", out=log)
    after = result.outputs["Output"]
    indexes = index_repo(store, model_version)
    assert after != before and set(indexes.versions()) == {before, after}
    assert indexes.aliases() == {"production": after}
    updated = VectorIndex.fetch(store, model_version, "production")
    assert updated.count == 100 + 10 - 2
    assert all(lid in updated for lid in new_ids) and not any(lid in updated for lid in gone)
    assert VectorIndex.fetch(store, model_version, before).count == 100  # the old version is untouched
    # The 2-shard version moved with it, updated shard by shard: the same photos as the index.
    sharded = ShardedIndex.load(ShardedIndex.fetch_folder(store, model_version, "production"))
    assert sharded.card["parent_version"] == after and len(sharded_index_repo(store, model_version).versions()) == 2
    assert sorted((lid, ph) for part in sharded.shards for lid, ph in zip(part._table.listing_ids,
                                                                          part._table.photo_ids)) == sorted(
        zip(updated._table.listing_ids, updated._table.photo_ids))
    assert "updated sharded version" in log.getvalue() and "shards changed:" in log.getvalue()


def test_index_pipeline_with_a_failing_gate_keeps_the_production_index(published):
    store, uri, run, home = published
    model_version = run.outputs["model_version"]
    indexes = index_repo(store, model_version)
    before_versions, before_aliases = indexes.versions(), indexes.aliases()
    with pytest.raises(PipelineFailed) as failed:
        run_local("index", {"catalog_uri": uri, "phone_queries": 30, "min_recall_at_10": 1.01,
                            "min_index_recall": 0.5}, root=home / "runs")
    assert failed.value.step == "check-index-gates"
    assert "phone_recall@10 through the index" in str(failed.value)
    assert "the production index is unchanged" in str(failed.value)
    assert indexes.versions() == before_versions and indexes.aliases() == before_aliases
