"""The synthetic pedestrian world: identities -> images with part labels -> captions -> splits.

Every identity and every image draws from its own seeded stream
(seed, split, identity, image), so the output is byte-identical for a seed, any
split can be generated alone (the shipped gallery is the default world's test
split), and worker processes can run in any order.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_write_bytes
from .attributes import CAPTIONED_KINDS, Attributes, sample_attributes
from .captions import CaptionWriter, words
from .render import detector_framing, encode_jpeg, encode_png, render, sample_camera

SPLITS = ("train", "val", "test")
PARAPHRASE = "test-paraphrase"


@dataclass
class WorldSpec:
    seed: int = 0
    train_identities: int = 4000
    val_identities: int = 200
    test_identities: int = 800
    min_images: int = 2  # images per identity, uniform in [min, max]
    max_images: int = 3
    captions_per_image: int = 2
    # "world": the world's own camera (the person 0.80-0.94 of the height, feet near the bottom);
    # "detector": the same images framed as a person detector frames its crops (render.detector_framing)
    framing: str = "world"

    def identities(self, split: str) -> int:
        return {"train": self.train_identities, "val": self.val_identities, "test": self.test_identities}[split]

    def first_id(self, split: str) -> int:
        """Identity numbers are unique across splits: train first, then val, then test."""
        return {"train": 0, "val": self.train_identities, "test": self.train_identities + self.val_identities}[split]


def _stream(spec: WorldSpec, split: str, identity: int, *more: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([spec.seed, SPLITS.index(split), identity, *more]))


def identity_attributes(spec: WorldSpec, split: str, index: int) -> Attributes:
    return sample_attributes(_stream(spec, split, index))


def _generate_identity(args: tuple[WorldSpec, str, int, str]) -> list[dict[str, Any]]:
    """Render every image of one identity and write its files; returns their annotations."""
    spec, split, index, out = args
    root = Path(out)
    pid = spec.first_id(split) + index
    attributes = identity_attributes(spec, split, index)
    count = int(_stream(spec, split, index, 0).integers(spec.min_images, spec.max_images + 1))
    views = ["front", "back", "side"]
    _stream(spec, split, index, 0).shuffle(views)  # different views of one person across cameras
    entries = []
    for k in range(count):
        rng = _stream(spec, split, index, 1 + k)
        camera = sample_camera(rng, views[k % 3] if rng.random() < 0.8 else None)
        if spec.framing == "detector":  # the same camera, framed from its own stream
            camera = detector_framing(camera, attributes.height, _stream(spec, split, index, 1 + k, 3))
        elif spec.framing != "world":
            raise ValueError(f"framing is 'world' or 'detector', not {spec.framing!r}")
        rendering = render(attributes, camera)
        name = f"{pid:05d}_{k}"
        image_rel, parts_rel = f"{split}/{name}.jpg", f"parts/{split}/{name}.png"
        (root / "imgs" / split).mkdir(parents=True, exist_ok=True)
        (root / "parts" / split).mkdir(parents=True, exist_ok=True)
        (root / "imgs" / image_rel).write_bytes(encode_jpeg(rendering.image, camera.jpeg_quality))
        (root / parts_rel).write_bytes(encode_png(rendering.labels))
        writer = CaptionWriter(_stream(spec, split, index, 1 + k, 1))
        captions = [writer.write(attributes, camera) for _ in range(spec.captions_per_image)]
        entry = {
            "id": pid,
            "file_path": image_rel,
            "split": split,
            "captions": [c.text for c in captions],
            "mentions": [c.mentions for c in captions],
            "attributes": attributes.to_dict(),
            "camera": camera.to_dict(),
            "parts": parts_rel,
        }
        if split == "test":
            held_out = CaptionWriter(_stream(spec, split, index, 1 + k, 2), held_out=True)
            paraphrases = [held_out.write(attributes, camera) for _ in range(spec.captions_per_image)]
            entry["paraphrase_captions"] = [c.text for c in paraphrases]
            entry["paraphrase_mentions"] = [c.mentions for c in paraphrases]
        entries.append(entry)
    return entries


def generate_split(
    spec: WorldSpec, split: str, out: str | Path, workers: int | None = None, progress: bool = True
) -> list[dict[str, Any]]:
    jobs = [(spec, split, i, str(out)) for i in range(spec.identities(split))]
    workers = workers or min(len(os.sched_getaffinity(0)), 8)
    entries: list[dict[str, Any]] = []
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc=f"{split:5s}", unit="id", disable=not progress)
    if workers <= 1:
        for job in jobs:
            entries += _generate_identity(job)
            bar.update()
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            for result in pool.imap(_generate_identity, jobs, chunksize=16):  # ordered: deterministic output
                entries += result
                bar.update()
    bar.close()
    return entries


def generate_world(
    spec: WorldSpec,
    out: str | Path,
    workers: int | None = None,
    progress: bool = True,
    splits: tuple[str, ...] = SPLITS,
) -> dict[str, Any]:
    """Write a world to `out` in the CUHK-PEDES layout plus the side file of attributes: every split,
    or those named (e.g. val and test with detector framing, beside a world of the same seed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = set(splits) - set(SPLITS)
    if unknown or not splits:
        raise ValueError(f"splits are some of {SPLITS}, not {sorted(unknown) or 'none'}")
    entries = []
    for split in SPLITS:
        if split in splits:
            entries += generate_split(spec, split, out, workers, progress)
    annotations = [
        {"id": e["id"], "file_path": e["file_path"], "captions": e["captions"], "split": e["split"]} for e in entries
    ]
    annotations += [
        {"id": e["id"], "file_path": e["file_path"], "captions": e["paraphrase_captions"], "split": PARAPHRASE}
        for e in entries
        if e["split"] == "test"
    ]
    side = {
        e["file_path"]: {
            "attributes": e["attributes"],
            "camera": e["camera"],
            "view": e["camera"]["view"],
            "parts": e["parts"],
            "mentions": e["mentions"],
            **({"paraphrase_mentions": e["paraphrase_mentions"]} if "paraphrase_mentions" in e else {}),
        }
        for e in entries
    }
    summary = world_summary(spec, annotations)
    atomic_write_bytes(out / "reid_raw.json", json.dumps(annotations, indent=1).encode())
    atomic_write_bytes(out / "synthetic_attributes.json", json.dumps(side).encode())
    atomic_write_bytes(out / "world.json", json.dumps(summary, indent=2).encode())
    return summary


def world_summary(spec: WorldSpec, annotations: list[dict[str, Any]]) -> dict[str, Any]:
    by_split: dict[str, dict[str, Any]] = {}
    for split in (*SPLITS, PARAPHRASE):
        rows = [a for a in annotations if a["split"] == split]
        captions = [c for a in rows for c in a["captions"]]
        by_split[split] = {
            "identities": len({a["id"] for a in rows}),
            "images": len(rows),
            "captions": len(captions),
            "mean_words": float(np.mean([len(words(c)) for c in captions])) if captions else 0.0,
        }
    vocab = Counter(w for a in annotations if a["split"] == "train" for c in a["captions"] for w in words(c))
    all_vocab = {w for a in annotations for c in a["captions"] for w in words(c)}
    return {
        "spec": asdict(spec),
        "splits": by_split,
        "train_vocabulary": len(vocab),
        "vocabulary": len(all_vocab),
    }


# -- the shipped gallery ----------------------------------------------------------------------


def write_gallery(out: str | Path, spec: WorldSpec | None = None, workers: int | None = None) -> dict[str, Any]:
    """The default world's test split as a browsable gallery: images/ + manifest.json."""
    spec = spec or WorldSpec()
    out = Path(out)
    tmp = out / ".generate"
    entries = generate_split(spec, "test", tmp, workers)
    (out / "images").mkdir(parents=True, exist_ok=True)
    manifest = []
    for e in entries:
        name = Path(e["file_path"]).name
        os.replace(tmp / "imgs" / e["file_path"], out / "images" / name)
        manifest.append(
            {
                "file": f"images/{name}",
                "identity": e["id"],
                "captions": e["captions"],
                "view": e["camera"]["view"],
                "attributes": e["attributes"],
            }
        )
    import shutil

    shutil.rmtree(tmp)
    body = {"source": {"generator": "lgur.synth", "spec": asdict(spec), "split": "test"}, "images": manifest}
    atomic_write_bytes(out / "manifest.json", json.dumps(body, indent=1).encode())
    return {"images": len(manifest), "identities": len({m["identity"] for m in manifest})}


# -- ambiguity: the ceiling any caption reader can reach -----------------------------------------


def _expected_recall(hits: int, pool: int, k: int) -> float:
    """P(at least one of `hits` true images in the top k of `pool` images ranked at random)."""
    if k >= pool:
        return 1.0
    return 1.0 - math.comb(pool - hits, k) / math.comb(pool, k)


def ambiguity_report(data: str | Path, split: str = "test") -> dict[str, Any]:
    """For each caption: how many identities agree with every attribute it mentions, and the
    R@1/5/10 of a perfect attribute reader (ranks consistent identities' images first, at random)."""
    data = Path(data)
    annotations = json.loads((data / "reid_raw.json").read_text())
    side = json.loads((data / "synthetic_attributes.json").read_text())
    key = "paraphrase_mentions" if split == PARAPHRASE else "mentions"
    base_split = "test" if split == PARAPHRASE else split
    rows = [a for a in annotations if a["split"] == base_split]
    attrs = {a["id"]: side[a["file_path"]]["attributes"] for a in rows}
    images_of = Counter(a["id"] for a in rows)
    ids = sorted(attrs)
    table = {kind: np.array([attrs[i][kind] for i in ids], dtype=object) for kind in CAPTIONED_KINDS}
    counts_img = np.array([images_of[i] for i in ids])
    consistent, recall = [], {1: [], 5: [], 10: []}
    for a in rows:
        for mentions in side[a["file_path"]][key]:
            ok = np.ones(len(ids), dtype=bool)
            for kind, value in mentions:
                ok &= table[kind] == value
            consistent.append(int(ok.sum()))
            pool = int(counts_img[ok].sum())
            for k in recall:
                recall[k].append(_expected_recall(images_of[a["id"]], pool, k))
    c = np.array(consistent)
    return {
        "split": split,
        "captions": len(c),
        "identities": len(ids),
        "consistent_identities_mean": float(c.mean()),
        "consistent_identities_median": float(np.median(c)),
        "unique_share": float((c == 1).mean()),
        "perfect_reader": {f"R@{k}": 100.0 * float(np.mean(v)) for k, v in recall.items()},
    }


def format_ambiguity(reports: list[dict[str, Any]]) -> str:
    lines = []
    for r in reports:
        ceiling = r["perfect_reader"]
        lines.append(
            f"{r['split']}: {r['captions']} captions over {r['identities']} identities; consistent identities "
            f"per caption mean {r['consistent_identities_mean']:.2f}, "
            f"median {r['consistent_identities_median']:.0f}, "
            f"unique {100 * r['unique_share']:.1f}%; perfect attribute reader R@1 {ceiling['R@1']:.1f} "
            f"R@5 {ceiling['R@5']:.1f} R@10 {ceiling['R@10']:.1f}"
        )
    return "\n".join(lines)
