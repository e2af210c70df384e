"""The shipped model's training as one resumable command (`python -m lgur lineage`).

The shipped model is not one run but a chain of stages, each starting from the one before
(docs/TRAINING.md, "The shipped model's stages"; MODEL_CARD for why each exists):

1. `terms`: the preset's recipe (cpu-lite0: ImageNet trunk, term prediction), to `stop_after`
   (or `teacher_stop_after`, when only the teacher reads it);
2. `teacher`: a detail detector on it (train-details), whose person map teaches stage 3;
3. `person`: the same recipe again, the prototypes kept on the teacher's person map;
4. `details`: that model's own detector (a copy of the trunk's last two stages; fits DGA's m);
5. `fine`: the prototypes read a grid twice as fine, each at its own height, everything else held fixed;
6. `follow`: the prototypes' heights placed in the person (as m sees it) rather than in the frame, and
   taught on images framed as a person detector frames them, so each map follows its part wherever it
   is; DGA's dictionary read through a few sharp atoms (the trunk, the detector and m held fixed);

then the int8 export, measured on the world's test splits (and the gallery, if given). With
`teacher=False`, stages 2 and 3 are left out and stage 4 reads stage 1's model.

Each stage writes its own folder under `out`. A rerun skips finished stages and resumes the
training stage it was stopped in (train resumes by itself), so the command can be interrupted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..model.config import DetailTrainConfig

FROZEN_FOR_FINE = ("image_encoder", "dga", "details", "detail_stage")
FROZEN_FOR_FOLLOW = ("image_encoder", "dga.foreground", "details", "detail_stage")  # DGA's atoms and attention learn


@dataclass
class LineageConfig:
    data: str
    out: str
    teacher: bool = True  # stages 2-3; without, the detector and the fine stage follow stage 1
    preset: str = "cpu-lite0"
    stop_after: int | None = 14  # stages 1 and 3 end after this epoch of the recipe's schedule (best on val)
    # With the teacher, stage 1 only feeds the teacher's detector, which needs a person map, not a strong
    # retriever: epoch 4 of the recipe's schedule (val R@1 63.5) parts the prototypes as well as epoch 13
    # and saves about 30 min (docs/EXPERIMENTS.md, "A cheaper teacher"; None: stop_after)
    teacher_stop_after: int | None = 4
    person_weight: float = 2.0  # TrainConfig.prototype_person of stages 3 and 5
    person_saturation: float = 0.5
    person_from_epoch: int = 2  # stage 3 only: the prototypes part first (stage 5 starts parted)
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
    # Stage 6 (follow): from stage 5's int8 export; None leaves it out (stage 5 is then the model)
    follow_epochs: int | None = 1  # of 2 on the default world, the first was the best on val (EXPERIMENTS.md)
    follow_framing: float = 0.5  # TrainConfig.framing: the share of images reframed as a detector frames them
    atom_sharpness: float = 8.0  # LGURConfig.atom_sharpness (val: 36 effective atoms per patch at the start)
    atom_top_k: int = 8  # LGURConfig.atom_top_k: each head reads its 8 strongest atoms
    atom_entropy: float = 0.1  # TrainConfig.atom_entropy
    # The prototypes' heights in the person (0 its top, 1 its feet; LGURConfig.prototype_anchor "person"),
    # in the drawn layer only: stage 5's heights in the frame, converted with the person's mean extent on
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

    def training(name: str, **settings: Any) -> Path:
        report(f"stage {name}: training (resumes where it stopped)")
        overrides = {**cfg.train_settings.get("model_overrides", {}), **settings.pop("model_overrides", {})}
        values = {**cfg.train_settings, **settings, "model_overrides": overrides}
        train(recipe(cfg.preset, data=cfg.data, out=str(out / name), cache_dir=cache, **values), progress=progress)
        return out / name / "best.safetensors"

    def int8(checkpoint: Path, name: str) -> Path:
        path = out / name / "lgur_cpu.safetensors"
        if not path.is_file():
            export_checkpoint(checkpoint, path, "int8", cache=cache, report=report)
        return path

    def detector(checkpoint: Path, name: str, details: DetailTrainConfig) -> Path:
        path = out / name / "lgur_cpu.safetensors"
        if path.is_file():
            report(f"stage {name}: done ({path})")
        else:
            report(f"stage {name}: detail detector")
            train_details(checkpoint, cfg.data, path, details, cache, report)
        return path

    person = {"prototype_person": cfg.person_weight, "person_saturation": cfg.person_saturation}
    first_stop = cfg.teacher_stop_after if cfg.teacher and cfg.teacher_stop_after else cfg.stop_after
    base = training("terms", stop_after=first_stop)
    if cfg.teacher:
        teacher = detector(base, "teacher", cfg.teacher_details)
        base = training("person", stop_after=cfg.stop_after, person_from=str(teacher),
                        person_from_epoch=cfg.person_from_epoch, **person)  # fmt: skip
    details = int8(detector(int8(base, "base-int8"), "details", cfg.details), "details-int8")
    fine = training(
        "fine", init_from=str(details), model_overrides={"pgu_fine": True}, frozen=FROZEN_FOR_FINE,
        epochs=cfg.fine_epochs, stop_after=None, warmup_steps=cfg.fine_warmup_steps, lr=cfg.fine_lr,
        lr_backbone=cfg.fine_lr_backbone, person_from=str(details), person_from_epoch=0, **person,
        prototype_rows=cfg.fine_rows or None, prototype_row_width=cfg.fine_row_width, person_fine=cfg.fine_person,
        final_test=False,  # the int8 export below is measured on the same splits
    )  # fmt: skip
    if cfg.follow_epochs:
        placed = int8(fine, "fine-int8")
        freed = {
            "prototype_rows": list(cfg.follow_rows),
            "prototype_row_width": cfg.follow_row_width,
            "prototype_anchor": "person",
            "atom_sharpness": cfg.atom_sharpness,
            "atom_top_k": cfg.atom_top_k,
        }
        fine = training(
            "follow", init_from=str(placed), model_overrides=freed,
            frozen=FROZEN_FOR_FOLLOW, epochs=cfg.follow_epochs, stop_after=None, warmup_steps=cfg.fine_warmup_steps,
            lr=cfg.fine_lr, lr_backbone=cfg.fine_lr_backbone, person_from=str(placed), person_from_epoch=0, **person,
            person_fine=cfg.fine_person, atom_entropy=cfg.atom_entropy, framing=cfg.follow_framing, final_test=False,
        )  # fmt: skip
    report("export: int8, measured on the test splits")
    command = f"python -m lgur lineage --data {cfg.data} --out {cfg.out}" + ("" if cfg.teacher else " --no-teacher")
    if cfg.teacher and cfg.teacher_stop_after != LineageConfig.teacher_stop_after:
        command += f" --teacher-stop-after {cfg.teacher_stop_after}"
    if cfg.framed:
        command += f" --framed {cfg.framed}"
    return export_checkpoint(fine, final, "int8", cfg.data, cfg.gallery, cache, command, report, cfg.framed)
