"""A training run's setup: processes, data, model, frozen text features, losses and optimiser, and
its resumable state (RUN/last.safetensors and the optimiser beside it)."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import Tensor, nn

from ..data.dataset import RetrievalSplit, TextFeatures, build_split, caption_vocabulary, frozen_text_features
from ..data.readers import Record, read_dataset
from ..model.checkpoint import load_checkpoint, load_optimizer_state, read_card
from ..model.lgur import LGUR
from ..model.person import fine_person_map, person_map
from .config import TrainConfig
from .from_checkpoint import imprint_classifier, place_prototypes, start_from_checkpoint
from .losses import LGURLoss
from .sampling import Texts, split_records, training_texts

log = logging.getLogger(__name__)


class TrainingStep(nn.Module):
    """Model + losses in one module, so DistributedDataParallel sees every trainable weight."""

    def __init__(
        self,
        model: LGUR,
        criterion: LGURLoss,
        person_map: Callable[[Tensor], Tensor] | None = None,
        frozen: tuple[str, ...] = (),
    ) -> None:
        """person_map: a frozen teacher's person map (lgur.model.person) (a plain callable, so its weights are neither
        trained nor saved), for the criterion's person term. frozen: the model's modules held fixed."""
        super().__init__()
        self.model, self.criterion, self.person_map = model, criterion, person_map
        self.frozen = []
        for name in frozen:  # a module of LGUR, or one inside it ("dga.foreground")
            try:
                module = model.get_submodule(name)
            except AttributeError:
                module = None
            if not isinstance(module, nn.Module):
                raise ValueError(f"cannot freeze {name!r}: the model has no such module")
            module.requires_grad_(False)
            self.frozen.append(module)

    def train(self, mode: bool = True) -> TrainingStep:
        super().train(mode)
        for module in self.frozen:  # batch-norm statistics and dropout stay fixed too
            module.eval()
        return self

    def forward(
        self,
        images: Tensor,
        features: Tensor,
        mask: Tensor,
        labels: Tensor,
        term_targets: tuple[Tensor, Tensor] | None = None,
        word_rows: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """-> the losses. term_targets: (B, K) multi-hot terms of the images and of the texts;
        word_rows: (B, T) each token's detail phrase row (-1 none), for the word-map term."""
        criterion = self.criterion
        taught = self.person_map is not None and criterion.person > 0
        out = self.model(
            images,
            mask,
            backbone_features=features,
            need_weights=criterion.diversity > 0 or taught,
            need_atoms=criterion.atoms > 0,
            need_guidance=word_rows is not None,
        )
        word_maps = None
        if word_rows is not None:
            with torch.no_grad():
                word_maps = (self.model.find_details(images)[1], word_rows)
        person = self.person_map(images) if taught else None  # (B, N), or (B, 4N) already fine (person_fine)
        fine = self.model.pgu.fine if self.model.config.pgu_fine else None
        if person is not None and fine is not None and person.shape[-1] != fine.patch_of.numel():
            person = fine.upsample(person)  # the maps are on the fine grid, the teacher's is not
        return criterion(out, labels, self.model.classifier, term_targets, person, mask, word_maps)


def parameter_groups(step: TrainingStep, cfg: TrainConfig) -> list[dict[str, Any]]:
    # The fine read-out's projections start at zero in a second stage, so they learn at the heads' rate.
    heads = (
        "model.text_encoder.lstm",
        "model.classifier.",
        "model.pgu.projections",
        "model.pgu.projection",
        "model.pgu.fine.",
        "criterion.",
    )
    groups: dict[str, list] = {"heads": [], "body": []}
    for name, param in step.named_parameters():
        if param.requires_grad:
            groups["heads" if name.startswith(heads) else "body"].append(param)
    rates = {"heads": cfg.lr, "body": cfg.lr_backbone}
    return [{"params": groups[n], "lr": rates[n], "name": n} for n in ("heads", "body")]


