"""Photos unlike the training world (lgur.search.domain): fitted, stored beside the checkpoint, said."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lgur.search.domain import VAL_FLAGGED, PhotoDomain, domain_path, fit_domain
from tests.conftest import REPO

SAMPLES = Path(__import__("matplotlib").get_data_path()) / "sample_data"


def test_the_threshold_flags_the_val_share_and_the_domain_is_kept_per_checkpoint(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    fit, val = rng.normal(size=(2000, 8)), rng.normal(size=(1000, 8))
    domain = fit_domain(fit, val, "sha-a")
    assert abs((domain.distance(val) > domain.threshold).mean() - VAL_FLAGGED) < 0.002
    far = rng.normal(size=(50, 8)) + 6.0
    assert (domain.distance(far) > domain.threshold).all()
    path = domain_path(tmp_path / "model.safetensors")
    domain.save(path)
    again = PhotoDomain.load(path, "sha-a")
    assert again is not None and np.allclose(again.distance(val), domain.distance(val), rtol=1e-4)
    assert PhotoDomain.load(path, "sha-b") is None  # fitted for other weights: not used


@pytest.mark.skipif(not (SAMPLES / "grace_hopper.jpg").is_file(), reason="matplotlib's sample photos are not installed")
def test_the_shipped_domain_flags_real_photos_and_not_the_gallery() -> None:
    from lgur.data.dataset import normalize
    from lgur.files import read_image
    from lgur.model.checkpoint import checkpoint_fingerprint, load_checkpoint
    from lgur.search.domain import pooled_tokens

    checkpoint = REPO / "assets" / "lgur_cpu.safetensors"
    model, card = load_checkpoint(checkpoint)
    domain = PhotoDomain.load(domain_path(checkpoint), checkpoint_fingerprint(card))
    assert domain is not None
    size = model.config.image.img_size

    def distances(paths: list[Path]) -> np.ndarray:
        images = normalize(torch.from_numpy(np.stack([read_image(p, size) for p in paths])))
        return domain.distance(pooled_tokens(model.eval(), images))

    real = [SAMPLES / n for n in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")]
    assert (distances(real) > domain.threshold).all()
    gallery = sorted((REPO / "gallery" / "images").glob("*.jpg"))[:64]
    assert (distances(gallery) > domain.threshold).mean() <= 0.05


def test_the_page_and_the_api_say_when_a_photo_is_unlike_the_training_world(explorer, tmp_path: Path) -> None:
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.new("RGB", (300, 200), (120, 60, 30)).save(photo)
    rng = np.random.default_rng(0)
    dim = 2 * explorer.engine.model.config.dim
    domain = fit_domain(rng.normal(size=(400, dim)), rng.normal(size=(200, dim)), "x")
    explorer.engine.domain = domain
    try:
        domain.threshold = float("inf")  # nothing is unlike
        _, status, *_ = explorer.photos.search(None, str(photo))
        assert "looks unlike" not in status
        domain.threshold = -1.0  # everything is
        _, status, *_ = explorer.photos.search(None, str(photo))
        assert status.startswith("⚠️ This photo looks unlike the synthetic people")
        _, status, *_ = explorer.photos.search(explorer.engine.files()[0], None)
        assert "looks unlike" not in status  # a gallery image is the world itself
    finally:
        explorer.engine.domain = None
