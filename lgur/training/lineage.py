"""The shipped model's training as one resumable command (`python -m lgur lineage`).

The shipped model is not one run but a chain of stages, each reading the model of one before
it. `stages` lists them as data: each a folder under OUT named for what it makes, what it is for,
and the command that runs it alone; `lineage` runs them in order, docs/TRAINING.md prints them
(`python -m lgur lineage --print`) and the shipped card records them, so none can disagree.

With `teacher=False`, the teacher and the run it teaches are left out and the detector reads the
retriever. A rerun skips finished stages and resumes the training stage it was stopped in (train
resumes by itself), so the command can be interrupted.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..model.config import DetailTrainConfig
from .config import flag, train_flag

FROZEN_FOR_FINE = ("image_encoder", "dga", "details", "detail_stage")
FROZEN_FOR_FOLLOW = ("image_encoder", "dga.foreground", "details", "detail_stage")  # DGA's atoms and attention learn


@dataclass
class LineageConfig:
    data: str
    out: str
    teacher: bool = True  # the teacher and the run it teaches; without, the detector reads the retriever
    preset: str = "cpu-lite0"
    stop_after: int | None = 14  # the retriever and the taught run end after this epoch of the recipe's schedule
    # With the teacher, the retriever only feeds the teacher's detector, which needs a person map, not a
    # strong retriever: it ends earlier (None: stop_after)
    teacher_stop_after: int | None = 4
    person_weight: float = 2.0  # TrainConfig.prototype_person of every taught stage
    person_saturation: float = 0.5
    person_from_epoch: int = 2  # the taught run only: the prototypes part first (the later stages start parted)
    fine_epochs: int = 4
    fine_warmup_steps: int = 50
    fine_lr: float = 1e-3
    fine_lr_backbone: float = 1e-4
    # The fine stage's row prior (TrainConfig.prototype_rows: head, collar, chest, waist, shins, feet,
    # handed out by where the prototypes read) in its drawn layer only, the first reading freely; and the
    # teacher's person map at the fine grid (person_fine), so the feet are told from the ground beside them
    fine_rows: tuple[float, ...] = (0.12, 0.25, 0.42, 0.58, 0.77, 0.94)
    fine_row_width: float | tuple[float, ...] = (0.0, 0.04)
    fine_person: bool = True
    # The follow stage, from the fine stage's int8 export; None leaves it out (the fine stage is then the model)
    follow_epochs: int | None = 1
    follow_framing: float = 0.5  # TrainConfig.framing: the share of images reframed as a detector frames them
    atom_sharpness: float = 8.0  # LGURConfig.atom_sharpness
    atom_top_k: int = 8  # LGURConfig.atom_top_k: each head reads its 8 strongest atoms
    atom_entropy: float = 0.1  # TrainConfig.atom_entropy
    # The prototypes' heights in the person (0 its top, 1 its feet; LGURConfig.prototype_anchor "person"),
    # in the drawn layer only: the fine stage's heights in the frame, converted with the person's mean extent on
    # val as m sees it (0.091-0.988); () frees them
    follow_rows: tuple[float, ...] = (0.032, 0.947, 0.367, 0.757, 0.177, 0.545)
    follow_row_width: float | tuple[float, ...] = (0.0, 0.045)
    framed: str | None = None  # a detector-framed world of the same seed, measured at the export
    details: DetailTrainConfig = field(default_factory=lambda: DetailTrainConfig(stage=True))
    teacher_details: DetailTrainConfig = field(
        default_factory=lambda: DetailTrainConfig(stage=True, stage_blocks=1, foreground=False)
    )
    train_settings: dict[str, Any] = field(default_factory=dict)  # any TrainConfig field, every training stage
    gallery: str | None = None  # measured at the export too (the shipped gallery)
    cache: str | None = None  # frozen text features, shared by the stages; default OUT/cache


@dataclass(frozen=True)
class Stage:
    name: str  # its folder under OUT, named for what it makes
    does: str  # what the stage is for, in one line
    step: str  # "train" (python -m lgur train), "details" (train-details) or "int8" (export --dtype int8)
    reads: str | None = None  # the stage whose model it starts from (init_from, or the checkpoint given)
    settings: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields; a DetailTrainConfig for "details"
    teacher: str | None = None  # the stage whose detector's person map teaches it (person_from)

    def output(self, out: Path) -> Path:
        return out / self.name / ("best.safetensors" if self.step == "train" else "lgur_cpu.safetensors")


def stages(cfg: LineageConfig) -> list[Stage]:
    """The shipped model's stages, in the order they run."""
    person = {"prototype_person": cfg.person_weight, "person_saturation": cfg.person_saturation}
    chain = [
        Stage(
            "retriever",
            "the preset's recipe: an ImageNet trunk, the captions' terms predicted"
            + (" (to epoch 4: it only feeds the teacher)" if cfg.teacher and cfg.teacher_stop_after else ""),
            "train",
            settings={
                "stop_after": cfg.teacher_stop_after if cfg.teacher and cfg.teacher_stop_after else cfg.stop_after
            },
        )
    ]
    if cfg.teacher:
        chain += [
            Stage(
                "teacher",
                "a detail detector on it, whose person map teaches the next stage",
                "details",
                "retriever",
                {"details": cfg.teacher_details},
            ),
            Stage(
                "taught",
                "the same recipe again, the prototypes kept on the teacher's person map",
                "train",
                settings={"stop_after": cfg.stop_after, "person_from_epoch": cfg.person_from_epoch, **person},
                teacher="teacher",
            ),
        ]
    last = chain[-1].name
    chain += [
        Stage(f"{last}-int8", "its int8 export", "int8", last),
        Stage(
            "detector",
            "its own detail detector (a copy of the trunk's last stages); DGA's m fitted to it",
            "details",
            f"{last}-int8",
            {"details": cfg.details},
        ),
        Stage("detector-int8", "its int8 export", "int8", "detector"),
        Stage(
            "fine",
            "the prototypes read a grid twice as fine, each at its own height; the rest held fixed",
            "train",
            "detector-int8",
            teacher="detector-int8",
            settings={
                "model_overrides": {"pgu_fine": True},
                "frozen": FROZEN_FOR_FINE,
                "epochs": cfg.fine_epochs,
                "warmup_steps": cfg.fine_warmup_steps,
                "lr": cfg.fine_lr,
                "lr_backbone": cfg.fine_lr_backbone,
                "person_from_epoch": 0,
                **person,
                "prototype_rows": cfg.fine_rows or None,
                "prototype_row_width": cfg.fine_row_width,
                "person_fine": cfg.fine_person,
                "final_test": False,
            },
        ),
    ]
    if cfg.follow_epochs:
        freed = {
            "prototype_rows": list(cfg.follow_rows),
            "prototype_row_width": cfg.follow_row_width,
            "prototype_anchor": "person",
            "atom_sharpness": cfg.atom_sharpness,
            "atom_top_k": cfg.atom_top_k,
        }
        chain += [
            Stage("fine-int8", "its int8 export", "int8", "fine"),
            Stage(
                "follow",
                "the prototypes' heights placed in the person, taught on detector-framed crops; DGA "
                "reads a few sharp atoms (the trunk, the detector and m held fixed)",
                "train",
                "fine-int8",
                teacher="fine-int8",
                settings={
                    "model_overrides": freed,
                    "frozen": FROZEN_FOR_FOLLOW,
                    "epochs": cfg.follow_epochs,
                    "warmup_steps": cfg.fine_warmup_steps,
                    "lr": cfg.fine_lr,
                    "lr_backbone": cfg.fine_lr_backbone,
                    "person_from_epoch": 0,
                    **person,
                    "person_fine": cfg.fine_person,
                    "atom_entropy": cfg.atom_entropy,
                    "framing": cfg.follow_framing,
                    "final_test": False,
                },
            ),
        ]
    return chain


