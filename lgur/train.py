"""Training: `python -m lgur train --preset cpu --data DIR --out RUN_DIR`.

Reads top to bottom: data -> model -> optimiser -> epochs (train, validate, keep the
best on *val*) -> test the best. Seeded and resumable at epoch boundaries; every
random draw comes from a generator seeded by (seed, epoch, rank). Runs on several
processes with `torchrun` (DistributedDataParallel: gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .atoms import text_atom_average
from .checkpoint import load_checkpoint, load_optimizer_state, save_checkpoint, save_optimizer_state
from .config import LGURConfig, preset
from .data.dataset import (
    RetrievalSplit,
    augment,
    build_split,
    caption_crops,
    caption_vocabulary,
    described_by,
    description_terms,
    frozen_text_features,
    normalize,
    person_terms,
    swapped_caption,
)
from .data.readers import Record, read_dataset
from .encoders import resize_position_embedding
from .evaluate import evaluate_split, record_in_card, score_test_splits
from .files import atomic_write_bytes
from .losses import LGURLoss, same_identity
from .model import LGUR

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: str
    out: str
    preset: str = "cpu"
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3  # BiLSTM, part projections, identity classifiers
    lr_backbone: float = 1e-4  # image encoder, DGA, PGU (dictionary and prototypes included)
    decay_epochs: tuple[int, ...] = (20, 40, 50)  # x0.1 at these epochs of `decay_reference`
    decay_reference: int = 60
    warmup_steps: int = 0
    margin: float = 0.3
    prototype_diversity: float = 0.0  # not in the paper: weight of the prototype-overlap penalty
    sdm: float = 0.0  # not in the paper: weight of the similarity distribution matching loss
    temperature: float = 0.07  # initial (learned) temperature of that loss
    seed: int = 0
    pad: int = 10  # augmentation padding at 384-pixel height; scaled with the input size
    # An epoch visits every caption (paper), every image (one random caption each), or every
    # identity with `instances` images each, side by side in one batch (so a batch holds positives).
    # "neighbours" (not in the paper) is "identities" in groups of `group_size` identities that the
    # model itself finds alike (its image embeddings from the previous epoch), so a batch holds
    # look-alikes that only details tell apart: hard negatives. The first epoch is "identities".
    # "caption-neighbours" (not in the paper) groups identities whose captions use the same words
    # (TF-IDF of word pairs): people described alike, from captions alone. Both neighbour kinds
    # start at `neighbours_from_epoch`.
    samples: str = "captions"
    instances: int = 2
    group_size: int = 8
    neighbours_from_epoch: int = 0  # before this epoch, the neighbour kinds sample plain identities
    # Not in the paper: with this probability a sample's caption is replaced by a crop of it (a few
    # of its clauses: a shorter, still true description, like a typed query), from this epoch on.
    caption_crops: float = 0.0
    crops_from_epoch: int = 0
    # Not in the paper: from this epoch on, each image's SDM row also holds a false copy of its
    # caption (two colours traded, a colour or a garment changed): a hard negative that only
    # binding each colour to its garment can tell apart. None: off. Needs sdm > 0.
    swaps_from_epoch: int | None = None
    # Which in-batch texts match an image. "identities" (paper): its identity's. "descriptions" (not
    # in the paper): also every text whose person terms all occur in the captions of the image's
    # identity (data.dataset.person_terms), so a crop "black jeans" matches everyone described in
    # black jeans instead of pushing them away. Captions and identities only.
    matches: str = "identities"
    # A second stage: start from this run checkpoint's weights (identity classifier included, e.g.
    # another run's last.safetensors) with a fresh optimiser and schedule. None: from scratch.
    init_from: str | None = None
    max_minutes: float | None = None  # stop early; the best-on-val model is still tested
    stop_after: int | None = None  # end this invocation after N epochs; run again to resume
    use_dga: bool = True
    use_pgu: bool = True
    text_encoder_path: str | None = None
    image_pretrained_path: str | None = None
    cache_dir: str | None = None  # frozen text features; default RUN_DIR/cache
    threads: int | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def model_config(self) -> LGURConfig:
        config = preset(self.preset)
        config.use_dga, config.use_pgu = self.use_dga, self.use_pgu
        if self.text_encoder_path:
            config.text.path = self.text_encoder_path
        if self.image_pretrained_path:
            config.image.pretrained_path = self.image_pretrained_path
        for key, value in self.model_overrides.items():
            target = config
            *parents, leaf = key.split(".")
            for p in parents:
                target = getattr(target, p)
            if not hasattr(target, leaf):
                raise ValueError(f"unknown model setting {key!r}")
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass  # a plain string
            setattr(target, leaf, tuple(value) if isinstance(value, list) else value)
        return config


# Training recipes. The paper fine-tunes a pretrained DeiT at 1e-4; the CPU preset's small ViT
# starts from scratch, so its encoder and the DGA/PGU modules learn at a higher rate, with warm-up.
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    "cpu": {
        "epochs": 26,
        "lr_backbone": 5e-4,
        "warmup_steps": 300,
        "decay_epochs": (40, 52),  # late decays: the encoder learns from scratch
        # beyond the paper (options; not yet measured one at a time, see the README's experiment table):
        "samples": "identities",
        "sdm": 1.0,
        "prototype_diversity": 2.0,  # 0.5 left the maps at overlap 0.64; 2.0 gives 0.10
        "caption_crops": 0.5,  # after two epochs of full captions, half the samples as crops
        "crops_from_epoch": 2,
    },
    "cpu-vit": {"epochs": 8, "lr_backbone": 5e-4, "warmup_steps": 300, "samples": "images"},
}


# The pretrained trunk converges in fewer epochs (val R@1 58.4 after 4, the from-scratch trunk 33.4).
RECIPES["cpu-lite0"] = {**RECIPES["cpu"], "epochs": 16}


def recipe(name: str, **overrides: Any) -> TrainConfig:
    values = {**RECIPES.get(name, {}), **{k: v for k, v in overrides.items() if v is not None}}
    return TrainConfig(preset=name, **values)


# -- helpers ---------------------------------------------------------------------------------


class TrainingStep(nn.Module):
    """Model + losses in one module, so DistributedDataParallel sees every trainable weight."""

    def __init__(self, model: LGUR, criterion: LGURLoss) -> None:
        super().__init__()
        self.model, self.criterion = model, criterion

    def forward(
        self,
        images: Tensor,
        features: Tensor,
        mask: Tensor,
        labels: Tensor,
        swapped: tuple[Tensor, Tensor, Tensor] | None = None,
        match: Tensor | None = None,
    ) -> tuple[dict[str, Tensor], Tensor]:
        """-> losses, and the images' retrieval embeddings (B, E), detached (for neighbour batches).

        swapped: frozen features (B, T', H) and mask of each sample's false caption, and (B,) which
        samples have one. match: (B, B) bool, image i is described by text j (default: same identity).
        """
        out = self.model(images, mask, backbone_features=features, need_weights=self.criterion.diversity > 0)
        negatives = None
        if swapped is not None:
            swap_features, swap_mask, valid = swapped
            words = self.model.word_features(swap_mask, backbone_features=swap_features)
            branches = dict(zip(("text", "text_dictionary"), self.model.text_branches(words, swap_mask), strict=True))
            negatives = {
                name: parts.embedding.masked_fill(~valid[:, None], float("nan"))
                for name, parts in branches.items()
                if parts is not None
            }
        retrieval = out.image_dictionary if out.image_dictionary is not None else out.image
        losses = self.criterion(out, labels, self.model.classifier, negatives, match)
        return losses, retrieval.embedding.detach()


def parameter_groups(step: TrainingStep, cfg: TrainConfig) -> list[dict[str, Any]]:
    fast, slow = [], []
    for name, param in step.named_parameters():
        if not param.requires_grad:
            continue
        head = name.startswith(
            (
                "model.text_encoder.lstm",
                "model.classifier.",
                "model.pgu.projections",
                "model.pgu.projection",
                "criterion.",
            )
        )
        (fast if head else slow).append(param)
    return [{"params": fast, "lr": cfg.lr, "name": "heads"}, {"params": slow, "lr": cfg.lr_backbone, "name": "body"}]


def lr_factor(step: int, epoch: int, cfg: TrainConfig) -> float:
    """Step decay x0.1 at the paper's milestones (scaled to the run's epochs), after a linear warm-up."""
    milestones = [round(m * cfg.epochs / cfg.decay_reference) for m in cfg.decay_epochs]
    factor = 0.1 ** sum(epoch >= m for m in milestones)
    if cfg.warmup_steps and step < cfg.warmup_steps:
        factor *= (step + 1) / cfg.warmup_steps
    return factor


def embedding_neighbours(bank: Tensor, k: int = 32, chunk: int = 1024) -> Tensor:
    """(identities, k): each identity's k nearest others by cosine of their embeddings (bank (N, E))."""
    x = F.normalize(bank, dim=1)
    rows = []
    for start in range(0, len(x), chunk):
        similarity = x[start : start + chunk] @ x.T
        similarity[torch.arange(len(similarity)), torch.arange(start, start + len(similarity))] = -float("inf")
        rows.append(similarity.topk(min(k, len(x) - 1), dim=1).indices)
    return torch.cat(rows)


