"""Shared fixtures: tiny models on the real code paths, so tests stay fast on 2 CPU cores."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub

import pytest  # noqa: E402
import torch  # noqa: E402

from lgur.config import LGURConfig, cpu_preset  # noqa: E402
from lgur.model import LGUR  # noqa: E402

CAPTIONS = [
    "A woman in a red coat with a black backpack and white shoes.",
    "man, grey shirt",
    "The person wears blue jeans, a yellow t-shirt and carries a brown handbag in the left hand.",
]


def tiny_config(**overrides) -> LGURConfig:
    """The CPU preset shrunk: same modules and text encoder, fewer and narrower layers."""
    config = cpu_preset()
    config.image.img_size = (64, 32)
    config.image.patch_size = 8  # 8x4 grid
    config.image.embed_dim, config.image.depth, config.image.num_heads = 64, 2, 2
    config.dim = 64
    config.num_atoms = 32
    config.reconstruction_heads, config.reconstruction_head_dim, config.reconstruction_ffn_dim = 2, 32, 128
    config.pgu_heads, config.pgu_head_dim, config.pgu_ffn_dim = 2, 32, 128
    config.part_dim = 32
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@pytest.fixture(scope="session")
def tiny_model() -> LGUR:
    torch.manual_seed(0)
    return LGUR(tiny_config(), num_identities=5).eval()


def random_images(model: LGUR, n: int, seed: int = 0) -> torch.Tensor:
    h, w = model.config.image.img_size
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def free_port() -> int:
    """A TCP port nobody listens on now (for servers the tests start)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
