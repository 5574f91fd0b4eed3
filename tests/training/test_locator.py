"""The locator learns where the product is from the simulator's free boxes, and serves from the export."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lookalike.catalogs.importers import load_fashion_mnist
from lookalike.catalogs.rows import CatalogRow
from lookalike.core.preprocessing import PreprocessSpec
from lookalike.training.data import ImageBank
from lookalike.training.locator import box_iou, train_locator
from lookalike.training.model import ModelConfig, create_model
from lookalike.training.phone_photos import EVALUATION, simulate


def _bank(n: int = 60) -> ImageBank:
    images, labels = load_fashion_mnist("test")
    rows = [CatalogRow(f"l{i}", f"l{i}.png", {"c": str(int(labels[i]))}, "catalog", f"t{i}") for i in range(n)]
    return ImageBank(rows, [Image.fromarray(images[i]).convert("RGB").resize((112, 112)) for i in range(n)])


def test_simulated_views_report_the_box_their_mask_has():
    img = _bank(1).images[0]
    photo, info = simulate(img, 3, out_size=160, recipe=EVALUATION, cutout=True)
    ys, xs = np.nonzero(info.mask >= 0.5)
    assert info.mask.shape == (160, 160) and photo.size == (160, 160)
    assert info.box == pytest.approx((xs.min() / 160, ys.min() / 160, (xs.max() + 1) / 160, (ys.max() + 1) / 160))
    assert 0.05 < (info.box[2] - info.box[0]) * (info.box[3] - info.box[1]) < 0.95  # in a scene, not the frame


@pytest.mark.slow
def test_the_locator_finds_products_better_than_the_whole_frame_and_exports(tmp_path):
    from lookalike.predictor.embedder import Embedder
    from lookalike.training.export import export_model

    spec = PreprocessSpec(size=96, resize=96, interpolation="bilinear")
    config = ModelConfig(heads={"c": [str(i) for i in range(10)]}, embedding_dim=16, preprocessing=spec,
                         locator=True)
    model = create_model(config)
    metrics = train_locator(model, _bank(), spec, views=240, seed=0, device=torch.device("cpu"), steps=150)
    held = metrics["held_out"]
    # What boxing the whole photo scores on the same kind of views (the product fills 45-85% of the side).
    whole = np.mean([box_iou((0, 0, 1, 1), simulate(img, k, out_size=320).__getitem__(1).box)
                     for k, img in enumerate(_bank(20).images)])
    assert held["mean_iou"] > max(0.45, whole + 0.1), (held, whole)

    out = export_model(model, config, tmp_path / "m", model_version="v-loc")  # ONNX checked against torch
    embedder = Embedder.load(out, backend="onnxruntime")
    assert embedder.has_locator
    x = np.random.default_rng(0).standard_normal((2, 3, 96, 96)).astype(np.float32)
    emb, probs, objectness = embedder.embed_and_locate(x)
    assert emb.shape == (2, 16) and objectness.shape == (2, 3, 3) and ((0 <= objectness) & (objectness <= 1)).all()
    assert np.allclose(embedder.embed(x)[0], emb, atol=1e-5)  # the embedding is the same with or without it
