"""Training the detail detector (model.details) after the model, on its frozen image encoder, with
each image's identity's caption phrases as its labels; `detail_weight` is then chosen on val."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.dataset import description_terms, frequent_terms, normalize, person_terms
from ..model.config import DetailTrainConfig
from ..model.details import DetailDetector, DetailStage, phrase_index, phrase_rows, phrase_weights
from ..model.lgur import LGUR

DETAIL_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.8, 1.2, 1.6, 2.0)  # the candidates the validation split chooses from


def detail_vocabulary(captions: list[str], identities: list[int], min_captions: int = 20) -> list[str]:
    """The phrases worth detecting: person terms (data.dataset.person_terms: they recur for one
    identity) used by at least `min_captions` captions, sorted."""
    terms = [description_terms(c) for c in captions]
    kept = person_terms(terms, identities)
    return frequent_terms([caption & kept for caption in terms], min_captions)


def identity_targets(captions: list[str], caption_ids: Tensor, image_ids: Tensor, index: dict[str, int]) -> Tensor:
    """(images, K) multi-hot: every known phrase of any caption of the image's identity."""
    said: dict[int, set[int]] = {}
    for caption, identity in zip(captions, caption_ids.tolist(), strict=True):
        said.setdefault(identity, set()).update(phrase_rows(caption, index))
    targets = torch.zeros(len(image_ids), len(index))
    for row, identity in enumerate(image_ids.tolist()):
        targets[row, sorted(said.get(identity, ()))] = 1.0
    return targets


# -- training (after the model, on its frozen encoder) ------------------------------------------


