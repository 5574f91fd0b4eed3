"""The localisation measurement: every map and box rule it sets side by side gets a recall and a box IoU."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from lookalike.catalogs.importers import load_fashion_mnist
from lookalike.catalogs.rows import CatalogRow
from lookalike.core.preprocessing import PreprocessSpec
from lookalike.training.data import ImageBank
from lookalike.training.evaluate import pretrained_backbone_copy
from lookalike.training.locator_eval import detail_lines, localisation_eval, localise_line
from lookalike.training.model import ModelConfig, create_model


def test_every_map_and_rule_is_measured_on_both_query_kinds():
    images, labels = load_fashion_mnist("test")
    rows = [CatalogRow(f"l{i}", f"l{i}.png", {"c": str(int(labels[i]))}, "catalog", f"t{i}") for i in range(12)]
    bank = ImageBank(rows, [Image.fromarray(images[i]).convert("RGB").resize((64, 64)) for i in range(12)])
    spec = PreprocessSpec(size=64, resize=64, crop="none")
    model = create_model(ModelConfig(heads={"c": [str(i) for i in range(10)]}, embedding_dim=16, preprocessing=spec,
                                     locator=True))
    baseline = pretrained_backbone_copy(create_model(ModelConfig()))
    result = localisation_eval(model, baseline, bank, np.arange(12), queries=4, seed=0, device=torch.device("cpu"),
                               timing_photos=2)
    expected = {"whole", "crop", "fused", "oracle", "saliency m=0", "saliency16 m=0", "saliency32x16 m=0",
                "saliency+otsu m=0", "saliency+peak m=0", "saliency+mass m=0", "oracle m=0.12"}
    for kind in ("placed", "cutout"):
        measured = result[kind]
        assert expected <= set(measured["finetuned"]), sorted(measured["finetuned"])
        assert set(measured["iou_by"]) == set(measured["cropped_by"]) >= {"saliency", "saliency16", "saliency+peak"}
        assert all(0.0 <= v <= 1.0 for v in measured["iou_by"].values())
    lines = detail_lines(result)
    assert any("saliency32x16 m=0" in line for line in lines)
    assert localise_line("tiny", result).startswith("localise: tiny cutout_recall@10 crop=")