def caption_neighbours(captions: list[str], labels: Tensor, k: int = 32) -> Tensor:
    """(identities, k): each identity's k nearest others by the word pairs of its captions.

    An identity's captions form one document of word bigrams ("red coat", "blue jeans": a colour
    bound to its garment); documents are compared by the cosine of their TF-IDF vectors
    (sublinear counts), so phrasings every description uses weigh little. Captions only, no
    attribute labels. On the default world a caption neighbour shares the top colour with 58%
    of identities (random 11%), top and bottom colour with 23% (2.5%).
    """
    pairs = []
    for caption in captions:
        words = re.findall(r"[a-z]+", caption.lower())
        pairs.append([f"{a} {b}" for a, b in zip(words, words[1:])])
    vocabulary = {p: i for i, p in enumerate(sorted({p for ps in pairs for p in ps}))}
    rows = torch.tensor([label for label, ps in zip(labels.tolist(), pairs) for _ in ps], dtype=torch.long)
    cols = torch.tensor([vocabulary[p] for ps in pairs for p in ps], dtype=torch.long)
    counts = torch.zeros(int(labels.max()) + 1, max(len(vocabulary), 1))
    counts.index_put_((rows, cols), torch.ones(len(rows)), accumulate=True)
    tf = torch.where(counts > 0, 1 + torch.log(counts.clamp(min=1)), counts)
    idf = torch.log(len(counts) / (counts > 0).sum(0).clamp(min=1))
    return embedding_neighbours(tf * idf, k)


