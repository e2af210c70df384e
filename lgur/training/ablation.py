"""The ablation and the recipe's experiments: one training budget, one seed, one world.

The ablation asks whether each LGUR module earns its keep:
- global baseline: the same encoders, mean-pooled features, the same losses (no DGA, no PGU)
- + DGA: dictionary reconstruction, foreground weights, cross-modality guidance; mean pooling
- + PGU: shared prototypes; no dictionary
- full LGUR

The experiments take the CPU recipe (full LGUR) and change one option beyond the paper at a
time. Both share the run folder, so the recipe's row is trained once for both tables.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..files import atomic_write_bytes
from .config import recipe
from .train import train

VARIANTS = {
    "global baseline": {"use_dga": False, "use_pgu": False},
    "+ DGA": {"use_dga": True, "use_pgu": False},
    "+ PGU": {"use_dga": False, "use_pgu": True},
    "full LGUR": {"use_dga": True, "use_pgu": True},
}
KEYS = ("R@1", "R@5", "R@10", "mAP")
# One change each against the CPU recipe ("beyond the paper": options the paper does not have).
OPTIONS = {
    "CPU recipe": {},
    "without SDM": {"sdm": 0.0},
    "without identity sampling (one caption per image)": {"samples": "images"},
    "without prototype diversity": {"prototype_diversity": 0.0},
    "without caption crops": {"caption_crops": 0.0},
    "with foreground-weighted prototypes": {"model_overrides": {"pgu_foreground": True}},
    "with one identity classifier on the whole embedding": {"model_overrides": {"identity_classifier": "whole"}},
}
# The ImageNet-pretrained trunk (preset cpu-lite0): one change each against it, and the same trunk
# from random initialisation, so a gain is the pretraining's and not the architecture's.
LITE0 = "pretrained EfficientNet-Lite0, 192x64, stride 16 (12x4 grid)"
# The table's reference: cpu-lite0 as it was before term prediction joined its recipe.
TRUNK_REFERENCE = {"preset": "cpu-lite0", "term_prediction": 0.0}
TERMS = "the captions' terms predicted from both embeddings"  # the cpu-lite0 recipe as it is now
TEACHER = "runs/teacher/lgur_cpu.safetensors"
# The person rows' teacher: a checkpoint with a detail detector at runs/teacher/ (EXPERIMENTS.md names the
# one those rows used). Each row changes one setting of the row above it.
TAUGHT = TRUNK_REFERENCE | {"term_prediction": 1.0, "prototype_person": 2.0, "person_from": TEACHER}
TAUGHT_LATER = TAUGHT | {"person_saturation": 0.5, "person_from_epoch": 2}
TRUNK_OPTIONS = {
    LITE0: TRUNK_REFERENCE,
    "prototypes weighted by the foreground": TRUNK_REFERENCE | {"model_overrides": {"pgu_foreground": True}},
    "the same trunk from random initialisation": TRUNK_REFERENCE | {"model_overrides": {"image.weights": None}},
    "256x96 input (16x6 grid)": TRUNK_REFERENCE | {"model_overrides": {"image.img_size": [256, 96]}},
    "stride 8 (24x8 grid)": TRUNK_REFERENCE | {"model_overrides": {"image.patch_size": 8}},
    "stride 8 with the stride-16 features added (24x8 grid)": TRUNK_REFERENCE
    | {"model_overrides": {"image.patch_size": 8, "image.context_stride": 16}},
    TERMS: TRUNK_REFERENCE | {"term_prediction": 1.0},
    # one change against the terms row: a register slot the prototypes may attend to instead of background
    "prototypes with a register slot": TRUNK_REFERENCE
    | {"term_prediction": 1.0, "model_overrides": {"pgu_register": True}},
    # one change against the terms row: the prototypes kept on the person as a detail detector sees it
    "prototypes kept on the person (the detail detector as teacher)": TAUGHT,
    # one change against the row above: the teacher's map is 1 wherever it is half as sure as at its peak
    "the same, the teacher's map saturated at half its peak": TAUGHT | {"person_saturation": 0.5},
    # one change against the row above: the penalty from the third epoch, once the prototypes have parted
    "the same, the penalty from the third epoch": TAUGHT_LATER,
    # one change against the row above: twice the diversity term, so the prototypes squeezed onto the
    # person part onto different regions of it
    "the same, prototype diversity 4.0": TAUGHT_LATER | {"prototype_diversity": 4.0},
}
TABLES = {"recipe": ("experiments", OPTIONS), "trunk": ("trunk", TRUNK_OPTIONS)}
QUALITY_IMAGES = 512  # explanation figures on the first test images (the full split takes minutes)


def run_folder(out: str | Path, name: str) -> Path:
    if name in ("full LGUR", "CPU recipe"):
        return Path(out) / "full-LGUR"  # the same run
    if name in TRUNK_OPTIONS:
        return Path(out) / "trunk" / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return Path(out) / name.replace("+ ", "plus-").replace(" ", "-").replace("(", "").replace(")", "")


def train_at_budget(
    data: str, run: Path, epochs: int, cache: str | None, seed: int, progress: bool, **overrides: Any
) -> dict[str, Any]:
    """One run of a recipe (default cpu) at the shared budget (x0.1 for the last epoch); resumable."""
    done = run / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg = recipe(
        overrides.pop("preset", "cpu"),
        data=data,
        out=str(run),
        epochs=epochs,
        seed=seed,
        cache_dir=cache,
        decay_epochs=(epochs - 1,),
        decay_reference=epochs,
        **overrides,
    )
    return train(cfg, progress=progress)


def run_ablation(
    data: str,
    out: str,
    epochs: int = 3,
    cache: str | None = None,
    seed: int = 0,
    progress: bool = True,
    preset: str = "cpu",
) -> dict[str, Any]:
    """Train the four variants of one recipe with identical data, seed, epochs and schedule; resumable per run."""
    out_dir = Path(out)
    results = {}
    # The decisive pair first, so a cut-short session still has the comparison that matters.
    for name in ("full LGUR", "global baseline", "+ PGU", "+ DGA"):
        switches = VARIANTS[name]
        no_prototypes = {} if switches["use_pgu"] else {"prototype_diversity": 0.0}  # nothing to diversify
        run = run_folder(out_dir, name)
        results[name] = train_at_budget(
            data, run, epochs, cache, seed, progress, preset=preset, **switches, **no_prototypes
        )
        atomic_write_bytes(out_dir / "ablation.md", ablation_table(results).encode())
    results = {name: results[name] for name in VARIANTS}
    return save_tables(out_dir, "ablation", results, ablation_table(results))


def save_tables(out_dir: Path, stem: str, results: dict[str, Any], table: str) -> dict[str, Any]:
    """STEM.json (every figure) and STEM.md (the table) beside the runs."""
    atomic_write_bytes(out_dir / f"{stem}.json", json.dumps(results, indent=2).encode())
    atomic_write_bytes(out_dir / f"{stem}.md", table.encode())
    return {"results": results, "table": table}


def ablation_table(results: dict[str, Any]) -> str:
    lines = [
        "| model | test R@1 | R@5 | R@10 | mAP | paraphrase R@1 | R@5 | R@10 | mAP |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, result in results.items():
        m = result["metrics"]
        cells = [f"{m[s][k]:.2f}" for s in ("test", "test-paraphrase") for k in KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_experiments(
    data: str,
    out: str,
    gallery: str,
    epochs: int = 3,
    cache: str | None = None,
    seed: int = 0,
    only: list[str] | None = None,
    progress: bool = True,
    table: str = "recipe",
) -> dict[str, Any]:
    """Train a table's reference and each one-option change; score test, query-bench and explanations."""
    from ..eval.quality import explanation_quality
    from ..eval.querybench import run_query_bench
    from ..model.checkpoint import load_checkpoint

    stem, options = TABLES[table]
    unknown = set(only or []) - set(options)
    if unknown:
        raise ValueError(f"unknown experiments {sorted(unknown)}; choose from {sorted(options)}")
    out_dir = Path(out)
    rows = {}
    for name, overrides in options.items():
        run = run_folder(out_dir, name)
        if only and name not in only and not (run / "result.json").is_file():
            continue
        result = train_at_budget(data, run, epochs, cache, seed, progress, **dict(overrides))
        scored = run / "experiment.json"
        row = json.loads(scored.read_text()) if scored.is_file() else None
        if row is None or "background_share" not in row:  # not scored, or before the maps' figures
            best = run / "best.safetensors"
            model, _ = load_checkpoint(best)
            quality = explanation_quality(model, data, "test", QUALITY_IMAGES)
            if row is None:
                bench = run_query_bench(best, gallery)
                row = {
                    "overrides": overrides,
                    "epochs": epochs,
                    "train_minutes": result["train_seconds"] / 60,
                    "metrics": result["metrics"],
                    "query_bench": {k: bench[k] for k in ("precision@10", "top1", "chance")},
                }
            regions = quality.get("prototype_regions", {})
            row |= {
                "prototype_overlap": quality.get("prototype_overlap"),
                "distinct_regions": regions.get("distinct_regions"),
                "background_share": [p[0] for p in quality.get("prototype_part_share", [])],  # PARTS[0]
                "pointing_game": quality.get("pointing_game", {}).get("accuracy"),
                "shared_atoms": quality.get("shared_atoms"),
            }
            atomic_write_bytes(scored, json.dumps(row, indent=2).encode())
        rows[name] = row
        atomic_write_bytes(out_dir / f"{stem}.md", experiments_table(rows).encode())
    return save_tables(out_dir, stem, rows, experiments_table(rows))


def experiments_table(rows: dict[str, Any]) -> str:
    lines = [
        "| setting | budget | test R@1 | mAP | paraphrase R@1 | query-bench P@10 | overlap | prototypes on parts; "
        "most background | pointing game |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in rows.items():
        m = row["metrics"]
        overlap = "-" if row["prototype_overlap"] is None else f"{row['prototype_overlap']:.3f}"
        pointing = "-" if row["pointing_game"] is None else f"{row['pointing_game']:.1f}%"
        background = row.get("background_share") or []
        parts = (
            f"{row['distinct_regions']} of {len(background)}; {100 * max(background):.0f}%"
            if background and row.get("distinct_regions") is not None
            else "-"
        )
        lines.append(
            f"| {name} | {row['epochs']} epochs, {row['train_minutes']:.0f} min | {m['test']['R@1']:.2f} "
            f"| {m['test']['mAP']:.2f} | {m['test-paraphrase']['R@1']:.2f} "
            f"| {row['query_bench']['precision@10']:.1f}% | {overlap} | {parts} | {pointing} |"
        )
    return "\n".join(lines) + "\n"
