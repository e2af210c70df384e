"""A trained LGUR for serving and saving: BatchNorm folding, the weights a checkpoint stores, its size."""

from __future__ import annotations

import torch
from torch import Tensor

from .encoders import fold_batch_norms
from .lgur import LGUR


@torch.no_grad()
def fold_for_serving(model: LGUR) -> int:
    """Inference only: the image trunk's (and the detail stage's) BatchNorms folded into their
    convolutions, checked on a probe batch. The weights then differ from the checkpoint's, so a
    folded model is never saved (trainable_state_dict refuses). -> how many were folded."""
    if model.training:
        raise ValueError("batch norms are folded for inference only: call .eval() first")
    probe = torch.randn(2, 3, *model.config.image.img_size, generator=torch.Generator().manual_seed(0))

    def outputs() -> Tensor:
        explained = model.explain_images(probe, need_weights=False)
        logits = explained.detail_logits
        return explained.embedding if logits is None else torch.cat([explained.embedding, logits.tanh()], 1)

    before = outputs()
    folded = sum(fold_batch_norms(m) for m in (model.image_encoder, model.detail_stage) if m is not None)
    model.batch_norms_folded = model.batch_norms_folded or folded > 0
    change = (outputs() - before).abs().max().item()
    if change > 1e-4:  # a convolution whose output does not go straight to the BatchNorm after it
        raise RuntimeError(f"folding the batch norms changed the model's outputs (by up to {change:.2g})")
    return folded


def trainable_state_dict(model: LGUR, include_classifier: bool = False) -> dict[str, Tensor]:
    """Every weight except the frozen text backbone (which its fingerprint identifies)."""
    if model.batch_norms_folded:
        raise ValueError("this model's batch norms are folded for serving; save the model as loaded")
    return {
        k: v
        for k, v in model.state_dict().items()
        if not k.startswith("text_encoder.backbone.") and (include_classifier or not k.startswith("classifier."))
    }


def parameter_counts(model: LGUR) -> dict[str, int]:
    """Trainable and frozen parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {"trainable": trainable, "frozen": frozen}
