"""Checkpoints: bit-exact round trip, and clear refusals of anything that does not fit."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lgur.model.checkpoint import CheckpointError, card_path, load_checkpoint, row_count, save_checkpoint
from lgur.model.lgur import LGUR
from lgur.model.serving import trainable_state_dict
from tests.conftest import CAPTIONS, random_images


@pytest.fixture()
def saved(tiny_model: LGUR, tmp_path: Path) -> Path:
    return save_checkpoint(tiny_model, tmp_path / "model.safetensors", {"metrics": {"test": {"R@1": 1.0}}})


def test_round_trip_is_bit_exact(tiny_model: LGUR, saved: Path) -> None:
    loaded, card = load_checkpoint(saved)
    original = trainable_state_dict(tiny_model)
    restored = trainable_state_dict(loaded)
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    ids, mask = tiny_model.tokenize(CAPTIONS)
    images = random_images(tiny_model, 2)
    with torch.no_grad():
        assert torch.equal(tiny_model.embed_texts(ids, mask), loaded.embed_texts(ids, mask))
        assert torch.equal(tiny_model.embed_images(images), loaded.embed_images(images))
    assert card["metrics"]["test"]["R@1"] == 1.0
    assert card["text_encoder"]["fingerprint"] == tiny_model.text_encoder.fingerprint
    assert card["text_encoder"]["source"] == "package"


def resave(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Replace the weights and re-sign the card: a consistent file whose content is what we test."""
    from lgur.model.checkpoint import sha256_file

    save_file(state, str(path))
    card = json.loads(card_path(path).read_text())
    card["weights_sha256"] = sha256_file(path)
    card_path(path).write_text(json.dumps(card))


def test_half_precision_round_trip(tiny_model: LGUR, tmp_path: Path) -> None:
    path = save_checkpoint(tiny_model, tmp_path / "half.safetensors", dtype="float16")
    assert all(t.dtype == torch.float16 for t in load_file(str(path)).values() if t.is_floating_point())
    loaded, card = load_checkpoint(path)
    assert card["dtype"] == "float16"
    for key, value in trainable_state_dict(tiny_model).items():
        assert torch.equal(value.half().float(), loaded.state_dict()[key]), key


def test_int8_storage_is_close_and_smaller(tiny_model: LGUR, tmp_path: Path) -> None:
    half = save_checkpoint(tiny_model, tmp_path / "half.safetensors", dtype="float16")
    path = save_checkpoint(tiny_model, tmp_path / "int8.safetensors", dtype="int8")
    stored = load_file(str(path))
    assert stored["dga.dictionary"].dtype == torch.int8 and stored["dga.dictionary:scale"].dtype == torch.float32
    assert path.stat().st_size < 0.65 * half.stat().st_size
    loaded, card = load_checkpoint(path)
    assert card["dtype"] == "int8"
    for key, value in trainable_state_dict(tiny_model).items():
        restored = loaded.state_dict()[key]
        if not value.is_floating_point():  # counters (batch norm's batches seen) are stored as they are
            assert torch.equal(value, restored), key
            continue
        assert restored.dtype == torch.float32
        if value.ndim >= 2:  # each element within half a quantisation step of its row
            rows = row_count(value.shape)  # per output channel of a convolution, else per last-dim row
            step = value.reshape(rows, -1).abs().amax(1) / 127
            error = (value - restored).reshape(rows, -1).abs()
            assert (error <= step[:, None] / 2 + 1e-6).all(), key
        else:
            assert torch.equal(value.half().float(), restored), key
    ids, mask = tiny_model.tokenize(CAPTIONS)
    images = random_images(tiny_model, 2)
    with torch.no_grad():
        for a, b in [
            (tiny_model.embed_texts(ids, mask), loaded.embed_texts(ids, mask)),
            (tiny_model.embed_images(images), loaded.embed_images(images)),
        ]:
            assert (a * b).sum(-1).min() > 0.99


def test_int8_without_its_scale_is_refused(tiny_model: LGUR, tmp_path: Path) -> None:
    path = save_checkpoint(tiny_model, tmp_path / "int8.safetensors", dtype="int8")
    state = load_file(str(path))
    del state["dga.dictionary:scale"]
    resave(path, state)
    with pytest.raises(CheckpointError, match=r"int8 tensor dga\.dictionary lacks a valid per-row scale"):
        load_checkpoint(path)


def test_training_heads_stay_out_unless_asked(tiny_model: LGUR, tmp_path: Path) -> None:
    lean = save_checkpoint(tiny_model, tmp_path / "lean.safetensors")
    full = save_checkpoint(tiny_model, tmp_path / "full.safetensors", include_classifier=True)
    assert not any(k.startswith("classifier.") for k in load_file(str(lean)))
    loaded, _ = load_checkpoint(full)
    assert torch.equal(loaded.classifier.weight, tiny_model.classifier.weight)


def test_wrong_shape_is_refused(saved: Path) -> None:
    state = load_file(str(saved))
    state["dga.dictionary"] = torch.zeros(7, state["dga.dictionary"].shape[1])
    resave(saved, state)  # a consistent file, just the wrong shape
    with pytest.raises(CheckpointError, match=r"dga\.dictionary: file has \(7, 64\), model expects \(32, 64\)"):
        load_checkpoint(saved)


def test_different_text_encoder_is_refused(saved: Path) -> None:
    card = json.loads(card_path(saved).read_text())
    card["text_encoder"]["fingerprint"] = "0" * 64
    card_path(saved).write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="text encoder differs"):
        load_checkpoint(saved)


def test_truncated_or_replaced_weights_are_refused(saved: Path) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="does not match its card"):
        load_checkpoint(saved)


def test_pickles_are_never_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            return (marker.touch, ())

    for name in ("model.pt", "model.pth", "model.bin", "model.ckpt"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps(Exploit()))
        with pytest.raises(CheckpointError, match="only .safetensors"):
            load_checkpoint(path)
    disguised = tmp_path / "evil.safetensors"
    disguised.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError):
        load_checkpoint(disguised)  # no card, and not safetensors either
    assert not marker.exists()


def test_missing_card_is_explained(saved: Path) -> None:
    card_path(saved).unlink()
    with pytest.raises(CheckpointError, match="has no card"):
        load_checkpoint(saved)