@torch.inference_mode()
def encoder_tokens(
    model: LGUR, images: Tensor, flipped: bool = False, batch_size: int = 256, stage_blocks: int = 0
) -> Tensor:
    """uint8 (B, 3, H, W) -> (B, N, dim) float16 tokens of the model's image encoder (mirrored:
    `flipped`); with `stage_blocks` > 0, the input of its trunk's last `stage_blocks` block groups
    (B, C, rows, cols), which a DetailStage of that many groups reads."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size])
        x = x.flip(-1) if flipped else x
        encoder = model.image_encoder
        out.append((encoder.forward_with_stage_input(x, stage_blocks)[1] if stage_blocks else encoder(x)).half())
    return torch.cat(out)


def average_precision(scores: Tensor, targets: Tensor) -> float:
    """Mean over phrases (with a positive) of the average precision of ranking images by score, in %."""
    values = []
    for k in range(targets.shape[1]):
        hits = targets[scores[:, k].argsort(descending=True), k]
        if hits.sum() > 0:
            precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
            values.append(float((precision * hits).sum() / hits.sum()))
    return 100 * float(np.mean(values)) if values else 0.0


def fit_detector(
    tokens: Tensor,
    targets: Tensor,
    cfg: DetailTrainConfig,
    val: tuple[Tensor, Tensor] | None = None,
    report: Callable[[str], None] = print,
    stage: DetailStage | None = None,
) -> DetailDetector:
    """Fit a detector to multi-hot phrase targets (B, K) by binary cross-entropy; `val` (inputs,
    targets) is scored by phrase mAP every 5 epochs. The inputs (B, 2, ...) hold each image and its
    mirror image: encoder tokens (B, 2, N, dim), or with `stage`, the inputs of that stage
    (B, 2, C, rows, cols). With a stage the detector is first fitted to the stage as it starts (the
    encoder's own tokens), then both are fine-tuned together for `cfg.stage_epochs`. Returns the
    detector (and leaves the stage) in eval mode."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    inputs, val_inputs = tokens, None if val is None else val[0]
    if stage is not None:
        inputs = torch.stack([detail_tokens(stage, tokens[:, i]) for i in range(tokens.shape[1])], 1)
        val_inputs = None if val is None else detail_tokens(stage, val[0])
    detector = DetailDetector(inputs.shape[-1], targets.shape[1], cfg.hidden, cfg.sharpness)
    optimizer = torch.optim.AdamW(detector.parameters(), cfg.lr, weight_decay=cfg.weight_decay)
    val_set = None if val is None else (val_inputs, val[1])
    run_epochs(detector, None, inputs, targets, optimizer, cfg.epochs, cfg.batch_size, generator, val_set, report)
    if stage is not None:
        del inputs, val_inputs
        optimizer = torch.optim.AdamW(
            [
                {"params": stage.parameters(), "lr": cfg.stage_lr},
                {"params": detector.parameters(), "lr": cfg.stage_detector_lr},
            ],
            weight_decay=cfg.weight_decay,
        )
        report(f"fine-tuning the detector's own trunk stage for {cfg.stage_epochs} epochs")
        run_epochs(
            detector, stage, tokens, targets, optimizer, cfg.stage_epochs, cfg.stage_batch_size, generator, val, report
        )
        stage.eval()
    return detector.eval()


@torch.inference_mode()
def detail_tokens(stage: DetailStage, features: Tensor, batch_size: int = 256) -> Tensor:
    """(B, C, rows, cols) float16 stage inputs -> (B, N, dim) float16 tokens of the stage."""
    stage.eval()
    return torch.cat([stage(x.float()).half() for x in features.split(batch_size)])


def detect(detector: DetailDetector, stage: DetailStage | None, inputs: Tensor) -> Tensor:
    """(B, K) phrase logits of encoder tokens (B, N, dim), or with `stage`, of that stage's inputs."""
    return detector(inputs.float() if stage is None else stage(inputs.float()))[0]


@torch.inference_mode()
def phrase_logits(detector: DetailDetector, stage: DetailStage | None, inputs: Tensor, batch_size: int = 256) -> Tensor:
    """`detect` in batches, without gradients."""
    return torch.cat([detect(detector, stage, x) for x in inputs.split(batch_size)])


def run_epochs(
    detector: DetailDetector,
    stage: DetailStage | None,
    inputs: Tensor,
    targets: Tensor,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    val: tuple[Tensor, Tensor] | None,
    report: Callable[[str], None],
) -> None:
    """Epochs of binary cross-entropy over shuffled batches, each sample as itself or mirrored, with
    a one-cycle schedule peaking at each parameter group's learning rate."""
    steps = epochs * math.ceil(len(inputs) / batch_size)
    peaks = [group["lr"] for group in optimizer.param_groups]
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, peaks, total_steps=steps, pct_start=0.1)
    for epoch in range(epochs):
        detector.train()
        if stage is not None:
            stage.train()
        order, total = torch.randperm(len(inputs), generator=generator), 0.0
        for batch in order.split(batch_size):
            mirrored = torch.randint(0, inputs.shape[1], (len(batch),), generator=generator)  # flip augmentation
            loss = F.binary_cross_entropy_with_logits(detect(detector, stage, inputs[batch, mirrored]), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        if (epoch + 1) % 5 == 0 or epoch + 1 == epochs:
            line = f"epoch {epoch + 1}: loss {total / len(inputs):.4f}"
            if val is not None:
                detector.eval()
                if stage is not None:
                    stage.eval()
                logits = phrase_logits(detector, stage, val[0])
                line += f", val phrase mAP {average_precision(logits, val[1]):.1f}"
            report(line)


def train_details(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    cfg: DetailTrainConfig | None = None,
    cache: str | Path | None = "cache",
    report: Callable[[str], None] = print,
    text_encoder_path: str | None = None,
) -> Path:
    """Train a detail detector on a checkpoint's frozen image encoder and write the checkpoint with
    it (same storage precision; every other weight unchanged). The detail weight is the one of
    DETAIL_WEIGHTS with the best validation R@1 over full captions and over crops of them (short
    descriptions, as people type). Returns the new checkpoint's path."""
    from ..data.dataset import build_split, caption_crops, frozen_text_features
    from ..data.readers import read_dataset
    from ..eval.evaluate import caption_embeddings, image_embeddings, retrieval_metrics
    from ..model.checkpoint import load_checkpoint, save_derived
    from .foreground import fit_foreground
    from .sampling import split_records

    cfg = cfg or DetailTrainConfig()
    start = time.perf_counter()
    model, card = load_checkpoint(checkpoint, text_encoder_path)
    splits = split_records(read_dataset(data)[0], cfg.seed)
    if not splits.get("train") or not splits.get("val"):
        raise ValueError(f"{data}: training a detail detector needs a train and a val split")
    size = model.config.image.img_size
    train, val = build_split(splits["train"], size), build_split(splits["val"], size)
    terms = detail_vocabulary(train.captions, train.caption_ids.tolist(), cfg.min_captions)
    if not terms:
        raise ValueError(f"{data}: no caption phrase recurs for one person in {cfg.min_captions}+ captions")
    terms = tuple(terms)
    index = phrase_index(terms)
    stage = DetailStage(model.image_encoder, cfg.stage_blocks) if cfg.stage else None  # its own trunk stage
    report(f"{len(terms)} phrases; encoding {len(train.images)} training images (and their mirror images)")
    stage_blocks = cfg.stage_blocks if cfg.stage else 0
    inputs = torch.stack(
        [encoder_tokens(model, train.images, flipped, stage_blocks=stage_blocks) for flipped in (False, True)], 1
    )
    targets = identity_targets(train.captions, train.caption_ids, train.image_ids, index)
    val_inputs = encoder_tokens(model, val.images, stage_blocks=stage_blocks)
    val_targets = identity_targets(val.captions, val.caption_ids, val.image_ids, index)

    detector = fit_detector(inputs, targets, cfg, (val_inputs, val_targets), report, stage)
    with torch.inference_mode():
        detector.reference.copy_(F.logsigmoid(phrase_logits(detector, stage, inputs[:, 0])).mean(0))
        val_logits = phrase_logits(detector, stage, val_inputs)  # (images, K)
    val_map, lift = average_precision(val_logits, val_targets), detector.lift(val_logits)

    # The detail weight, chosen on the validation split: full captions and one crop of each.
    crops = [caption_crops(c, 1, np.random.default_rng([cfg.seed, i]))[0] for i, c in enumerate(val.captions)]
    images = image_embeddings(model, val.images)
    choice: dict[str, Any] = {}
    for name, texts in (("captions", val.captions), ("crops", crops)):
        similarity = caption_embeddings(model, frozen_text_features(model.text_encoder, texts, cache)) @ images.t()
        bonus = phrase_weights(texts, terms) @ lift.t()
        choice[name] = {
            str(w): round(retrieval_metrics(similarity + w * bonus, val.caption_ids, val.image_ids)["R@1"], 2)
            for w in DETAIL_WEIGHTS
        }
    weight = max(DETAIL_WEIGHTS, key=lambda w: choice["captions"][str(w)] + choice["crops"][str(w)])
    report(f"val R@1 by detail weight: captions {choice['captions']}, crops {choice['crops']}; chosen {weight}")

    model.config.detail_terms = terms
    model.config.detail_hidden, model.config.detail_sharpness = cfg.hidden, cfg.sharpness
    model.config.detail_weight, model.config.detail_stage = weight, stage is not None
    model.config.detail_stage_blocks = cfg.stage_blocks if stage is not None else 1
    model.details, model.detail_stage = detector, stage
    foreground = None
    if cfg.foreground and model.dga is not None:
        rows = torch.randperm(len(train.images), generator=torch.Generator().manual_seed(cfg.seed))
        foreground = fit_foreground(model, train.images[rows[: cfg.foreground_images]], val.images[:512], report=report)
    details = {
        "training": asdict(cfg) | {"seconds": round(time.perf_counter() - start, 1), "from": Path(checkpoint).name},
        "phrases": len(terms),
        "val_phrase_mAP": round(val_map, 2),
        "val_R@1_by_weight": choice,
    }
    return save_derived(model, out, card, {"details": details | ({"foreground": foreground} if foreground else {})})
