"""The shipped model's training chain (lgur.training.lineage), run through on a tiny world and model."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from lgur.model.checkpoint import load_checkpoint, read_card
from lgur.model.config import DetailTrainConfig
from lgur.training.lineage import (
    FROZEN_FOR_FINE,
    FROZEN_FOR_FOLLOW,
    LineageConfig,
    lineage,
    lineage_command,
    stage_command,
    stages,
)

SMALL = {"image.img_size": [64, 32], "dim": 32, "num_atoms": 16, "part_dim": 16, "pgu_head_dim": 16}


def test_every_stage_runs_in_order_and_a_rerun_skips_them(tmp_path: Path, small_world: Path) -> None:
    world = small_world
    detector = DetailTrainConfig(epochs=1, min_captions=2, stage=True, stage_epochs=1, foreground_images=64)
    cfg = LineageConfig(
        data=str(world),
        out=str(tmp_path / "chain"),
        stop_after=2,
        teacher_stop_after=1,
        fine_epochs=1,
        fine_warmup_steps=0,
        details=detector,
        teacher_details=DetailTrainConfig(
            epochs=1, min_captions=2, stage=True, stage_epochs=1, stage_blocks=1, foreground=False
        ),
        train_settings={"epochs": 2, "batch_size": 8, "warmup_steps": 0, "model_overrides": SMALL},
    )
    lines: list[str] = []
    final = lineage(cfg, progress=False, report=lines.append)
    ran = [line.split(":")[0] for line in lines if line.startswith("stage ")]
    assert ran == ["stage retriever", "stage teacher", "stage taught", "stage detector", "stage fine", "stage follow"]
    chain = tmp_path / "chain"
    # Stage 3 was taught by stage 2's detector and ended at stop_after; stage 1, the teacher's input, earlier.
    person = read_card(chain / "taught" / "best.safetensors")
    assert person["training"]["config"]["person_from"] == str(chain / "teacher" / "lgur_cpu.safetensors")
    assert person["training"]["config"]["stop_after"] == 2 and person["training"]["config"]["epochs"] == 2
    assert read_card(chain / "retriever" / "best.safetensors")["training"]["config"]["stop_after"] == 1
    # The fine stage changed only the prototypes' read-out (and what reads it), from stage 4's model, ...
    fine, fine_card = load_checkpoint(chain / "fine-int8" / "lgur_cpu.safetensors")
    assert fine.config.pgu_fine and fine.details is not None and fine.config.foreground_fitted
    assert fine_card["training"]["config"]["init_from"] == str(chain / "detector-int8" / "lgur_cpu.safetensors")
    assert tuple(fine_card["training"]["config"]["frozen"]) == FROZEN_FOR_FINE
    # ... each prototype at its own height (handed out by where it read), taught at the fine grid.
    assert (
        sorted(fine.config.prototype_rows) == sorted(cfg.fine_rows) and fine_card["training"]["config"]["person_fine"]
    )
    assert tuple(fine.config.prototype_row_width) == cfg.fine_row_width
    before, after = (
        load_file(str(chain / "detector-int8" / "lgur_cpu.safetensors")),
        load_file(str(chain / "fine-int8" / "lgur_cpu.safetensors")),
    )
    held = [k for k in before if k.split(".")[0] in FROZEN_FOR_FINE]
    assert held and all((before[k] == after[k]).all() for k in held)
    # The follow stage placed the prototypes' heights in the person, taught them on reframed images and
    # sharpened the dictionary's attention; the trunk, the detector and m held fixed.
    model, card = load_checkpoint(final)
    config = read_card(chain / "follow" / "best.safetensors")["training"]["config"]
    assert config["init_from"] == str(chain / "fine-int8" / "lgur_cpu.safetensors")
    assert tuple(config["frozen"]) == FROZEN_FOR_FOLLOW and config["framing"] == cfg.follow_framing
    assert model.config.prototype_rows == cfg.follow_rows and model.config.prototype_anchor == "person"
    assert model.config.atom_sharpness == cfg.atom_sharpness and model.config.atom_top_k == cfg.atom_top_k
    assert config["atom_entropy"] == cfg.atom_entropy and "test" in card["metrics"]
    # The card records the command and each stage's, and nothing else about the training.
    assert card["training"] == {
        "command": lineage_command(cfg),
        "stages": [{"name": s.name, "does": s.does, "command": stage_command(s, cfg)} for s in stages(cfg)],
    }
    assert [s.name for s in stages(cfg)] == [
        p.name for p in sorted(chain.iterdir(), key=lambda p: p.stat().st_ctime_ns) if p.is_dir() and p.name != "cache"
    ]
    assert "metrics" not in json.loads((chain / "follow" / "result.json").read_text())  # tested once, at the export
    followed = load_file(str(final))
    held = [k for k in after if k.startswith(("image_encoder.", "dga.foreground.", "details.", "detail_stage."))]
    assert held and all((after[k] == followed[k]).all() for k in held)
    assert any(not (after[k] == followed[k]).all() for k in after if k.startswith("dga.reconstruction."))
    # Finished: a rerun does nothing, and says so.
    stamp = final.stat().st_mtime_ns
    again: list[str] = []
    assert lineage(cfg, progress=False, report=again.append) == final and final.stat().st_mtime_ns == stamp
    assert again == [f"{final} exists: every stage has finished"]


def _decoded(overrides: dict) -> dict:
    """--set values as the model reads them (TrainConfig.model_config): JSON where it parses, lists as tuples."""
    out = {}
    for key, value in overrides.items():
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def test_each_stages_command_runs_what_the_lineage_runs(tmp_path: Path) -> None:
    """The command line of every stage builds the very TrainConfig (or detector config) lineage runs."""
    import dataclasses
    import shlex

    from lgur.cli import build_parser, details_config, train_config
    from lgur.training.config import recipe
    from lgur.training.lineage import _train_settings

    for teacher in (True, False):
        cfg = LineageConfig(data="data/world", out="runs/lineage", teacher=teacher)
        chain = stages(cfg)
        assert [s.name for s in chain][-3:] == ["fine", "fine-int8", "follow"] and len({s.name for s in chain}) == len(
            chain
        )
        for stage in chain:
            words = shlex.split(stage_command(stage, cfg))
            args = build_parser().parse_args(words[3:])
            assert args.out.startswith("runs/lineage/" + stage.name), stage.name
            if stage.step == "details":
                assert args.func.__name__ == "cmd_train_details"
                assert details_config(args) == stage.settings["details"], stage.name
                continue
            if stage.step != "train":
                assert args.func.__name__ == "cmd_export"
                continue
            typed = dataclasses.asdict(train_config(args))
            settings = _train_settings(stage, cfg, Path(cfg.out))
            out = f"runs/lineage/{stage.name}"
            ran = dataclasses.asdict(
                recipe(cfg.preset, data=cfg.data, out=out, cache_dir="runs/lineage/cache", **settings)
            )
            assert _decoded(typed.pop("model_overrides")) == _decoded(ran.pop("model_overrides")), stage.name
            typed.pop("final_test"), ran.pop("final_test")  # the lineage measures its export once, not each stage
            for key in ("frozen", "prototype_rows", "prototype_row_width", "decay_epochs"):
                typed[key], ran[key] = (tuple(x) if isinstance(x, list) else x for x in (typed[key], ran[key]))
            assert typed == ran, stage.name


def test_training_md_prints_the_stages_as_the_lineage_runs_them() -> None:
    from lgur.training.lineage import stage_commands

    text = (Path(__file__).resolve().parents[1] / "docs" / "TRAINING.md").read_text()
    shipped = LineageConfig(data="data/world", out="runs/lineage", gallery="gallery", framed="data/world-framed")
    assert stage_commands(shipped) in text
