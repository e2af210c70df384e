"""Shared fixtures: tiny models on the real code paths, so tests stay fast on 2 CPU cores."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub

import pytest  # noqa: E402
import torch  # noqa: E402

from lgur.model.config import LGURConfig, cpu_preset  # noqa: E402
from lgur.model.lgur import LGUR  # noqa: E402

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


REPO = Path(__file__).resolve().parents[1]


def tiny_explorer(
    root: Path, images: int = 24, seed: int = 3, shared_uploads: bool = False, card: dict | None = None, **config
):
    """A tiny model (tiny_config(**config), its card `card`) over its own copy of the first shipped gallery
    images (tests may add files), with the manifest's captions of those images (the atlas's words)."""
    import json
    import shutil

    from lgur.app.explorer import create
    from lgur.model.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    checkpoint = save_checkpoint(LGUR(tiny_config(**config)).eval(), root / "models" / "tiny.safetensors", card)
    gallery = root / "gallery"
    (gallery / "images").mkdir(parents=True)
    for src in sorted((REPO / "gallery" / "images").glob("*.jpg"))[:images]:
        shutil.copy(src, gallery / "images" / src.name)
    manifest = json.loads((REPO / "gallery" / "manifest.json").read_text())
    manifest["images"] = [m for m in manifest["images"] if (gallery / m["file"]).is_file()]
    (gallery / "manifest.json").write_text(json.dumps(manifest))
    return create(checkpoint, gallery, progress=False, shared_uploads=shared_uploads)


@contextlib.contextmanager
def served_app(*args: str, port: int, env: dict | None = None, app: Path | None = None, timeout: float = 180):
    """`python app.py ARGS` (the repository's app, or `app` in its own folder) until a Gradio client
    connects on 127.0.0.1:port; yields (url, process), and stops it after."""
    import subprocess
    import sys
    import time

    from gradio_client import Client

    app = app or REPO / "app.py"
    proc = subprocess.Popen(
        [sys.executable, str(app), *args], cwd=app.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                Client(url, verbose=False, download_files=False)
                break
            except Exception:
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def serve(checkpoint: Path, gallery: Path, *extra: str, **env: str):
    """`python app.py` serving `checkpoint` over `gallery` on a free loopback port, with these LGUR_*
    settings; yields (url, process)."""
    port = free_port()
    args = ("--port", str(port), "--checkpoint", str(checkpoint), "--gallery", str(gallery), *extra)
    with served_app(*args, port=port, env={**os.environ, **env}) as (url, proc):
        yield url, proc


def served_explorer(explorer, *extra: str, **env: str):
    """`serve` on an explorer's own tiny model and gallery (tiny_explorer's)."""
    checkpoint = next(explorer.engine.gallery.parent.glob("models/*.safetensors"))
    return serve(checkpoint, explorer.engine.gallery, *extra, **env)


@pytest.fixture(scope="module")
def explorer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A tiny explorer per test module, built with the module's EXPLORER settings (tiny_explorer's arguments)."""
    settings = getattr(request.module, "EXPLORER", {})
    return tiny_explorer(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]), **settings)


@pytest.fixture(scope="session")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic world of 16 training, 4 val and 4 test identities (seed 2), for tests that train; read only."""
    from lgur.synth.world import WorldSpec, generate_world

    world = tmp_path_factory.mktemp("small") / "world"
    generate_world(WorldSpec(seed=2, train_identities=16, val_identities=4, test_identities=4), world, 1, False)
    return world


def tiny_engine(root: Path, card: dict, images: int = 4):
    """A search engine: a tiny model whose card is `card`, over a copy of the first shipped images."""
    import shutil

    from lgur.model.checkpoint import save_checkpoint
    from lgur.search.engine import SearchEngine

    torch.manual_seed(1)
    checkpoint = save_checkpoint(LGUR(tiny_config()).eval(), root / "tiny.safetensors", card)
    gallery = root / "gallery"
    gallery.mkdir()
    for src in sorted((REPO / "gallery" / "images").glob("*.jpg"))[:images]:
        shutil.copy(src, gallery / src.name)
    return SearchEngine.open(checkpoint, gallery)[0]
