"""A second stage: a run that starts from a trained checkpoint rather than from scratch. Its weights
are loaded (the model may add the fine read-out), the identity classifier is imprinted when the
checkpoint has none, and the image prototypes are handed their row-prior heights by where they read."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from ..data.dataset import RetrievalSplit, normalize
from ..model.checkpoint import load_checkpoint
from ..model.encoders import resize_position_embedding
from ..model.lgur import LGUR
from ..model.pgu import position_heights
from .config import TrainConfig
from .losses import LGURLoss

log = logging.getLogger(__name__)


def start_from_checkpoint(model: LGUR, criterion: LGURLoss, cfg: TrainConfig) -> bool:
    """A second stage: the weights (identity classifier included, when there), SDM temperature and term
    classifier (its `*_terms.safetensors` beside it, when there) of cfg.init_from. -> whether the
    identity classifier still needs its first weights (imprint_classifier): a shipped checkpoint has none.

    The model is the checkpoint's (TrainConfig.model_config) with the run's overrides: a CNN trunk may
    change its input size (its learned positions are then resampled to the new grid), and weights the
    checkpoint lacks may only be the fine read-out's (pgu_fine: they start at zero, the model unchanged).
    """
    initial, card = load_checkpoint(cfg.init_from, cfg.text_encoder_path)
    weights = initial.state_dict()
    old_grid, new_grid = initial.config.image.grid, model.config.image.grid
    if old_grid != new_grid and model.config.image.kind != "cnn":
        raise ValueError(f"{cfg.init_from}: only a CNN trunk may change its input size in a second stage")
    if old_grid != new_grid:
        key = "image_encoder.position"
        weights[key] = resize_position_embedding(weights[key], old_grid, new_grid)
    same_model = f"{cfg.init_from}: a second stage starts from a checkpoint of the same model"
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as error:  # a shape differs
        raise ValueError(f"{same_model}: {str(error).splitlines()[-1].strip()}") from error
    allowed = ("pgu.fine.", "classifier.") if model.classifier is not None else ("pgu.fine.",)
    wrong = [k for k in missing if not k.startswith(allowed)] + list(unexpected)
    if wrong:
        raise ValueError(f"{same_model}; it differs in {', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}")
    scale = card.get("training_state", {}).get("logit_scale")
    if criterion.logit_scale is not None and scale is not None:
        criterion.logit_scale.data.fill_(scale)
    start = Path(cfg.init_from)
    terms = start.with_name(f"{start.stem}_terms.safetensors")  # a run's last_terms beside its last
    if criterion.term_classifier is not None and terms.is_file():
        try:
            criterion.term_classifier.load_state_dict(load_file(str(terms)))
        except RuntimeError:  # another vocabulary of terms
            log.warning("%s: its term classifier does not fit these data's terms; it starts afresh", terms)
    return any(k.startswith("classifier.") for k in missing)


@torch.no_grad()
def imprint_classifier(model: LGUR, split: RetrievalSplit, labels: Tensor, batch_size: int = 128) -> None:
    """The identity classifier's first weights from the model itself (weight imprinting, Qi et al.,
    CVPR 2018): each identity's mean part vector over its training images, unit length, scaled so that
    an image's logit for its own identity is about 10 (labels: (N_captions,) of split's captions)."""
    image_labels = torch.empty(len(split.images), dtype=torch.long)
    image_labels[split.caption_image] = labels
    was_training = model.training
    model.eval()
    parts = []
    device = next(model.parameters()).device
    for start in range(0, len(split.images), batch_size):
        batch = normalize(split.images[start : start + batch_size].to(device))
        parts.append(model.explain_images(batch, need_weights=False).parts.float().cpu())
    model.train(was_training)
    vectors = torch.cat(parts)  # (N, P, part_dim)
    count = model.classifier.weight.shape[-1]
    sums = torch.zeros(count, *vectors.shape[1:]).index_add_(0, image_labels, vectors)  # (C, P, part_dim)
    means = F.normalize(sums, dim=-1) * (10.0 / vectors.norm(dim=-1).mean(0))[None, :, None]
    weight = means.permute(1, 2, 0)  # (P, part_dim, C)
    if model.classifier.whole:
        weight = weight.flatten(0, 1).unsqueeze(0) / weight.shape[0] ** 0.5
    model.classifier.weight.copy_(weight.to(device))


@torch.no_grad()
def place_prototypes(
    model: LGUR,
    split: RetrievalSplit,
    heights: tuple[float, ...],
    width: float | tuple[float, ...],
    count: int = 512,
    batch: int = 128,
) -> tuple[float, ...]:
    """Give each image prototype one of `heights` for its row prior (PGU.set_rows) by a linear assignment
    to the prototypes' mean heights: where their last-layer maps lie on the first `count` training
    images. -> the heights in prototype order (also set in model.config)."""
    from scipy.optimize import linear_sum_assignment

    if len(heights) != model.config.num_prototypes:
        raise ValueError(f"prototype rows: {len(heights)} heights for {model.config.num_prototypes} prototypes")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    means = []
    for start in range(0, min(count, len(split.images)), batch):
        explained = model.explain_images(normalize(split.images[start : min(start + batch, count)].to(device)))
        maps = explained.prototype_attention[:, -1].mean(1).float().cpu()  # (B, P, N)
        means.append(maps @ position_heights(explained.prototype_shape))  # (B, P)
    model.train(was_training)
    mean_height = torch.cat(means).mean(0)  # (P,)
    cost = (mean_height[:, None] - torch.tensor(heights)[None, :]).abs()
    prototypes, slots = linear_sum_assignment(cost.numpy())
    placed = tuple(float(heights[s]) for _, s in sorted(zip(prototypes, slots)))
    model.set_prototype_rows(placed, width)
    return placed