@dataclass
class Run:
    """Everything one training run holds: its data, model, optimiser and resumable state."""

    cfg: TrainConfig
    out: Path
    cache: Path
    device: torch.device
    rank: int
    world: int
    splits: dict[str, list[Record]]
    format_report: Any
    identities: int
    train: RetrievalSplit
    val: RetrievalSplit
    labels: Tensor  # (captions,) training label of each caption
    texts: Texts
    val_text: TextFeatures
    model: LGUR
    criterion: LGURLoss
    step_module: nn.Module
    optimizer: torch.optim.Optimizer
    base_lrs: list[float]
    pad: int
    vocabulary: list[str]
    state: dict[str, Any] = field(
        default_factory=lambda: {"epoch": 0, "step": 0, "best": -1.0, "best_epoch": -1, "seconds": 0.0}
    )

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def log(self, row: dict[str, Any]) -> None:
        if self.main:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def card(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The card of a checkpoint this run writes."""
        cfg, splits = self.cfg, self.splits
        card = {
            "training": {"config": dataclasses.asdict(cfg), "identities": self.identities, **(extra or {})},
            "data": {"path": str(cfg.data), "format_report": self.format_report, "train_images": len(splits["train"])},
            "vocabulary": self.vocabulary,
        }
        if cfg.init_from and self.model.details is not None:  # a second stage keeps its detector's record
            card["details"] = read_card(cfg.init_from).get("details", {})
        return card


def teacher_person_map(cfg: TrainConfig, model: LGUR, device: torch.device) -> Callable[[Tensor], Tensor] | None:
    """The frozen teacher's person map that --prototype-person keeps the prototypes on (None: off)."""
    if not cfg.prototype_person:
        return None
    teacher = load_checkpoint(cfg.person_from, cfg.text_encoder_path)[0].to(device).eval().requires_grad_(False)
    if teacher.details is None or teacher.image_encoder.grid != model.image_encoder.grid:
        grid = model.image_encoder.grid
        raise ValueError(f"{cfg.person_from}: the teacher needs a detail detector on the same {grid} grid")
    if cfg.person_fine and not model.config.pgu_fine:
        raise ValueError("--person-fine teaches maps on the fine grid: it needs pgu_fine (--set pgu_fine=true)")
    read = fine_person_map if cfg.person_fine else person_map
    return functools.partial(read, teacher, saturation=cfg.person_saturation)


def setup(cfg: TrainConfig, progress: bool) -> Run:
    """Processes, data, model, frozen text features, losses and optimiser; resumed if RUN/last is there."""
    cfg.check()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
    bar = progress and rank == 0

    records, report = read_dataset(cfg.data)
    splits = split_records(records, cfg.seed)
    if not splits.get("train"):
        raise ValueError(f"{cfg.data}: no training entries ({report.summary()})")
    identities = sorted({r.identity for r in splits["train"]})
    label_of = {pid: i for i, pid in enumerate(identities)}

    torch.manual_seed(cfg.seed)  # initial weights only; every later draw has its own generator
    model_config = cfg.model_config()
    model = LGUR(model_config, num_identities=len(identities)).to(device)
    size = model_config.image.img_size
    train_split = build_split(splits["train"], size, bar)
    val_split = build_split(splits["val"], size, bar)
    labels = torch.tensor([label_of[int(i)] for i in train_split.caption_ids])
    texts = training_texts(cfg, model, train_split, labels, cache, bar)
    val_text = frozen_text_features(model.text_encoder, val_split.captions, cache, progress=bar)

    criterion = LGURLoss(
        cfg.margin,
        cfg.seed,
        cfg.prototype_diversity,
        cfg.sdm,
        cfg.temperature,
        cfg.term_prediction,
        len(texts.term_index or {}),
        model_config.embedding_dim,
        cfg.prototype_person,
        cfg.atom_entropy,
        cfg.word_maps,
    ).to(device)
    training_step = TrainingStep(model, criterion, teacher_person_map(cfg, model, device), tuple(cfg.frozen))
    optimizer = torch.optim.Adam(parameter_groups(training_step, cfg))
    step_module: nn.Module = training_step
    if distributed:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device] if device.type == "cuda" else None
        )
    run = Run(
        cfg,
        out,
        cache,
        device,
        rank,
        world,
        splits,
        report.summary(),
        len(identities),
        train_split,
        val_split,
        labels,
        texts,
        val_text,
        model,
        criterion,
        step_module,
        optimizer,
        [g["lr"] for g in optimizer.param_groups],
        pad=max(1, round(cfg.pad * size[0] / 384)),
        vocabulary=caption_vocabulary(train_split.captions),
    )
    resume_or_start(run)
    return run


def resume_or_start(run: Run) -> None:
    """Resume from RUN/last (weights, optimiser, state), or start a second stage from cfg.init_from."""
    cfg, last = run.cfg, run.out / "last.safetensors"
    resuming = last.is_file() and (run.out / "last_optimizer.safetensors").is_file()
    if cfg.init_from and not resuming:
        needs_classifier = start_from_checkpoint(run.model, run.criterion, cfg)
        if cfg.prototype_rows:  # before imprinting: the prior changes the part vectors
            placed = place_prototypes(run.model, run.train, cfg.prototype_rows, cfg.prototype_row_width)
            if run.main:
                log.info("prototype rows: %s", ", ".join(f"P{p + 1} {h:.2f}" for p, h in enumerate(placed)))
        if needs_classifier:
            imprint_classifier(run.model, run.train, run.labels)
        if run.main:
            log.info("second stage from %s", cfg.init_from)
    if resuming:
        resumed, last_card = load_checkpoint(last, cfg.text_encoder_path)
        if resumed.config.prototype_rows:  # placed when the run started (place_prototypes)
            run.model.set_prototype_rows(resumed.config.prototype_rows, resumed.config.prototype_row_width)
        run.model.load_state_dict(resumed.state_dict())
        load_optimizer_state(run.optimizer, run.out / "last_optimizer.safetensors")
        run.state = last_card["training_state"]
        if run.criterion.logit_scale is not None:
            run.criterion.logit_scale.data.fill_(run.state["logit_scale"])
        if run.criterion.term_classifier is not None:
            run.criterion.term_classifier.load_state_dict(load_file(str(run.out / "last_terms.safetensors")))
        if run.main:
            log.info("resumed from %s at epoch %d", last, run.state["epoch"])
