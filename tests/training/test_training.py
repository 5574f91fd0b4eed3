"""Training end to end on tiny real catalogs (Fashion-MNIST, and a colour multi-view one made from it): train
a few steps, evaluate beside the pretrained model, export, reload, identical embeddings; determinism;
listing-aware batches; classes balanced within a task; held-out views; settings chosen from the catalog;
early stopping; the gate that refuses a model worse than the pretrained one; bad input; the command."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_catalog import write_tiny_catalog
from lookalike.catalogs.rows import Catalog, CatalogError
from lookalike.training.data import Augment, BatchLoader, ImageBank, build_tasks, make_sampler
from lookalike.training.export import load_model
from lookalike.training.train import TrainConfig, train
from lookalike.core.model_card import ModelCard
from lookalike.core.preprocessing import PreprocessSpec, preprocess

TINY = dict(image_size=64, crop="none", steps=4, samples_per_task=4, warmup_steps=2, eval_every=2,
            eval_catalog_limit=120, eval_queries=40, phone_queries=20, eval_batch=32, l2sp_weight=0.01)
QUICK = dict(TINY, select_listings=0, test_listings=0, objective="ce")  # no held-out evaluation at all
COLOURS = {"red": (200, 30, 30), "blue": (30, 60, 200), "green": (30, 160, 50)}


def write_multiview_catalog(directory: Path, n_listings: int = 60, *, size: int = 64, seed: int = 0) -> Path:
    """Fashion-MNIST products as coloured studio shots, three photos per listing (front, a turned view and a
    shopper's user photo), labelled fine_category, category and color (red 60%, blue 30%, green 10%)."""
    from lookalike.catalogs.importers import BROAD_CATEGORY, FASHION_MNIST_CLASSES, load_fashion_mnist

    images, labels = load_fashion_mnist("train")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(labels), size=n_listings, replace=False)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for k, i in enumerate(picks):
        colour = "red" if k % 10 < 6 else "blue" if k % 10 < 9 else "green"
        alpha = np.asarray(Image.fromarray(images[i]).resize((size, size), Image.Resampling.BICUBIC),
                           np.float32)[..., None] / 255
        front = Image.fromarray((255 * (1 - alpha) + np.array(COLOURS[colour]) * alpha).astype(np.uint8))
        turned = front.rotate(float(rng.uniform(-12, 12)), fillcolor=(255, 255, 255),
                              translate=tuple(int(v) for v in rng.integers(-4, 5, 2)))
        user = Image.new("RGB", (size, size), (225, 222, 215))
        user.paste(front.resize((size * 3 // 4, size * 3 // 4)), (size // 8, size // 8))
        lid = f"mv-{int(i):05d}"
        photos = []
        for name, img, source in (("front", front, "catalog"), ("turned", turned, "catalog"),
                                  ("user", user, "user_photo")):
            img.save(directory / "images" / f"{lid}-{name}.png")
            photos.append({"uri": f"images/{lid}-{name}.png", "photo_id": name, "source": source})
        fine = FASHION_MNIST_CLASSES[int(labels[i])]
        lines.append(json.dumps({"listing_id": lid, "title": f"{colour} {fine}", "images": photos,
                                 "labels": {"fine_category": fine, "category": BROAD_CATEGORY[fine], "color": colour}}))
    path = directory / "catalog.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return (Catalog.open(write_tiny_catalog(root / "train", 160)),
            Catalog.open(write_tiny_catalog(root / "test", 40, split="test")))


@pytest.fixture(scope="module")
def multiview(tmp_path_factory):
    return Catalog.open(write_multiview_catalog(tmp_path_factory.mktemp("multiview"), 60))


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    catalog, eval_catalog = tiny
    out = tmp_path_factory.mktemp("model") / "m"
    # no early stopping: four steps rarely beat the start, and these tests look at a model that trained
    config = TrainConfig(**{**TINY, "select_listings": 0})
    return train(catalog, config, eval_catalog=eval_catalog, out_dir=out, progress=False, seed=0)


def test_train_evaluate_export_reload_identical_embeddings(trained, tiny):
    import onnxruntime as ort

    result = trained
    assert len(result.history) == 4 and all(np.isfinite(h["loss"]) for h in result.history)
    assert {"category", "fine_category", "shade", "proxy", "l2sp"} <= set(result.history[-1])
    ev = result.metrics["eval"]
    # every figure is there for the fine-tuned and the pretrained model (at its own 224 px), per class too
    assert ev["baseline"]["preprocessing"]["size"] == 224
    assert set(ev["retrieval"]) == {"category", "fine_category", "shade"}
    for m in ev["retrieval"].values():
        assert set(m["finetuned"]) == set(m["baseline"]) == {"p@1", "p@10", "map@10"}
        assert all({"finetuned", "baseline", "queries"} <= set(v) for v in m["per_class"].values())
    assert ev["phone"]["simulated"] is True and "simulated" in ev["phone"]["note"]
    assert 0.0 <= ev["phone"]["baseline"]["recall@10"] <= 1.0
    model_dir = result.model_dir
    for name in ("model.safetensors", "model.onnx", "model.json", "report.md", "plots/loss.png", "plots/recall.png",
                 "plots/per_class_category.png"):
        assert (model_dir / name).is_file(), name
    card = ModelCard.read(model_dir)
    assert card.heads["fine_category"][:2] == ["Ankle boot", "Bag"]  # label vocabulary from the catalog
    assert card.preprocessing.size == 64 and card.lineage["catalog"] == tiny[0].uri
    assert card.lineage["train_config"]["objective"] == "ce+proxy" and "trainable_blocks" in card.lineage["chosen"]
    report = (model_dir / "report.md").read_text()
    assert "SIMULATED" in report and "pretrained" in report and "Precision@10 per class of `shade`" in report

    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        assert not any("prox" in key for key in f.keys())  # the listing proxies are training-only
    reloaded, reloaded_card = load_model(model_dir)
    assert reloaded_card == card
    catalog = tiny[0]
    spec = card.preprocessing
    x = torch.from_numpy(np.stack([preprocess(catalog.load_image(r), spec) for r in catalog.rows[:6]]))
    with torch.no_grad():
        a, b = result.model.eval()(x), reloaded(x)
    assert torch.equal(a["embedding"], b["embedding"])
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    emb = session.run(["embedding"], {"images": x.numpy()})[0]
    assert np.abs(emb - a["embedding"].numpy()).max() <= 1e-4


def test_training_moves_the_trainable_stages_only(trained):
    from lookalike.training.model import ModelConfig, create_model

    fresh = create_model(ModelConfig(heads=trained.model_config.heads, trainable_blocks=3,
                                     preprocessing=trained.model_config.preprocessing))
    trained_bb, fresh_bb = trained.model.backbone, fresh.backbone
    assert torch.equal(trained_bb.conv_stem.weight, fresh_bb.conv_stem.weight)
    assert torch.equal(trained_bb.blocks[3][0].bn1.running_mean, fresh_bb.blocks[3][0].bn1.running_mean)
    assert not torch.equal(trained_bb.blocks[-1][0].conv_pw.weight, fresh_bb.blocks[-1][0].conv_pw.weight)


def test_same_seed_same_run(tiny):
    config = TrainConfig(**{**TINY, "steps": 3, "phone_p": 0.5, "test_listings": 0, "select_listings": 0})
    a = train(tiny[0], config, progress=False, seed=5)
    b = train(tiny[0], config, progress=False, seed=5)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a.model.eval().embed(x), b.model.eval().embed(x))


# ---- batches: P listings x K views, tasks and classes balanced ------------------------------------

def test_batches_hold_views_of_each_listing_its_other_photos_first(multiview):
    bank = ImageBank.load(multiview, progress=False)
    assert len(bank) == 180 and len(bank.listing_ids) == 60
    tasks, _ = build_tasks(bank.rows)
    assert {t: len(d) for t, d in tasks.items()} == {"category": 60, "color": 60, "fine_category": 60}
    sampler = make_sampler(tasks, 4, seed=0)
    loader = BatchLoader(bank, tasks, sampler, Augment(PreprocessSpec(size=48, resize=48, crop="none")), views=2)
    for batch in loader.iterate(0, 3):
        assert batch.images.shape == (24, 3, 48, 48)
        assert np.bincount(batch.task_ids.numpy()).tolist() == [8, 8, 8]
        assert torch.equal(batch.listing[:12], batch.listing[12:])  # two views of the same listings
        assert (batch.rows[:12] != batch.rows[12:]).all()  # each view another photo of the listing
        for t, y, row, listing in zip(batch.task_ids, batch.targets, batch.rows, batch.listing):
            task = sampler.tasks[int(t)]
            assert bank.rows[int(row)].listing_id == bank.listing_ids[int(listing)]
            if int(y) >= 0:
                assert tasks[task].labels[int(y)] == bank.rows[int(row)].labels[task]
            else:
                assert task == "color"  # only a colour label is ever dropped (a strong cast)
    assert torch.equal(loader.make(1).images, loader.make(1).images)  # a batch is a function of (seed, step)


def test_a_minority_colour_is_drawn_more_often_than_its_share(multiview):
    bank = ImageBank.load(multiview, progress=False)
    tasks, _ = build_tasks(bank.rows)
    colour = tasks["color"]
    green = colour.labels.index("green")
    shares = {}
    for power in (1.0, 0.5):
        sampler = make_sampler(tasks, 8, seed=0, class_power=power)
        t = sampler.tasks.index("color")
        drawn = np.concatenate([sampler.plan(s).position[sampler.plan(s).task == t] for s in range(300)])
        shares[power] = float((colour.targets[drawn] == green).mean())
    assert shares[1.0] == pytest.approx(0.1, abs=0.03)  # the catalog's own mix
    assert shares[0.5] == pytest.approx(np.sqrt(6) / (np.sqrt(36) + np.sqrt(18) + np.sqrt(6)), abs=0.03)


def test_strong_colour_casts_drop_the_colour_label_of_that_view(multiview):
    bank = ImageBank.load(multiview, progress=False)
    tasks, _ = build_tasks(bank.rows)
    sampler = make_sampler(tasks, 8, seed=0)
    augment = Augment(PreprocessSpec(size=32, resize=32, crop="none"), phone_p=1.0, second_view_phone_p=1.0)
    targets = torch.cat([b.targets[b.task_ids == sampler.tasks.index("color")]
                         for b in BatchLoader(bank, tasks, sampler, augment, views=2).iterate(0, 4)])
    assert (targets == -1).any() and (targets >= 0).any()


# ---- held out, and the listing search -------------------------------------------------------------

def test_held_out_photos_are_one_per_listing_user_photos_first_and_never_trained(multiview):
    from lookalike.training.queries import hold_out

    bank = ImageBank.load(multiview, progress=False)
    split = hold_out(bank, select_listings=4, test_listings=100, seed=0)
    assert len(split.select) == 4 and len(split.test) == 6  # at most a tenth of the listings each
    held = np.concatenate([split.select, split.test])
    assert len({bank.rows[i].listing_id for i in held}) == len(held)  # one photo of each listing
    assert all(bank.rows[i].source == "user_photo" for i in held)
    assert not set(held.tolist()) & set(split.train.tolist())
    assert len(split.train) + len(held) == len(bank)


def test_a_search_returns_listings_by_their_best_photo_never_twice():
    from lookalike.training.evaluate import listing_topk

    gallery = np.eye(4, dtype=np.float32)[[0, 1, 1, 2, 3]]  # photos; listing 1 has two identical photos
    listing = np.array([0, 1, 1, 2, 3])
    query = np.array([[0.1, 1.0, 0.0, 0.2]], dtype=np.float32)
    top = listing_topk(query, gallery, listing, 10)
    assert top[0].tolist()[:4] == [1, 3, 0, 2] and len(set(top[0].tolist())) == 4
    # the query photo left out: the listing is still found through its other photo
    assert listing_topk(query, gallery, listing, 1, exclude_photo=np.array([1]))[0, 0] == 1
    assert listing_topk(query, gallery, listing, 1, exclude_listing=np.array([1]))[0, 0] == 3


# ---- settings chosen from the catalog --------------------------------------------------------------

def test_defaults_come_from_the_catalog_with_their_reasons():
    from lookalike.training.defaults import cpu_images_per_second, resolve

    photos, why = resolve(TrainConfig(), sizes=[(640, 480)] * 9 + [(30, 30)], train_photos=3000, n_tasks=3,
                          device="cpu", views=2)
    assert (photos.image_size, photos.crop, photos.trainable_blocks, photos.l2sp_weight) == (224, "center", 2, 0.01)
    assert "photo catalog" in {c.setting: c.why for c in why}["image_size"]
    assert photos.preprocessing().resize == 256
    minutes = photos.steps * 48 / cpu_images_per_second(224) / 60
    assert 5 < minutes <= 12  # a few-thousand-photo catalog trains in minutes, not hours, on 2 CPU cores
    thumbs, _ = resolve(TrainConfig(), sizes=[(28, 28)] * 10, train_photos=59300, n_tasks=3, device="cpu", views=2)
    assert (thumbs.image_size, thumbs.crop, thumbs.trainable_blocks, thumbs.l2sp_weight) == (80, "none", 3, 0.0)
    assert 1300 <= thumbs.steps <= 1500  # Fashion-MNIST keeps the length measured for it (1400 steps)
    given, why = resolve(TrainConfig(image_size=96, crop="none", epochs=2), sizes=[(640, 480)], train_photos=480,
                         n_tasks=1, device="cpu", views=2)
    assert (given.image_size, given.steps) == (96, 60) and "2 epochs" in {c.setting: c.why for c in why}["steps"]
    assert resolve(TrainConfig(steps=7), sizes=[(28, 28)], train_photos=10, n_tasks=1, device="cpu",
                   views=1)[0].steps == 7
    assert resolve(TrainConfig(l2sp_weight=0.5), sizes=[(28, 28)], train_photos=10, n_tasks=1, device="cpu",
                   views=1)[0].l2sp_weight == 0.5  # a given weight is kept
    with pytest.raises(ValueError, match="l2sp_weight must be 0 or more"):
        TrainConfig(l2sp_weight=-0.5)


def test_a_photo_catalog_trains_at_224_and_the_card_says_why(tmp_path):
    catalog = Catalog.open(write_multiview_catalog(tmp_path / "photos", 20, size=240))
    result = train(catalog, TrainConfig(steps=2, samples_per_task=2, select_listings=2, test_listings=2,
                                        phone_queries=4, eval_catalog_limit=30, eval_batch=16),
                   out_dir=tmp_path / "m", progress=False)
    card = ModelCard.read(tmp_path / "m")
    assert (card.preprocessing.size, card.preprocessing.resize, card.preprocessing.crop) == (224, 256, "center")
    assert "photo catalog" in card.lineage["chosen"]["image_size"]["why"]
    assert "views" in result.metrics["eval"]["listing"]  # held-out views find their listing's other photos
    assert "chosen from the catalog: image_size = 224" in (tmp_path / "m" / "report.md").read_text()
    stopping = result.metrics["train"]["early_stopping"]
    assert [e["step"] for e in stopping["evaluations"]][:1] == [0]  # the start is a candidate too


def test_early_stopping_keeps_the_best_weights(trained, tiny):
    from lookalike.training.selection import Selector

    model = trained.model
    bank = ImageBank.load(tiny[0], progress=False)
    selector = Selector(model, bank, np.arange(10), phone=8, seed=0, patience=2)
    value, parts = selector.score(model)
    assert 0.0 <= value <= 1.0 and {"phone", "labels"} <= set(parts)  # single-photo listings: no views
    assert selector.check(model, 1) is False
    best = {k: v.clone() for k, v in model.state_dict().items()}
    original = model.projection.weight.clone()
    with torch.no_grad():
        model.projection.weight.normal_()
    selector.score = lambda m: (-1.0, {})  # whatever the set says, these weights score worse
    assert selector.check(model, 2) is False and selector.check(model, 3) is True  # patience 2: stop
    assert selector.best_step == 1
    selector.restore(model)
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())
    assert torch.equal(model.projection.weight, original)


