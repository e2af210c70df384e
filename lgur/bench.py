"""Benchmarks: scripts that measure and print figures (and JSON), never timed tests."""

from __future__ import annotations

import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import preset
from .model import LGUR

SAMPLE_CAPTION = (
    "A young woman with long black hair wears a red coat over a white shirt, blue jeans and white sneakers. "
    "She carries a black backpack on her shoulders."
)


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return {"p50_ms": pick(0.5) * 1e3, "p95_ms": pick(0.95) * 1e3, "n": len(ordered)}


@torch.inference_mode()
def bench_model(preset_name: str, batch: int = 8, repeats: int = 5) -> dict[str, Any]:
    """Parameter counts and median forward time per image and per caption (retrieval path)."""
    config = preset(preset_name)
    config.image.pretrained = False  # a benchmark needs no download
    config.text.allow_random_init = True  # the paper's BERT-base is not shipped; its shape is what counts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LGUR(config).eval()
    h, w = config.image.img_size
    images = torch.randn(batch, 3, h, w)
    ids, mask = model.tokenize([SAMPLE_CAPTION] * batch)
    image_s = median_seconds(lambda: model.embed_images(images), repeats)
    text_s = median_seconds(lambda: model.embed_texts(ids, mask), repeats)
    counts = model.parameter_counts()
    return {
        "preset": preset_name,
        "text_encoder": f"{config.text.name} ({model.text_encoder.source})",
        "image_size": [h, w],
        "patch_grid": list(model.image_encoder.grid),
        "atoms": config.num_atoms,
        "prototypes": config.num_prototypes,
        "embedding_dim": config.embedding_dim,
        "params_trainable": counts["trainable"],
        "params_frozen": counts["frozen"],
        "batch": batch,
        "ms_per_image": image_s / batch * 1e3,
        "ms_per_caption": text_s / batch * 1e3,
        "caption_tokens": int(mask.sum(1)[0]),
    }


def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }


def write_json(result: dict[str, Any], out: str | Path | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
