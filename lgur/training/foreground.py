"""DGA's foreground weight m, fitted after training (not in the paper).

In the paper m is learned end to end. Here nothing trains it: DGA scales the rebuilt patches by m
and PGU's pre-norm normalises them again, so m changes nothing downstream and gets no gradient
(docs/EXPERIMENTS.md). Left as initialised it is noise, yet the guidance maps and the image's atom
chart are meant to be weighted by it. So once the detail detector is trained, m's linear head is
fitted to the detector's person map (lgur.model.person: how surely it sees some caption phrase at
each patch, relative to the image's surest patch): where the person is, as the captions taught it,
no masks. The head reads the same patch tokens as before and everything the embedding depends on
is frozen, so retrieval is unchanged (up to LayerNorm's epsilon); only the explanations that
weight by m change.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.dataset import normalize
from ..model.person import person_map_of

if TYPE_CHECKING:
    from ..model.lgur import LGUR


@torch.no_grad()  # not inference_mode: m's head is fitted on these tensors
def foreground_targets(model: LGUR, images: Tensor, batch_size: int = 128) -> tuple[Tensor, Tensor]:
    """uint8 (B, 3, H, W) -> the patch tokens m reads (B, N, dim) and the person map (B, N) it is fitted to."""
    model.eval()
    tokens, maps = [], []
    for batch in images.split(batch_size):
        encoded, detail_tokens, _ = model.encode_images(normalize(batch))  # the encoder runs once for both
        tokens.append(encoded)
        maps.append(person_map_of(model, detail_tokens))
    return torch.cat(tokens), torch.cat(maps)


def fit_foreground(
    model: LGUR,
    images: Tensor,
    val_images: Tensor | None = None,
    steps: int = 300,
    lr: float = 1e-2,
    report: Callable[[str], None] = print,
) -> dict[str, float]:
    """Fit `model.dga.foreground` (a linear head on the patch tokens) to the detail detector's person
    map of `images` by binary cross-entropy (full batch, AdamW), and mark m as meaningful
    (config.foreground_fitted). Returns the final loss on `images` and on `val_images`."""
    if model.dga is None:
        raise ValueError("this model has no DGA module, so no foreground weight to fit")
    if model.details is None:
        raise ValueError("fitting the foreground weight needs the detail detector (train-details adds one)")
    tokens, targets = foreground_targets(model, images)
    head = model.dga.foreground
    torch.nn.init.zeros_(head.weight)  # start from m = 1/2 everywhere, not from what the run left
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr, weight_decay=1e-4)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(head(tokens).squeeze(-1), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    result = {"loss": round(loss.item(), 4)}
    if val_images is not None:
        val_tokens, val_targets = foreground_targets(model, val_images)
        with torch.inference_mode():
            val_loss = F.binary_cross_entropy_with_logits(head(val_tokens).squeeze(-1), val_targets)
        result["val_loss"] = round(val_loss.item(), 4)
    model.config.foreground_fitted = True
    report(f"foreground weight m fitted to the detector's person map: {result}")
    return result


def fit_foreground_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    images: int = 2048,
    seed: int = 0,
    report: Callable[[str], None] = print,
    text_encoder_path: str | None = None,
) -> Path:
    """Fit m on a checkpoint that has a detail detector (`fit_foreground` on `images` training images
    of `data`, checked on 512 val images) and write the checkpoint with it: the same storage
    precision, every other weight unchanged. Returns the new checkpoint's path."""
    from ..data.dataset import build_split
    from ..data.readers import read_dataset
    from ..model.checkpoint import load_checkpoint, save_derived
    from .sampling import split_records

    model, card = load_checkpoint(checkpoint, text_encoder_path)
    splits = split_records(read_dataset(data)[0], seed)
    if not splits.get("train") or not splits.get("val"):
        raise ValueError(f"{data}: fitting the foreground weight needs a train and a val split")
    rows = torch.randperm(len(splits["train"]), generator=torch.Generator().manual_seed(seed))[:images].tolist()
    size = model.config.image.img_size
    train = build_split([splits["train"][r] for r in rows], size)
    val = build_split(splits["val"][:512], size)
    result = fit_foreground(model, train.images, val.images, report=report)
    details = card.get("details", {}) | {"foreground": result | {"images": len(rows), "from": Path(checkpoint).name}}
    return save_derived(model, out, card, {"details": details})