# ---- the gate ---------------------------------------------------------------------------------------

def test_the_gate_refuses_a_model_worse_than_the_pretrained_one(tmp_path, multiview):
    from lookalike.pipelines.steps.evaluation import measure_model
    from lookalike.pipelines.steps.gates import check_model_gates
    from lookalike.pipelines.steps.runner import GateFailed
    from lookalike.catalogs.rows import write_catalog
    from lookalike.training.export import export_model
    from lookalike.training.model import ModelConfig, create_model

    rows = [r.with_image(multiview.resolve_image(r)) for r in multiview.rows]
    write_catalog(rows, tmp_path / "catalog.jsonl")
    write_catalog([r for r in rows if int(r.listing_id[-1]) % 4 == 0], tmp_path / "eval.jsonl")
    # a deliberately damaged model: the weights of its last stages shuffled (same magnitudes, no meaning)
    config = ModelConfig(heads=multiview.tasks(), trainable_blocks=2,
                         preprocessing=PreprocessSpec(size=64, resize=64, crop="none"))
    model = create_model(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.backbone.blocks[-2:].parameters():
            p.copy_(p.flatten()[torch.randperm(p.numel())].view_as(p))
    export_model(model, config, tmp_path / "model", model_version="damaged")
    flat, _ = measure_model(tmp_path / "model", tmp_path / "eval.jsonl", tmp_path / "catalog.jsonl",
                            phone_queries=10, seed=0)
    assert flat["views_recall@10"] < flat["baseline_views_recall@10"]
    (tmp_path / "metrics.json").write_text(json.dumps(flat))

    class Artifact:
        def __init__(self, path):
            self.path = str(path)

    args = dict(model=Artifact(tmp_path / "model"), metrics=Artifact(tmp_path / "metrics.json"),
                eval_set=Artifact(tmp_path / "eval.jsonl"), catalog=Artifact(tmp_path / "catalog.jsonl"),
                min_recall_at_10=0.0, min_head_accuracy=0.0, max_regression=1.0, compare_to="", phone_queries=10,
                seed=0)
    with pytest.raises(GateFailed, match="views_recall@10 vs pretrained") as refused:
        check_model_gates(**args)
    assert "Nothing was published" in str(refused.value) and "pretrained_margin" in str(refused.value)
    assert check_model_gates(**args, pretrained_margin=1.0)["passed"] is True  # relaxed on purpose


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
    result = train(Catalog.open(path), TrainConfig(**{**QUICK, "steps": 1}), progress=False)
    assert "material" not in result.model_config.heads
    assert any("'material' is skipped: it has a single class ('cotton')" in w for w in result.warnings)


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    path = write_tiny_catalog(tmp_path / "c", 40)
    rows = Catalog.open(path).rows
    (tmp_path / "c" / rows[3].image).write_bytes(b"not an image at all")
    (tmp_path / "c" / rows[7].image).unlink()
    result = train(Catalog.open(path), TrainConfig(**{**QUICK, "steps": 1}), progress=False)
    assert any(w.startswith("2 of 40 images could not be read") for w in result.warnings)
    bank = ImageBank.load(Catalog.open(path), progress=False)
    assert {lid for lid, _ in bank.skipped} == {rows[3].listing_id, rows[7].listing_id}


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(objective="ce+arcface")
    with pytest.raises(ValueError, match="crop"):
        TrainConfig(crop="square")
    with pytest.raises(ValueError, match="resolve the config first"):
        TrainConfig().preprocessing()


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
    from lookalike.cli.main import main
    from lookalike.core.artifacts import model_repo

    from lookalike.catalogs.importers import import_fashion_mnist

    uri = import_fashion_mnist(store, split_names=("train",), limit=60, progress=False)["train"]
    assert uri.startswith("s3://")  # images are read from the real S3 server
    out = tmp_path / "model"
    code = main(["train", "--catalog", "fashion-mnist-train", "--out", str(out), "--steps", "2", "--image-size", "48",
                 "--samples-per-task", "2", "--objective", "ce", "--phone-queries", "5", "--no-progress",
                 "--publish", "--alias", "candidate"])
    assert code == 0
    text = capsys.readouterr().out
    assert "chose crop = none: squashed whole" in text  # what it chose from the catalog, and why
    version = model_repo(store).resolve("candidate")
    # One version, minted when the run started: the folder's card, the published version and the alias agree.
    assert ModelCard.read(out).model_version == version == model_repo(store).versions()[0]
    assert f"published model {version}; model alias candidate → {version}" in text
    assert ModelCard.read(model_repo(store).fetch(version)) == ModelCard.read(out)
    assert main(["train", "--catalog", str(tmp_path / "missing.jsonl")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_shared_trunk_embedding_equals_separate_passes(trained):
    """Evaluation runs the frozen trunk once for both models: it must equal two full passes."""
    import torch.nn.functional as F

    from lookalike.training.evaluate import PairedEmbedder, pretrained_backbone_copy
    from lookalike.training.model import ModelConfig, create_model

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
        assert torch.allclose(trained.model.forward_from_trunk(trained.model.trunk(x))["embedding"],
                              out["embedding"], atol=1e-6)