def lineage_command(cfg: LineageConfig) -> str:
    command = f"python -m lgur lineage --data {cfg.data} --out {cfg.out}" + ("" if cfg.teacher else " --no-teacher")
    if cfg.teacher and cfg.teacher_stop_after != LineageConfig.teacher_stop_after:
        command += f" --teacher-stop-after {cfg.teacher_stop_after}"
    if cfg.gallery:
        command += f" --gallery {cfg.gallery}"
    if cfg.framed:
        command += f" --framed {cfg.framed}"
    return command


def outputs(cfg: LineageConfig, out: Path) -> dict[str, Path]:
    """Each stage's name -> the checkpoint it writes under `out`."""
    return {stage.name: stage.output(out) for stage in stages(cfg)}


def _train_settings(
    stage: Stage, cfg: LineageConfig, out: Path, written: dict[str, Path] | None = None
) -> dict[str, Any]:
    """The stage's TrainConfig fields: the lineage's train_settings under the stage's own, paths filled in."""
    overrides = {**cfg.train_settings.get("model_overrides", {}), **stage.settings.get("model_overrides", {})}
    values = {**cfg.train_settings, **stage.settings, "model_overrides": overrides}
    written = written if written is not None else outputs(cfg, out)
    if stage.reads:
        values["init_from"] = str(written[stage.reads])
    if stage.teacher:
        values["person_from"] = str(written[stage.teacher])
    return values


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)  # the command line's comma lists
    return str(value)


