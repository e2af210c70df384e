"""The detail detector (lgur.model.details): phrases, pooling, fitting, ranking and the second-stage command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lgur.data.dataset import normalize
from lgur.model.checkpoint import load_checkpoint
from lgur.model.config import DetailTrainConfig
from lgur.model.details import DetailDetector, coverage, phrase_rows, phrase_weights
from lgur.model.person import person_map
from lgur.model.serving import fold_for_serving
from lgur.search.index import Entry, GalleryIndex
from lgur.search.query import query_details
from lgur.training.details import DETAIL_WEIGHTS, average_precision, fit_detector, identity_targets, train_details
from tests.conftest import tiny_config

TERMS = ("backpack", "black", "black backpack", "jeans", "red", "red jacket", "jacket")
INDEX = {t: i for i, t in enumerate(TERMS)}


def test_a_query_asserts_its_phrases_with_colours_kept_on_their_things() -> None:
    rows = phrase_rows("man in a red jacket, black backpack", INDEX)
    assert [TERMS[r] for r in rows] == ["backpack", "black", "black backpack", "red", "red jacket", "jacket"]
    assert "black jacket" not in [TERMS[r] for r in phrase_rows("red jacket, black backpack", INDEX)]
    weights = phrase_weights(["red jacket", "a hat", "red anorak"], TERMS)
    assert weights[0].sum() == pytest.approx(1.0) and weights[0, INDEX["red jacket"]] == pytest.approx(1 / 3)
    assert weights[1].sum() == 0  # nothing known: no detail score
    # Half the content words are known: the detail score speaks for half the query.
    assert weights[2].sum() == pytest.approx(0.5) and weights[2, INDEX["red"]] == pytest.approx(0.5)
    assert coverage("a man in a vermilion anorak", ["man"]) == pytest.approx(1 / 3)


def test_query_details_weighs_the_known_phrases_by_the_models_detail_weight() -> None:
    config = tiny_config(detail_terms=TERMS, detail_weight=0.6)
    rows, vector = query_details(config, "red jacket")
    assert [TERMS[r] for r in rows] == ["red", "red jacket", "jacket"]
    assert vector.sum() == pytest.approx(0.6) and np.count_nonzero(vector) == 3
    assert query_details(config, "red jacket, white hat")[1].sum() == pytest.approx(0.6 * 2 / 4)
    assert query_details(config, "a hat") == ([], None)
    assert query_details(tiny_config(), "red jacket") == ([], None)  # no detector
    assert query_details(tiny_config(detail_terms=TERMS, detail_weight=0.0), "red jacket")[1] is None


def test_pooling_lies_between_the_mean_and_the_best_patch_and_says_where() -> None:
    detector = DetailDetector(16, 5, hidden=8, sharpness=4.0).eval()
    tokens = torch.randn(3, 12, 16)
    with torch.no_grad():
        pooled, patches = detector(tokens)
        where = detector.where(patches)
    assert pooled.shape == (3, 5) and patches.shape == (3, 12, 5)
    assert torch.all(pooled <= patches.amax(1) + 1e-5) and torch.all(pooled >= patches.mean(1) - 1e-5)
    assert torch.allclose(where.sum(1), torch.ones(3, 5))
    assert torch.equal(where.argmax(1), patches.argmax(1))
    detector.reference.fill_(-0.5)
    assert torch.allclose(detector.lift(pooled), torch.nn.functional.logsigmoid(pooled) + 0.5)


def test_identity_targets_gather_every_caption_of_the_identity() -> None:
    captions = ["a red jacket", "black backpack", "blue jeans"]
    targets = identity_targets(captions, torch.tensor([7, 7, 8]), torch.tensor([8, 7]), INDEX)
    assert [TERMS[k] for k in targets[1].nonzero().flatten()] == [
        "backpack",
        "black",
        "black backpack",
        "red",
        "red jacket",
        "jacket",
    ]
    assert [TERMS[k] for k in targets[0].nonzero().flatten()] == ["jeans"]


def test_average_precision_matches_hand_computed_values() -> None:
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.3]])  # phrase 0: hits at ranks 1, 3; phrase 1: 2
    assert average_precision(scores, targets) == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1 / 2) / 2)


def test_a_fitted_detector_finds_a_planted_detail_and_points_at_its_patch() -> None:
    """Phrase k is present when some patch carries direction k: the detector must learn which images
    have it (AP near 100) and where (its pooling weights peak on the planted patch)."""
    generator = torch.Generator().manual_seed(0)
    images, patches, dim, phrases = 600, 12, 16, 3
    tokens = torch.randn(images, 1, patches, dim, generator=generator) * 0.5
    targets = (torch.rand(images, phrases, generator=generator) < 0.3).float()
    planted = torch.randint(0, patches, (images, phrases), generator=generator)
    for i, k in targets.nonzero().tolist():
        tokens[i, 0, planted[i, k], k] += 3.0
    train, test = slice(0, 500), slice(500, None)
    cfg = DetailTrainConfig(epochs=30, batch_size=50, lr=5e-3, hidden=32)
    detector = fit_detector(tokens[train], targets[train], cfg, report=lambda _: None)
    with torch.no_grad():
        pooled, patch_logits = detector(tokens[test, 0])
        where = detector.where(patch_logits)
    assert average_precision(pooled, targets[test]) > 95
    present = targets[test].nonzero().tolist()
    pointed = [int(where[i, :, k].argmax()) == int(planted[500 + i, k]) for i, k in present]
    assert np.mean(pointed) > 0.9


def _index(embeddings: np.ndarray, log_probs: np.ndarray) -> GalleryIndex:
    n = len(embeddings)
    arrays = {"embeddings": embeddings.astype(np.float32), "detail_lift": log_probs.astype(np.float16)}
    return GalleryIndex(Path("."), [Entry(f"{i}.jpg", "", 0, 0) for i in range(n)], arrays, "x")


@pytest.mark.parametrize("approximate", [False, True])
def test_the_index_ranks_by_cosine_plus_the_detail_score(approximate: bool, monkeypatch) -> None:
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(300, 8)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    log_probs = np.log(rng.uniform(0.01, 1, size=(300, 5)))
    query, details = embeddings[:1] * 0.5, np.array([[0.0, 0.4, 0.0, 0.4, 0.0]], np.float32)
    if approximate:  # the IVF path re-ranks the best candidates by cosine
        monkeypatch.setattr("lgur.search.index.EXACT_LIMIT", 100)
        monkeypatch.setattr("lgur.search.index.DETAIL_CANDIDATES", 300)
    index = _index(embeddings, log_probs)
    if approximate:
        index.build_faiss()
        assert index.kind == "ivf"
        index.faiss_index.nprobe = index.faiss_index.nlist  # every list probed: the candidates are all rows
    scores, rows = index.search(query, 10, details)
    expected = query @ embeddings.T + details @ log_probs.astype(np.float16).astype(np.float32).T
    assert rows[0].tolist() == np.argsort(-expected[0], kind="stable")[:10].tolist()
    np.testing.assert_allclose(scores[0], expected[0, rows[0]], rtol=1e-4, atol=1e-5)
    plain_scores, plain_rows = index.search(query, 10)  # no phrases: cosine alone
    assert plain_rows[0, 0] == 0 and plain_scores[0, 0] == pytest.approx(0.5, abs=1e-3)


def test_train_details_adds_a_detector_and_changes_no_other_weight(tmp_path: Path, small_world: Path) -> None:
    from lgur.data.readers import read_dataset
    from lgur.eval.evaluate import split_metrics
    from lgur.training.sampling import split_records
    from lgur.training.train import train
    from tests.test_train import _config

    world = small_world
    train(_config(world, tmp_path / "run", epochs=1), progress=False)
    base = tmp_path / "run" / "best.safetensors"
    lines: list[str] = []
    out = train_details(
        base,
        world,
        tmp_path / "with_details.safetensors",
        DetailTrainConfig(epochs=2, min_captions=2),
        tmp_path / "cache",
        lines.append,
    )
    model, card = load_checkpoint(out)
    assert model.details is not None and model.config.detail_terms and model.config.detail_weight in DETAIL_WEIGHTS
    reference = model.details.reference  # mean log p over the training images: what a lift of 0 means
    assert reference.shape == (len(model.config.detail_terms),) and bool((reference < 0).all())
    assert card["details"]["phrases"] == len(model.config.detail_terms) and "val_R@1_by_weight" in card["details"]
    assert any(line.startswith("epoch 2: loss") for line in lines)
    before, after = load_file(str(base)), load_file(str(out))
    assert set(after) - set(before) and all(k.startswith("details.") for k in set(after) - set(before))
    fitted = {"dga.foreground.weight", "dga.foreground.bias"}  # m, fitted to the detector's person map
    for key, value in before.items():
        assert torch.equal(value, after[key]) != (key in fitted), key
    assert model.config.foreground_fitted and model.learns_foreground and "val_loss" in card["details"]["foreground"]
    assert json.loads((tmp_path / "with_details.json").read_text())["weights_sha256"] == card["weights_sha256"]
    # The model explains with it, and the evaluation ranks with it as the app does.
    h, w = model.config.image.img_size
    probabilities, where = model.find_details(torch.randn(2, 3, h, w))
    grid = model.image_encoder.grid
    assert probabilities.shape == (2, len(model.config.detail_terms)) and where.shape[1] == grid[0] * grid[1]
    records = split_records(read_dataset(world)[0], 0)["test"]
    model.config.detail_weight = 0.5
    plain, _ = split_metrics(model, records, "test", world, tmp_path / "cache")
    detailed, _ = split_metrics(model, records, "test", world, tmp_path / "cache", details=True)
    assert plain["queries"] == detailed["queries"] and plain != detailed
    # The card's test figures: the paraphrases as the app reads and ranks them among them.
    from lgur.eval.evaluate import GROUNDED_PARAPHRASE, READ_PARAPHRASE, score_test_splits

    splits = split_records(read_dataset(world)[0], 0)
    scores = score_test_splits(model, world, splits, tmp_path / "cache", vocabulary=card["vocabulary"])
    assert set(scores["metrics"]) == {
        "test",
        "test-paraphrase",
        GROUNDED_PARAPHRASE,
        "test+details",
        f"{READ_PARAPHRASE}+details",
    }
    # Its maps are scored by the pointing game, as the guidance maps are.
    from lgur.eval.quality import explanation_quality

    quality = explanation_quality(model, world, "test", limit=8)
    game = quality["phrase_pointing_game"]
    parts = game["by_part"].values()
    assert game["words"] == sum(p["words"] for p in parts) > 0 and set(game["by_part"]) <= set(quality["parts"])
    weighted = sum(p["accuracy"] * p["words"] for p in parts) / game["words"]  # every phrase word scored once
    assert game["accuracy"] == pytest.approx(weighted)
    # The detector as a teacher (train --prototype-person): where it sees the person, the surest patch 1;
    # a run taught by it logs the penalty on its prototypes' attention outside that.
    images = torch.randn(2, 3, h, w)
    person = person_map(model, images)
    assert person.shape == (2, grid[0] * grid[1]) and bool((person >= 0).all())
    assert torch.allclose(person.amax(-1), torch.ones(2))
    saturated = person_map(model, images, saturation=0.5)  # 1 wherever the teacher is half as sure as at its peak
    assert torch.allclose(saturated, (2 * person).clamp(max=1.0))
    taught = _config(
        world, tmp_path / "taught", epochs=1, prototype_person=1.0, person_from=str(out), prototype_diversity=1.0
    )
    train(taught, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "taught" / "log.jsonl").read_text().splitlines()]
    assert any(row.get("loss/person/image", 0) > 0 for row in rows)
    assert any(row.get("loss/diversity/image", 0) > 0 for row in rows)
    with pytest.raises(ValueError, match="--person-from"):
        train(_config(world, tmp_path / "untaught", prototype_person=1.0), progress=False)
    # m fitted again on its own (fit-foreground: for a checkpoint whose detector is already trained)
    from lgur.cli import main

    main(
        [
            "fit-foreground",
            "--checkpoint",
            str(out),
            "--data",
            str(world),
            "--out",
            str(tmp_path / "fg.safetensors"),
            "--images",
            "8",
            "--quiet",
        ]
    )
    refitted, refitted_card = load_checkpoint(tmp_path / "fg.safetensors")
    assert refitted.learns_foreground and refitted_card["details"]["phrases"] == card["details"]["phrases"]
    assert refitted_card["details"]["foreground"]["images"] == 8


@pytest.mark.parametrize("command", ["train-details", "fit-foreground"])
def test_the_second_stage_commands_refuse_a_pickled_checkpoint_with_a_message(tmp_path: Path, command: str) -> None:
    from lgur.cli import main

    (tmp_path / "model.pt").write_bytes(b"not a safetensors file")
    with pytest.raises(SystemExit, match=rf"{command}: model.pt: only .safetensors checkpoints"):
        main(
            [
                command,
                "--checkpoint",
                str(tmp_path / "model.pt"),
                "--data",
                str(tmp_path),
                "--out",
                str(tmp_path / "out.safetensors"),
            ]
        )
    assert not (tmp_path / "out.safetensors").exists()


def _lite0_model(**config) -> torch.nn.Module:
    """A tiny model on the cpu-lite0 trunk (random weights: 64x32 input, 4x2 grid) with a detector."""
    from lgur.model.config import cpu_lite0_preset
    from lgur.model.lgur import LGUR

    image = cpu_lite0_preset().image
    image.img_size, image.weights = (64, 32), None
    torch.manual_seed(0)
    return LGUR(tiny_config(image=image, detail_terms=TERMS, **config), load_pretrained=False).eval()


@pytest.mark.parametrize("blocks", [1, 2])
def test_the_detectors_own_stage_starts_as_the_encoders_and_round_trips(tmp_path: Path, blocks: int) -> None:
    from lgur.model.checkpoint import save_checkpoint

    model = _lite0_model(detail_stage=True, detail_stage_blocks=blocks)
    images = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        tokens, stage_input = model.image_encoder.forward_with_stage_input(images, blocks)
        channels = model.image_encoder.cnn.blocks[-blocks - 1][-1].conv_pwl.out_channels
        assert stage_input.shape[1] == channels  # the input of the last `blocks` block groups
        assert torch.allclose(tokens, model.image_encoder(images), atol=1e-5)  # the same tokens, one more output
        encoded, detail_tokens, _ = model.encode_images(images)
        assert torch.allclose(detail_tokens, encoded, atol=1e-5)  # an untrained copy reads what the encoder reads
        for p in model.detail_stage.parameters():
            p.add_(0.01)  # once fine-tuned, the detector's tokens differ and the embedding does not
        encoded_after, moved, _ = model.encode_images(images)
        assert torch.equal(encoded_after, encoded) and not torch.allclose(moved, detail_tokens, atol=1e-4)
        assert torch.allclose(model.detail_tokens(images), moved, atol=1e-5)  # the short path: the same tokens
        probabilities, where = model.find_details(images)
    save_checkpoint(model, tmp_path / "stage.safetensors", {})
    loaded, _ = load_checkpoint(tmp_path / "stage.safetensors")
    assert loaded.config.detail_stage and loaded.detail_stage.blocks == blocks
    with torch.no_grad():
        again, where_again = loaded.find_details(images)
    assert torch.allclose(again, probabilities, atol=1e-5) and torch.allclose(where_again, where, atol=1e-5)


def test_fitting_with_a_stage_fine_tunes_the_copy_and_leaves_the_encoder(tmp_path: Path) -> None:
    from lgur.model.details import DetailStage

    model = _lite0_model()
    encoder_stage = {k: v.clone() for k, v in model.image_encoder.last_stage.state_dict().items()}
    stage = DetailStage(model.image_encoder)
    start = {k: v.clone() for k, v in stage.state_dict().items()}
    with torch.no_grad():
        inputs = torch.stack([model.image_encoder.forward_with_stage_input(torch.randn(40, 3, 64, 32))[1]] * 2, 1)
    targets = (torch.rand(40, len(TERMS), generator=torch.Generator().manual_seed(0)) < 0.3).float()
    lines: list[str] = []
    cfg = DetailTrainConfig(epochs=1, batch_size=20, hidden=16, stage=True, stage_epochs=1, stage_batch_size=20)
    detector = fit_detector(inputs.half(), targets, cfg, (inputs[:8, 0].half(), targets[:8]), lines.append, stage)
    assert not detector.training and not stage.training
    assert any(not torch.equal(v, start[k]) for k, v in stage.state_dict().items())  # fine-tuned
    assert all(torch.equal(v, encoder_stage[k]) for k, v in model.image_encoder.last_stage.state_dict().items())
    assert any("fine-tuning" in line for line in lines) and sum("val phrase mAP" in line for line in lines) == 2


def test_a_trunk_without_a_single_last_stage_is_refused_with_a_message() -> None:
    from lgur.model.config import cpu_preset
    from lgur.model.lgur import LGUR

    with pytest.raises(ValueError, match="no single last stage"):
        LGUR(tiny_config(image=cpu_preset().image, detail_terms=TERMS, detail_stage=True), load_pretrained=False)
    with pytest.raises(ValueError, match="a copy of its last 5 is not possible"):
        _lite0_model(detail_stage=True, detail_stage_blocks=5)


def test_fitting_the_foreground_weight_follows_the_person_map_and_leaves_the_embedding() -> None:
    from lgur.training.foreground import fit_foreground, foreground_targets

    model = _lite0_model()
    images = torch.randint(0, 256, (16, 3, 64, 32), dtype=torch.uint8)
    tokens, person = foreground_targets(model, images)
    untrained = torch.nn.functional.binary_cross_entropy(model.dga.foreground_weights(tokens), person)
    before = model.explain_images(normalize(images)).embedding
    assert not model.learns_foreground  # m as training left it: explanations are not weighted by it
    result = fit_foreground(model, images, images[:4], steps=200, report=lambda line: None)
    fitted = torch.nn.functional.binary_cross_entropy(model.dga.foreground_weights(tokens), person)
    assert fitted < untrained and result["loss"] == pytest.approx(fitted.item(), abs=2e-3) and "val_loss" in result
    assert model.learns_foreground and model.config.foreground_fitted
    # PGU's pre-norm cancels m: the embedding the index holds does not move
    after = model.explain_images(normalize(images)).embedding
    assert torch.nn.functional.cosine_similarity(before, after).min() > 0.9999


def test_fitting_the_foreground_weight_needs_a_detector() -> None:
    from lgur.model.lgur import LGUR
    from lgur.training.foreground import fit_foreground

    model = LGUR(tiny_config(), load_pretrained=False)
    with pytest.raises(ValueError, match="detail detector"):
        fit_foreground(model, torch.zeros(2, 3, 64, 32, dtype=torch.uint8), report=lambda line: None)
    assert not model.config.foreground_fitted


@pytest.mark.parametrize("trunk", ["lite0", "resnet18"])
def test_folding_batch_norms_keeps_every_output_and_the_model_is_then_not_saved(tmp_path: Path, trunk: str) -> None:
    from lgur.model.checkpoint import save_checkpoint
    from lgur.model.config import cpu_preset
    from lgur.model.lgur import LGUR

    if trunk == "lite0":
        model = _lite0_model(detail_stage=True, detail_stage_blocks=2)
    else:
        torch.manual_seed(0)
        model = LGUR(tiny_config(image=cpu_preset().image, detail_terms=TERMS), load_pretrained=False).eval()
    generator = torch.Generator().manual_seed(1)
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # statistics folding must carry
        norm.running_mean.normal_(0, 0.5, generator=generator)
        norm.running_var.uniform_(0.5, 2.0, generator=generator)
        norm.weight.data.uniform_(0.5, 1.5, generator=generator)
    images = torch.randn(3, 3, *model.config.image.img_size, generator=generator)
    with torch.no_grad():
        before = model.explain_images(images)
        assert fold_for_serving(model) > 0
        after = model.explain_images(images)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert torch.allclose(after.embedding, before.embedding, atol=1e-5)
    assert torch.allclose(after.prototype_attention, before.prototype_attention, atol=1e-5)
    assert torch.allclose(after.detail_logits, before.detail_logits, atol=1e-4)
    with pytest.raises(ValueError, match="folded for serving"):
        save_checkpoint(model, tmp_path / "folded.safetensors", {})
    assert not (tmp_path / "folded.safetensors").exists()


def test_folding_refuses_a_training_model_and_a_fold_that_changes_the_outputs(monkeypatch) -> None:
    import lgur.model.serving

    model = _lite0_model()
    with pytest.raises(ValueError, match="call .eval"):
        fold_for_serving(model.train())
    model.eval()

    def wrong(module: torch.nn.Module) -> int:  # as if a convolution's output did not go straight to its norm
        with torch.no_grad():
            next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d)).weight.mul_(2)
        return 1

    monkeypatch.setattr(lgur.model.serving, "fold_batch_norms", wrong)
    with pytest.raises(RuntimeError, match="changed the model's outputs"):
        fold_for_serving(model)
