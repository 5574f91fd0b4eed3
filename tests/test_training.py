"""Training end to end on tiny real Fashion-MNIST catalogs: train a few steps, evaluate beside the
baseline, export, reload, identical embeddings; determinism; bad input; the `lookalike train` command."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_catalog import write_tiny_catalog
from training.catalog import Catalog, CatalogError
from training.data import Augment, BatchLoader, ImageBank, build_tasks
from training.export import load_model
from training.sampler import BalancedTaskSampler
from training.train import TrainConfig, train
from transformer.preprocessing import PreprocessSpec, preprocess

TINY = dict(image_size=64, steps=4, samples_per_task=4, warmup_steps=2, eval_catalog_limit=120, eval_queries=40,
            phone_queries=20, eval_batch=32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return (Catalog.open(write_tiny_catalog(root / "train", 160)),
            Catalog.open(write_tiny_catalog(root / "test", 40, split="test")))


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    catalog, eval_catalog = tiny
    out = tmp_path_factory.mktemp("model") / "m"
    return train(catalog, TrainConfig(**TINY), eval_catalog=eval_catalog, out_dir=out, progress=False, seed=0)


def test_train_evaluate_export_reload_identical_embeddings(trained, tiny):
    import onnxruntime as ort

    result = trained
    assert len(result.history) == 4 and all(np.isfinite(h["loss"]) for h in result.history)
    assert {"category", "fine_category", "shade", "triplet"} <= set(result.history[-1])
    ev = result.metrics["eval"]
    # every figure is there for both the fine-tuned model and the baseline, and phone figures say simulated
    assert set(ev["retrieval"]) == {"category", "fine_category", "shade"}
    for m in ev["retrieval"].values():
        assert set(m["finetuned"]) == set(m["baseline"]) == {"p@1", "p@10", "map@10"}
    assert ev["phone"]["simulated"] is True and "simulated" in ev["phone"]["note"]
    assert 0.0 <= ev["phone"]["baseline"]["recall@10"] <= 1.0
    model_dir = result.model_dir
    for name in ("model.safetensors", "model.onnx", "model.json", "report.md", "plots/loss.png", "plots/recall.png"):
        assert (model_dir / name).is_file(), name
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["heads"]["fine_category"][:2] == ["Ankle boot", "Bag"]  # label vocabulary from the catalog
    assert meta["preprocessing"]["size"] == 64 and meta["lineage"]["catalog"] == tiny[0].uri
    assert "SIMULATED" in (model_dir / "report.md").read_text()

    reloaded, _ = load_model(model_dir)
    catalog = tiny[0]
    spec = PreprocessSpec.from_dict(meta["preprocessing"])
    x = torch.from_numpy(np.stack([preprocess(catalog.load_image(r), spec) for r in catalog.rows[:6]]))
    with torch.no_grad():
        a, b = result.model.eval()(x), reloaded(x)
    assert torch.equal(a["embedding"], b["embedding"])
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    emb = session.run(["embedding"], {"images": x.numpy()})[0]
    assert np.abs(emb - a["embedding"].numpy()).max() <= 1e-4


def test_training_moves_the_trainable_stages_only(trained):
    from training.model import ModelConfig, create_model

    fresh = create_model(ModelConfig(heads=trained.model_config.heads, trainable_blocks=3,
                                     preprocessing=trained.model_config.preprocessing))
    trained_bb, fresh_bb = trained.model.backbone, fresh.backbone
    assert torch.equal(trained_bb.conv_stem.weight, fresh_bb.conv_stem.weight)
    assert torch.equal(trained_bb.blocks[3][0].bn1.running_mean, fresh_bb.blocks[3][0].bn1.running_mean)
    assert not torch.equal(trained_bb.blocks[-1][0].conv_pw.weight, fresh_bb.blocks[-1][0].conv_pw.weight)


def test_same_seed_same_run(tiny):
    config = TrainConfig(**{**TINY, "steps": 3, "phone_p": 0.5})
    a = train(tiny[0], config, progress=False, seed=5)
    b = train(tiny[0], config, progress=False, seed=5)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a.model.eval().embed(x), b.model.eval().embed(x))


def test_batches_are_balanced_two_view_and_include_user_photos(tiny):
    catalog = tiny[0]
    bank = ImageBank.load(catalog, progress=False)
    assert any(r.source == "user_photo" for r in bank.rows)  # trained on like any other row
    tasks, _ = build_tasks(bank.rows)
    sampler = BalancedTaskSampler({t: len(v) for t, v in tasks.items()}, 4, seed=0)
    loader = BatchLoader(bank, tasks, sampler, Augment(PreprocessSpec(size=48, resize=48, crop="none")),
                         two_views=True)
    batches = list(loader.iterate(0, 3))
    assert len(batches) == 3
    for batch in batches:
        assert batch.images.shape == (24, 3, 48, 48)
        assert np.bincount(batch.task_ids.numpy()).tolist() == [8, 8, 8]
        assert torch.equal(batch.listing[:12], batch.listing[12:])  # two views of the same listings
        for i, (t, y, row) in enumerate(zip(batch.task_ids, batch.targets, batch.listing)):
            task = sampler.tasks[int(t)]
            assert tasks[task].labels[int(y)] == bank.rows[int(row)].labels[task]
    assert torch.equal(loader.make(1).images, batches[1].images)  # a batch is a function of (seed, step)


# ---- bad input ------------------------------------------------------------------------------------

def test_task_with_labels_missing_everywhere_is_skipped_with_a_warning(tiny, caplog):
    bank = ImageBank.load(tiny[0], progress=False)
    with caplog.at_level(logging.WARNING):
        tasks, warnings = build_tasks(bank.rows, requested=["fine_category", "color"])
    assert list(tasks) == ["fine_category"]
    assert any("'color' is skipped: no row" in w for w in warnings)
    assert "color" in caplog.text
    with pytest.raises(CatalogError, match="no task can be trained.*color"):
        build_tasks(bank.rows, requested=["color"])


def test_task_with_one_class_is_skipped_and_said_so(tmp_path):
    path = write_tiny_catalog(tmp_path / "c", 40, extra_labels=lambda i: {"material": "cotton"})
    result = train(Catalog.open(path), TrainConfig(**{**TINY, "steps": 1, "objective": "ce"}), progress=False)
    assert "material" not in result.model_config.heads
    assert any("'material' is skipped: it has a single class ('cotton')" in w for w in result.warnings)


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    path = write_tiny_catalog(tmp_path / "c", 40)
    rows = Catalog.open(path).rows
    (tmp_path / "c" / rows[3].image).write_bytes(b"not an image at all")
    (tmp_path / "c" / rows[7].image).unlink()
    result = train(Catalog.open(path), TrainConfig(**{**TINY, "steps": 1, "objective": "ce"}), progress=False)
    assert any(w.startswith("2 of 40 images could not be read") for w in result.warnings)
    bank = ImageBank.load(Catalog.open(path), progress=False)
    assert {lid for lid, _ in bank.skipped} == {rows[3].listing_id, rows[7].listing_id}


def test_empty_catalog_is_a_clear_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(CatalogError, match="empty"):
        Catalog.open(tmp_path / "empty.jsonl")
    with pytest.raises(CatalogError, match="empty"):
        train(Catalog.from_rows([], uri="empty"), TrainConfig(**TINY), progress=False)


def test_all_images_unreadable_is_a_clear_error(tmp_path):
    path = write_tiny_catalog(tmp_path / "c", 5)
    for png in (tmp_path / "c" / "images").iterdir():
        png.write_bytes(b"garbage")
    with pytest.raises(CatalogError, match="none of the 5 images"):
        ImageBank.load(Catalog.open(path), progress=False)


# ---- the command ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_lookalike_train_command_writes_and_publishes(tmp_path, store, capsys):
    from pipelines.cli import main
    from storage.artifacts import model_repo

    from training.importers import import_fashion_mnist

    uri = import_fashion_mnist(store, split_names=("train",), limit=60, progress=False)["train"]
    assert uri.startswith("s3://")  # images are read from the real S3 server
    out = tmp_path / "model"
    code = main(["train", "--catalog", "fashion-mnist-train", "--out", str(out), "--steps", "2", "--image-size", "48",
                 "--samples-per-task", "2", "--objective", "ce", "--no-progress", "--publish", "--alias", "candidate"])
    assert code == 0
    text = capsys.readouterr().out
    assert "published model" in text
    version = model_repo(store).resolve("candidate")
    assert json.loads((out / "model.json").read_text())["model_version"] == version
    assert main(["train", "--catalog", str(tmp_path / "missing.jsonl")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_shared_trunk_embedding_equals_separate_passes(trained):
    """Evaluation runs the frozen trunk once for both models: it must equal two full passes."""
    import torch.nn.functional as F

    from training.evaluate import PairedEmbedder, pretrained_backbone_copy
    from training.model import ModelConfig, create_model

    fresh = create_model(ModelConfig(heads=trained.model_config.heads, trainable_blocks=3,
                                     preprocessing=trained.model_config.preprocessing))
    baseline = pretrained_backbone_copy(fresh)
    embedder = PairedEmbedder(trained.model, baseline)
    assert embedder.cut == 4  # 7 stages, the last 3 fine-tuned
    x = torch.randn(3, 3, 64, 64)
    emb, base, logits = embedder(x)
    with torch.no_grad():
        out = trained.model.eval()(x)
        assert torch.allclose(emb, out["embedding"], atol=1e-6)
        assert torch.allclose(base, F.normalize(baseline(x), dim=-1), atol=1e-6)
        assert torch.allclose(logits["shade"], out["logits"]["shade"], atol=1e-5)
