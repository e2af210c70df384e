"""The pointing game (Zhang et al., ECCV 2016) and the maps it is scored against: does a map's peak
fall on the body part it is meant to show, and what does a map that ignores the image score?"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..synth.render import PARTS

# Zhang et al.'s pointing game allows 15 pixels at a 224-pixel input: a fixed fraction of the image
# height, so models with different patch grids are scored alike.
POINTING_TOLERANCE = 15 / 224


def pointing_hit(word_map: np.ndarray, part_mask: np.ndarray, tolerance: float = POINTING_TOLERANCE) -> bool:
    """Does the peak of word_map (rows, cols), upsampled bilinearly to the part mask's pixels (H, W)
    as the app draws it, fall within tolerance * H pixels of a pixel of the part?"""
    h, w = part_mask.shape
    grid = torch.from_numpy(np.asarray(word_map, dtype=np.float32))[None, None]
    upsampled = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    r, c = divmod(int(upsampled.argmax()), w)
    ys, xs = np.nonzero(part_mask)
    if len(ys) == 0:
        return False
    return bool(((ys - r) ** 2 + (xs - c) ** 2).min() <= (tolerance * h) ** 2)


def patch_part_fractions(label_map: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(H, W) part ids -> (N, parts) fraction of each patch's pixels per part."""
    gh, gw = grid
    h, w = label_map.shape
    ph, pw = h // gh, w // gw
    onehot = np.eye(len(PARTS), dtype=np.float32)[label_map[: gh * ph, : gw * pw]]  # (H, W, parts)
    return onehot.reshape(gh, ph, gw, pw, len(PARTS)).mean(axis=(1, 3)).reshape(gh * gw, len(PARTS))


def template_map(point: tuple[float, float], grid: tuple[int, int]) -> np.ndarray:
    """(rows, cols): a map that ignores the image, all its weight on the cell holding `point` (row,
    column fractions). Scored by pointing_hit as the model's maps are, so a model drawing it ties."""
    rows, cols = grid
    out = np.zeros(grid, dtype=np.float32)
    out[min(int(point[0] * rows), rows - 1), min(int(point[1] * cols), cols - 1)] = 1.0
    return out


def uniform_hit(part_mask: np.ndarray, tolerance: float = POINTING_TOLERANCE) -> float:
    """The chance that a flat map's peak (a random pixel) lies within the tolerance of the part."""
    if not part_mask.any():
        return 0.0
    distance = ndimage.distance_transform_edt(~part_mask)
    return float((distance <= tolerance * part_mask.shape[0]).mean())