def epoch_neighbours(
    cfg: TrainConfig, epoch: int, bank: Tensor, seen: Tensor, described_alike: Tensor | None
) -> Tensor | None:
    """This epoch's look-alike lists (identities, k), or None for plain identity sampling: before
    cfg.neighbours_from_epoch, and for embedding neighbours until every identity has an embedding."""
    if epoch < cfg.neighbours_from_epoch:
        return None
    if cfg.samples == "neighbours":
        return embedding_neighbours(bank) if seen.all() else None
    return described_alike


def neighbour_groups(neighbours: Tensor, group_size: int, g: torch.Generator) -> list[int]:
    """Identities in a random order, each followed by up to group_size - 1 of its unvisited neighbours."""
    taken = torch.zeros(len(neighbours), dtype=torch.bool)
    order = []
    for i in torch.randperm(len(neighbours), generator=g).tolist():
        if taken[i]:
            continue
        group = [i]
        for j in neighbours[i].tolist():
            if len(group) == group_size:
                break
            if not taken[j]:
                group.append(j)
                taken[j] = True
        taken[i] = True
        order += group
    return order


SAMPLES = ("captions", "images", "identities", "neighbours", "caption-neighbours")
MATCHES = ("identities", "descriptions")


def epoch_order(
    split: RetrievalSplit, cfg: TrainConfig, labels: Tensor, g: torch.Generator, neighbours: Tensor | None = None
) -> Tensor:
    """Caption indices of one epoch, in batch order (see TrainConfig.samples)."""
    counts = torch.bincount(split.caption_image, minlength=len(split.records))
    starts = torch.cumsum(counts, 0) - counts

    def random_caption(images: Tensor) -> Tensor:  # one random caption of each image
        return starts[images] + (torch.rand(len(images), generator=g) * counts[images]).long()

    if cfg.samples == "captions":
        return torch.randperm(len(split.captions), generator=g)
    if cfg.samples == "images":
        return random_caption(torch.randperm(len(split.records), generator=g))
    if cfg.samples not in SAMPLES:
        raise ValueError(f"unknown sampling {cfg.samples!r}: {', '.join(SAMPLES)}")
    image_label = labels[starts]  # (N_images,) training label of each image
    by_identity = [torch.nonzero(image_label == i).flatten() for i in range(int(image_label.max()) + 1)]
    if neighbours is not None:  # a neighbour kind, past its first epoch
        identities = neighbour_groups(neighbours, cfg.group_size, g)
    else:
        identities = torch.randperm(len(by_identity), generator=g).tolist()
    picks = []
    for i in identities:
        images = by_identity[i][torch.randperm(len(by_identity[i]), generator=g)]
        picks.append(images.repeat(cfg.instances)[: cfg.instances])  # fewer images: one repeats
    return random_caption(torch.cat(picks))


