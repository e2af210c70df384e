"""How good are the explanations? Measured against the synthetic world's part labels.

- Foreground weights: ROC-AUC of the per-patch weight m for "this patch is mostly person".
- Prototypes: the share of each prototype's attention that falls on each body part,
  next to the share a uniform attention would give (the parts' area), so specialisation
  shows as a departure from area.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .data.dataset import load_image, normalize
from .losses import prototype_overlap
from .model import LGUR
from .synth.render import PARTS


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum (Mann-Whitney U) statistic, ties averaged."""
    from scipy.stats import rankdata

    labels = labels.astype(bool)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def patch_part_fractions(label_map: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(H, W) part ids -> (N, parts) fraction of each patch's pixels per part."""
    gh, gw = grid
    h, w = label_map.shape
    ph, pw = h // gh, w // gw
    onehot = np.eye(len(PARTS), dtype=np.float32)[label_map[: gh * ph, : gw * pw]]  # (H, W, parts)
    return onehot.reshape(gh, ph, gw, pw, len(PARTS)).mean(axis=(1, 3)).reshape(gh * gw, len(PARTS))


@torch.inference_mode()
def explanation_quality(
    model: LGUR, data: str | Path, split: str = "test", limit: int | None = None, batch_size: int = 64
) -> dict[str, Any]:
    data = Path(data)
    annotations = [a for a in json.loads((data / "reid_raw.json").read_text()) if a["split"] == split][:limit]
    side = json.loads((data / "synthetic_attributes.json").read_text())
    size, grid = model.config.image.img_size, model.image_encoder.grid
    model.eval()
    fg_scores, fg_labels, overlaps = [], [], []
    share = np.zeros((model.config.num_prototypes, len(PARTS)))
    area = np.zeros(len(PARTS))
    for start in range(0, len(annotations), batch_size):
        chunk = annotations[start : start + batch_size]
        images = torch.from_numpy(np.stack([load_image(data / "imgs" / a["file_path"], size) for a in chunk]))
        explained = model.explain_images(normalize(images))
        if explained.prototype_attention is not None:  # (B, layers, H, P, N) -> last layer
            overlaps.append(prototype_overlap(explained.prototype_attention[:, -1]))
        for i, a in enumerate(chunk):
            with Image.open(data / side[a["file_path"]]["parts"]) as labels:
                fractions = patch_part_fractions(np.asarray(labels), grid)  # (N, parts)
            person = 1.0 - fractions[:, 0]
            area += fractions.mean(0)
            if explained.foreground is not None:
                fg_scores.append(explained.foreground[i].numpy())
                fg_labels.append(person > 0.5)
            if explained.prototype_attention is not None:
                attention = explained.prototype_attention[i, -1].mean(0).numpy()  # (P, N), last layer
                share += attention @ fractions
    n = len(annotations)
    result: dict[str, Any] = {"split": split, "images": n, "parts": PARTS}
    if fg_scores:
        scores, labels = np.concatenate(fg_scores), np.concatenate(fg_labels)
        result["foreground_auc"] = roc_auc(scores, labels)
        result["foreground_mean"] = {
            "person_patches": float(scores[labels].mean()),
            "background_patches": float(scores[~labels].mean()),
        }
    if explained.prototype_attention is not None:
        result["prototype_part_share"] = (share / n).round(4).tolist()
        result["prototype_overlap"] = float(torch.cat(overlaps).mean())
    result["part_area_share"] = (area / n).round(4).tolist()
    return result


def format_quality(result: dict[str, Any]) -> str:
    lines = []
    if "foreground_auc" in result:
        m = result["foreground_mean"]
        lines.append(
            f"foreground weights: ROC-AUC {result['foreground_auc']:.3f} for person vs background patches "
            f"(mean m {m['person_patches']:.3f} on person, {m['background_patches']:.3f} on background)"
        )
    if "prototype_overlap" in result:
        lines.append(
            f"prototype overlap: mean cosine between two prototypes' attention maps {result['prototype_overlap']:.3f} "
            "(1 = all read the same patches, 0 = disjoint)"
        )
    parts = result["parts"]
    header = "| prototype | " + " | ".join(parts) + " |"
    lines += ["", header, "|" + " --- |" * (len(parts) + 1)]
    for p, row in enumerate(result.get("prototype_part_share", [])):
        lines.append(f"| P{p + 1} | " + " | ".join(f"{100 * x:.1f}" for x in row) + " |")
    lines.append("| area (uniform) | " + " | ".join(f"{100 * x:.1f}" for x in result["part_area_share"]) + " |")
    return "\n".join(lines)