def stage_command(stage: Stage, cfg: LineageConfig) -> str:
    """The command that runs `stage` alone, as `lineage` runs it."""
    out = Path(cfg.out)
    cache = cfg.cache or str(out / "cache")
    written = outputs(cfg, out)
    if stage.step == "int8":
        source = written[stage.reads]
        return f"python -m lgur export --checkpoint {source} --out {stage.output(out)} --dtype int8 --cache {cache}"
    if stage.step == "details":
        source = written[stage.reads]
        details: DetailTrainConfig = stage.settings["details"]
        words = [
            f"python -m lgur train-details --checkpoint {source} --data {cfg.data} --out {stage.output(out)}",
            f"--cache {cache}",
        ]
        for option in fields(DetailTrainConfig):  # every setting that differs from the default, by its flag
            value, default = getattr(details, option.name), option.default
            if value == default:
                continue
            if isinstance(value, bool):
                words.append(flag(option))  # --stage, or --no-foreground (a negated flag)
            else:
                words.append(f"{flag(option)} {value}")
        return " ".join(words)
    words = [f"python -m lgur train --preset {cfg.preset} --data {cfg.data} --out {out / stage.name} --cache {cache}"]
    for name, value in _train_settings(stage, cfg, out, written).items():
        if name == "model_overrides":
            items = []
            for key, setting in value.items():  # read as JSON (model_config): true, [0.1, 0.2]
                text = f"{key}={setting if isinstance(setting, str) else json.dumps(_listed(setting))}"
                items.append(f"'{text}'" if " " in text or "[" in text else text)
            words += ["--set", *items] if items else []
        elif name == "final_test" or value is None:
            continue  # python only: the lineage measures its export once
        elif value is True:
            words.append(train_flag(name))
        elif value is not False:
            words.append(f"{train_flag(name)} {_value(value)}")
    return " ".join(words)


def stage_commands(cfg: LineageConfig) -> str:
    """Every stage's command, in order, each under a comment that says what it is for."""
    chain, out = stages(cfg), Path(cfg.out)
    blocks = [f"# {i}. {s.name}: {s.does}\n{stage_command(s, cfg)}" for i, s in enumerate(chain, 1)]
    export = f"python -m lgur export --checkpoint {chain[-1].output(out)} --out {out / 'lgur_cpu.safetensors'} "
    export += f"--dtype int8 --cache {cfg.cache or out / 'cache'} --data {cfg.data}"
    export += (f" --gallery {cfg.gallery}" if cfg.gallery else "") + (f" --framed {cfg.framed}" if cfg.framed else "")
    blocks.append(f"# then the shipped file: its int8 export, measured on the test splits\n{export}")
    return "\n".join(blocks)


def lineage(cfg: LineageConfig, progress: bool = True, report: Callable[[str], None] = print) -> Path:
    """Run the stages that have not finished; -> OUT/lgur_cpu.safetensors (int8, its card measured)."""
    from .config import recipe
    from .details import train_details
    from .export import export_checkpoint
    from .train import train

    out = Path(cfg.out)
    cache = cfg.cache or str(out / "cache")
    final = out / "lgur_cpu.safetensors"
    if final.is_file():
        report(f"{final} exists: every stage has finished")
        return final
    chain = stages(cfg)
    written = outputs(cfg, out)
    for stage in chain:
        path = stage.output(out)
        if stage.step == "train":
            report(f"stage {stage.name}: training (resumes where it stopped)")
            settings = _train_settings(stage, cfg, out, written)
            train(
                recipe(cfg.preset, data=cfg.data, out=str(out / stage.name), cache_dir=cache, **settings),
                progress=progress,
            )
        elif path.is_file():
            report(f"stage {stage.name}: done ({path})")
        elif stage.step == "details":
            report(f"stage {stage.name}: detail detector")
            train_details(written[stage.reads], cfg.data, path, stage.settings["details"], cache, report)
        else:
            export_checkpoint(written[stage.reads], path, "int8", cache=cache, report=report)
    report("export: int8, measured on the test splits")
    provenance = {
        "command": lineage_command(cfg),
        "stages": [{"name": s.name, "does": s.does, "command": stage_command(s, cfg)} for s in chain],
    }
    return export_checkpoint(
        chain[-1].output(out), final, "int8", cfg.data, cfg.gallery, cache, provenance, report, cfg.framed
    )
