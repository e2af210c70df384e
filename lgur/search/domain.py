"""Is a photo like the images the model was trained on?

The image encoder's tokens of a photo, pooled (their mean and spread over the patches), against a
Gaussian fitted to the training split's: the Mahalanobis distance (Lee et al., NeurIPS 2018). The
threshold is set on the val split, so that `VAL_FLAGGED` of its images lie beyond it; a photograph,
a drawing or a picture of no person lies far beyond. Fitted once per checkpoint by
`python -m lgur photo-domain`, stored beside it as `<checkpoint>.domain.safetensors`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from ..model.lgur import LGUR

VAL_FLAGGED = 0.02  # the share of val images called unlike the training world
UNLIKE_NOTE = "this photo looks unlike the synthetic people the model was trained on: results will not mean much"


def domain_path(checkpoint: str | Path) -> Path:
    """Where a checkpoint's photo domain is stored: beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".domain.safetensors")


def pool(tokens: torch.Tensor) -> np.ndarray:
    """(B, N, dim) image encoder tokens -> (B, 2 * dim): their mean and spread over the patches."""
    return torch.cat([tokens.mean(1), tokens.std(1)], 1).double().numpy()


@torch.no_grad()
def pooled_tokens(model: LGUR, images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) normalised images -> pool of their encoder tokens."""
    return pool(model.image_encoder(images))


@dataclass
class PhotoDomain:
    mean: np.ndarray  # (F,)
    precision: np.ndarray  # (F, F) the inverse of the (shrunk) covariance
    threshold: float  # distances beyond it are unlike the training world
    checkpoint: str  # the weights it was fitted for (their sha256)

    def distance(self, features: np.ndarray) -> np.ndarray:
        """(B, F) pooled tokens -> (B,) Mahalanobis distances."""
        centred = features - self.mean
        return np.sqrt(np.einsum("bi,ij,bj->b", centred, self.precision, centred).clip(min=0))

    def unlike(self, tokens: torch.Tensor) -> np.ndarray:
        """(B, N, dim) encoder tokens of photos -> (B,) True where a photo is unlike the training world."""
        return self.distance(pool(tokens)) > self.threshold

    def save(self, path: Path) -> None:
        meta = {"threshold": json.dumps(self.threshold), "checkpoint": self.checkpoint}
        tmp = path.with_name(path.name + ".tmp")
        arrays = {"mean": self.mean.astype(np.float32), "precision": self.precision.astype(np.float32)}
        save_file(arrays, str(tmp), metadata=meta)
        tmp.chmod(0o644)
        tmp.replace(path)  # never a half-written file

    @classmethod
    def load(cls, path: Path, checkpoint: str) -> PhotoDomain | None:
        """The domain stored at `path` if it was fitted for these weights (else None)."""
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), "numpy") as f:
            meta = f.metadata() or {}
        if meta.get("checkpoint") != checkpoint:
            return None
        arrays = {k: v.astype(np.float64) for k, v in load_file(str(path)).items()}
        return cls(arrays["mean"], arrays["precision"], float(json.loads(meta["threshold"])), checkpoint)


def fit_domain(fit: np.ndarray, val: np.ndarray, checkpoint: str, shrink: float = 0.05) -> PhotoDomain:
    """fit: (n, F) pooled tokens of training images; val: (m, F) of val images (the threshold's).
    shrink: the covariance is pulled this far towards its diagonal (Ledoit-Wolf style), so that it
    inverts stably with a few thousand images."""
    mean = fit.mean(0)
    covariance = np.cov(fit, rowvar=False)
    covariance = (1 - shrink) * covariance + shrink * np.diag(np.diag(covariance))
    precision = np.linalg.inv(covariance + 1e-6 * np.eye(len(mean)))
    domain = PhotoDomain(mean, precision, 0.0, checkpoint)
    domain.threshold = float(np.quantile(domain.distance(val), 1 - VAL_FLAGGED))
    return domain
