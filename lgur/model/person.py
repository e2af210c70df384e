"""Where the detail detector sees the person: the teacher's map for the prototypes' attention.

No masks: the detector learned the captions' phrases, so the patches where it is sure of some phrase
are the person (train --prototype-person, lgur.training.foreground).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .lgur import LGUR


def _needs_detector(model: LGUR) -> None:
    if model.details is None:
        raise ValueError("this model has no detail detector (python -m lgur train-details adds one)")


def surest_phrase(model: LGUR, detail_tokens: Tensor) -> Tensor:
    """(B, N, dim) the tokens the detector reads -> (B, N) its probability of its surest phrase at each patch."""
    _, patches = model.details(detail_tokens)  # (B, N, K) per-patch phrase logits
    return torch.sigmoid(patches).amax(-1)


def relative(surest: Tensor, saturation: float) -> Tensor:
    """(B, N) detector certainty -> relative to the image's surest position, 1 from `saturation` of it up."""
    return (surest / (saturation * surest.amax(-1, keepdim=True)).clamp(min=1e-6)).clamp(max=1.0)


def person_map_of(model: LGUR, detail_tokens: Tensor, saturation: float = 1.0) -> Tensor:
    """`person_map` from the tokens the detector reads (LGUR.encode_images' second output)."""
    _needs_detector(model)
    return relative(surest_phrase(model, detail_tokens), saturation)


@torch.no_grad()
def person_map(model: LGUR, images: Tensor, saturation: float = 1.0) -> Tensor:
    """(B, 3, H, W) -> (B, N) in [0, 1]: how surely the detail detector sees some caption phrase at each
    patch, relative to the image's surest patch, and 1 wherever that is at least `saturation`."""
    _needs_detector(model)
    return person_map_of(model, model.detail_tokens(images), saturation)


@torch.no_grad()
def fine_person_map(model: LGUR, images: Tensor, saturation: float = 1.0) -> Tensor:
    """`person_map` at twice the patch grid (B, 4N), by shift-and-stitch (Long et al., CVPR 2015): the
    detector runs on the image shifted by half a patch down, right and both, and each half-size cell
    keeps the least sure of the four patches that hold it. A patch that is half leg, half ground is
    sure of the person; the shifted patch holding only its ground half is not, so the ground beside
    a leg is told from the leg, which the patch grid cannot do."""
    _needs_detector(model)
    (rows, cols), (height, width) = model.image_encoder.grid, images.shape[-2:]
    half_h, half_w = height // rows // 2, width // cols // 2
    fine_rows, fine_cols = (torch.arange(2 * n, device=images.device) for n in (rows, cols))
    phases = []
    for dy in (0, half_h):
        for dx in (0, half_w):
            # the content moves up and left by (dy, dx), the far edges repeated: patch (i, j) now holds
            # the pixels from (i * patch + dy, j * patch + dx), so fine cell (r, c) lies in patch
            # ((r - [dy > 0]) // 2, (c - [dx > 0]) // 2) (clamped: the first cell has no shifted patch)
            shifted = F.pad(images, (0, dx, 0, dy), mode="replicate")[..., dy:, dx:]
            surest = surest_phrase(model, model.detail_tokens(shifted)).unflatten(-1, (rows, cols))
            r = ((fine_rows - int(dy > 0)) // 2).clamp(0, rows - 1)
            c = ((fine_cols - int(dx > 0)) // 2).clamp(0, cols - 1)
            phases.append(surest[:, r][:, :, c])  # (B, 2 rows, 2 cols)
    return relative(torch.stack(phases).amin(0).flatten(1), saturation)