def start_from_checkpoint(model: LGUR, criterion: LGURLoss, cfg: TrainConfig) -> None:
    """A second stage: the weights (identity classifier included) and SDM temperature of cfg.init_from.

    The checkpoint must be of the same model; a CNN trunk may change its input size, and then its
    learned positions are resampled to the new grid.
    """
    initial, card = load_checkpoint(cfg.init_from, cfg.text_encoder_path)
    weights = initial.state_dict()
    old, new = initial.config.to_dict(), model.config.to_dict()
    old_grid, new_grid = initial.config.image.grid, model.config.image.grid
    for c in (old, new):
        c["image"].pop("img_size")
    if initial.classifier is None or old != new or (old_grid != new_grid and model.config.image.kind != "cnn"):
        raise ValueError(
            f"{cfg.init_from}: a second stage starts from a checkpoint of the same model (a CNN trunk may change "
            "its input size) with its identity classifier (a run's last.safetensors, trained on the same data)"
        )
    if old_grid != new_grid:
        key = "image_encoder.position"
        weights[key] = resize_position_embedding(weights[key], old_grid, new_grid)
    model.load_state_dict(weights)
    scale = card.get("training_state", {}).get("logit_scale")
    if criterion.logit_scale is not None and scale is not None:
        criterion.logit_scale.data.fill_(scale)


def split_records(records: list[Record], seed: int) -> dict[str, list[Record]]:
    splits: dict[str, list[Record]] = {}
    for r in records:
        splits.setdefault(r.split, []).append(r)
    if "val" not in splits and "train" in splits:  # e.g. ICFG-PEDES: hold out 5% of training identities
        ids = sorted({r.identity for r in splits["train"]})
        g = torch.Generator().manual_seed(seed)
        held = {ids[i] for i in torch.randperm(len(ids), generator=g)[: max(1, len(ids) // 20)].tolist()}
        splits["val"] = [r for r in splits["train"] if r.identity in held]
        splits["train"] = [r for r in splits["train"] if r.identity not in held]
    return splits


def plot_curves(log_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses, epochs, val = [], [], [], []
    for line in log_path.read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "step":
            steps.append(row["step"])
            losses.append(row["loss/total"])
        elif row["kind"] == "epoch":
            epochs.append(row["step"])
            val.append((row["val/R@1"], row["val/mAP"]))
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=110)
    a.plot(steps, losses, lw=0.8)
    a.set_xlabel("step")
    a.set_ylabel("training loss")
    if val:
        b.plot(epochs, [v[0] for v in val], "o-", label="val R@1")
        b.plot(epochs, [v[1] for v in val], "s-", label="val mAP")
        b.legend()
    b.set_xlabel("step")
    b.set_ylabel("%")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


# -- the run ---------------------------------------------------------------------------------


def train(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    if cfg.prototype_diversity and not cfg.use_pgu:
        raise ValueError("--prototype-diversity needs PGU (there are no prototypes with --no-pgu)")
    if cfg.swaps_from_epoch is not None and not cfg.sdm:
        raise ValueError("swapped-caption negatives are candidates of the SDM loss: give --sdm > 0")
    if cfg.matches not in MATCHES:
        raise ValueError(f"unknown matches {cfg.matches!r}: {', '.join(MATCHES)}")
    started = time.perf_counter()
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
    main = rank == 0

    # Data
    records, report = read_dataset(cfg.data)
    splits = split_records(records, cfg.seed)
    if not splits.get("train"):
        raise ValueError(f"{cfg.data}: no training entries ({report.summary()})")
    identities = sorted({r.identity for r in splits["train"]})
    label_of = {pid: i for i, pid in enumerate(identities)}

    # Model
    torch.manual_seed(cfg.seed)  # initial weights only; every later draw has its own generator
    model_config = cfg.model_config()
    model = LGUR(model_config, num_identities=len(identities)).to(device)
    size = model_config.image.img_size
    train_split = build_split(splits["train"], size, progress and main)
    val_split = build_split(splits["val"], size, progress and main)
    train_text = frozen_text_features(model.text_encoder, train_split.captions, cache, progress=progress and main)
    val_text = frozen_text_features(model.text_encoder, val_split.captions, cache, progress=progress and main)
    labels_of_caption = torch.tensor([label_of[int(i)] for i in train_split.caption_ids])
    crops_per_caption = 2
    use_crops = cfg.caption_crops > 0 and cfg.crops_from_epoch < cfg.epochs
    if use_crops:  # crop j of caption i is text number n + i * crops_per_caption + j
        crop_rng = np.random.default_rng(cfg.seed)
        crops = [c for caption in train_split.captions for c in caption_crops(caption, crops_per_caption, crop_rng)]
        crop_text = frozen_text_features(model.text_encoder, crops, cache, progress=progress and main)
        train_text = train_text.concat(crop_text)
    use_swaps = cfg.swaps_from_epoch is not None and cfg.swaps_from_epoch < cfg.epochs
    if use_swaps:  # text k (caption or crop) has its false copy at number k of swap_text
        swap_rng = np.random.default_rng(cfg.seed + 1)
        texts = train_split.captions + (crops if use_crops else [])
        swaps = [swapped_caption(t, swap_rng) for t in texts]
        swap_valid = torch.tensor([t is not None for t in swaps])
        swap_text = frozen_text_features(
            model.text_encoder, [t or "" for t in swaps], cache, progress=progress and main
        )
    text_terms: list[frozenset[str]] | None = None
    if cfg.matches == "descriptions":  # each text's person terms; an identity's: those of all its captions
        texts = train_split.captions + (crops if use_crops else [])
        all_terms = [description_terms(t) for t in texts]
        kept = person_terms(all_terms[: len(train_split.captions)], labels_of_caption.tolist())
        text_terms = [t & kept for t in all_terms]
        gathered: list[set[str]] = [set() for _ in identities]
        for terms, label in zip(text_terms, labels_of_caption.tolist()):  # the full captions only
            gathered[label] |= terms
        identity_terms = [frozenset(t) for t in gathered]
    pad = max(1, round(cfg.pad * size[0] / 384))

    criterion = LGURLoss(
        cfg.margin, seed=cfg.seed, diversity=cfg.prototype_diversity, sdm=cfg.sdm, temperature=cfg.temperature
    ).to(device)
    training_step = TrainingStep(model, criterion)
    optimizer = torch.optim.Adam(parameter_groups(training_step, cfg))
    step_module: nn.Module = training_step
    if distributed:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device] if device.type == "cuda" else None
        )
    base_lrs = [g["lr"] for g in optimizer.param_groups]

    # Resume, or start a second stage from another run's weights
    state = {"epoch": 0, "step": 0, "best": -1.0, "best_epoch": -1, "seconds": 0.0}
    last = out / "last.safetensors"
    resuming = last.is_file() and (out / "last_optimizer.safetensors").is_file()
    if cfg.init_from and not resuming:
        start_from_checkpoint(model, criterion, cfg)
        if main:
            log.info("second stage from %s", cfg.init_from)
    if resuming:
        resumed, card = load_checkpoint(last, cfg.text_encoder_path)
        model.load_state_dict(resumed.state_dict())
        load_optimizer_state(optimizer, out / "last_optimizer.safetensors")
        state = card["training_state"]
        if criterion.logit_scale is not None:
            criterion.logit_scale.data.fill_(state["logit_scale"])
        if main:
            log.info("resumed from %s at epoch %d", last, state["epoch"])
    log_path = out / "log.jsonl"

    def write_log(row: dict[str, Any]) -> None:
        if main:
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    vocabulary = caption_vocabulary(train_split.captions)

    def card(extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "training": {"config": dataclasses.asdict(cfg), "identities": len(identities), **(extra or {})},
            "data": {"path": str(cfg.data), "format_report": report.summary(), "train_images": len(splits["train"])},
            "vocabulary": vocabulary,
        }

    from tqdm import tqdm

    # Look-alikes by their captions (fixed), or by the latest training embedding of each identity
    # (neighbour batches; the bank is rebuilt after a resume).
    described_alike = (
        caption_neighbours(train_split.captions, labels_of_caption) if cfg.samples == "caption-neighbours" else None
    )
    bank = torch.zeros(len(identities), model_config.embedding_dim)
    seen = torch.zeros(len(identities), dtype=torch.bool)
    stop = False
    first_epoch = state["epoch"]
    for epoch in range(first_epoch, cfg.epochs):
        epoch_start = time.perf_counter()
        step_module.train()
        torch.manual_seed(cfg.seed * 65_537 + epoch * 97 + rank)  # dropout: reproducible after a resume
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        if distributed and cfg.samples == "neighbours":  # each rank saw its own shard: share them
            shared = torch.cat([bank * seen[:, None], seen[:, None].float()], dim=1).to(device)
            dist.all_reduce(shared)
            bank, seen = shared[:, :-1].cpu() / shared[:, -1:].cpu().clamp(min=1), shared[:, -1].cpu() > 0
        neighbours = epoch_neighbours(cfg, epoch, bank, seen, described_alike)
        order = epoch_order(train_split, cfg, labels_of_caption, g, neighbours)
        if world > 1:  # equal shards of whole batches, so identity groups stay together
            whole = len(order) // (cfg.batch_size * world) * cfg.batch_size * world
            order = order[:whole].view(-1, world, cfg.batch_size)[:, rank].flatten()
        criterion.generator.manual_seed(cfg.seed * 7919 + epoch * 131 + rank)
        aug = torch.Generator().manual_seed(cfg.seed * 104_729 + epoch * 31 + rank)
        crop_draws = torch.Generator().manual_seed(cfg.seed * 15_485_863 + epoch * 53 + rank)
        batches = len(order) // cfg.batch_size
        bar = tqdm(range(batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (progress and main))
        for b in bar:
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            images = normalize(augment(train_split.images[train_split.caption_image[idx]], pad, aug)).to(device)
            text = idx
            if use_crops and epoch >= cfg.crops_from_epoch:
                use = torch.rand(len(idx), generator=crop_draws) < cfg.caption_crops
                which = torch.randint(0, crops_per_caption, (len(idx),), generator=crop_draws)
                text = torch.where(use, len(train_split.captions) + idx * crops_per_caption + which, idx)
            feats, mask = train_text.batch(text)
            swapped = None
            if use_swaps and epoch >= cfg.swaps_from_epoch:
                swap_feats, swap_mask = swap_text.batch(text)
                swapped = (swap_feats.to(device), swap_mask.to(device), swap_valid[text].to(device))
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * lr_factor(state["step"], epoch, cfg)
            labels = labels_of_caption[idx]
            match = same = None
            if text_terms is not None:
                described = described_by([text_terms[t] for t in text.tolist()], [identity_terms[i] for i in labels])
                same = same_identity(labels)
                match = (same | described).to(device)
            losses, embeddings = step_module(
                images, feats.to(device), mask.to(device), labels.to(device), swapped, match
            )
            if cfg.samples == "neighbours":
                bank[labels], seen[labels] = embeddings.float().cpu(), True
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            optimizer.step()
            state["step"] += 1
            if state["step"] % 20 == 0 or b == batches - 1:
                row = {"kind": "step", "epoch": epoch, "step": state["step"], "lr": optimizer.param_groups[0]["lr"]}
                row |= {f"loss/{k}": round(v.item(), 5) for k, v in losses.items()}
                if match is not None:  # texts that describe other people in the batch, per text
                    row["matches/extra"] = round((match.sum().item() - same.sum().item()) / len(idx), 3)
                write_log(row)
                bar.set_postfix(loss=f"{losses['total'].item():.3f}")
            elapsed_min = (state["seconds"] + time.perf_counter() - epoch_start) / 60
            if cfg.max_minutes and elapsed_min > cfg.max_minutes:
                stop = True
                break
        state["seconds"] += time.perf_counter() - epoch_start
        state["epoch"] = epoch + 1
        if criterion.logit_scale is not None:
            state["logit_scale"] = criterion.logit_scale.item()
        if main:  # validate, keep the best on val, save a resumable state
            metrics = evaluate_split(model, val_split, val_text)["standard"]
            row = {"kind": "epoch", "epoch": epoch, "step": state["step"], "seconds": round(state["seconds"], 1)}
            row |= {f"val/{k}": round(v, 3) for k, v in metrics.items() if k != "cmc"}
            write_log(row)
            print(f"epoch {epoch + 1}: val R@1 {metrics['R@1']:.2f} mAP {metrics['mAP']:.2f}", flush=True)
            if metrics["R@1"] + metrics["mAP"] > state["best"]:
                state["best"], state["best_epoch"] = metrics["R@1"] + metrics["mAP"], epoch
                save_checkpoint(model, out / "best.safetensors", card({"epoch": epoch, "val": metrics | {"cmc": None}}))
            save_checkpoint(model, last, card() | {"training_state": state}, include_classifier=True)
            save_optimizer_state(optimizer, out / "last_optimizer.safetensors")
            plot_curves(log_path, out / "curves.png")
        if distributed:
            dist.barrier()
        if stop:
            break
        if cfg.stop_after and epoch + 1 - first_epoch >= cfg.stop_after and epoch + 1 < cfg.epochs:
            return {"run": str(out), "stopped_after_epoch": epoch + 1, "resume": "run the same command again"}

    result: dict[str, Any] = {"run": str(out), "best_epoch": state["best_epoch"], "train_seconds": state["seconds"]}
    if main:
        best, card = load_checkpoint(out / "best.safetensors", cfg.text_encoder_path)
        scores = score_test_splits(best, cfg.data, splits, cache, out / "cmc.png", card.get("vocabulary"))
        average = text_atom_average(best.eval(), [c for r in splits["val"] for c in r.captions])
        record_in_card(out / "best.safetensors", card | scores | ({"atom_average": average} if average else {}))
        result["metrics"] = scores["metrics"]
        result["total_seconds"] = time.perf_counter() - started
        atomic_write_bytes(out / "result.json", json.dumps(result, indent=2).encode())
    if distributed:
        dist.destroy_process_group()
    return result
