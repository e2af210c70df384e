"""Export: a training run's best checkpoint -> the inference checkpoint users get, with its card
holding what was measured on *that* file (test metrics, explanation quality, short queries)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..model.checkpoint import load_checkpoint, save_checkpoint


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    dtype: str = "float32",
    data: str | Path | None = None,
    gallery: str | Path | None = None,
    cache: str | Path | None = "cache",
    command: str | dict[str, Any] | None = None,
    report: Callable[[str], None] = print,
    framed: str | Path | None = None,
) -> Path:
    """Write the inference checkpoint; with `data`, evaluate it on the test splits (and, on the
    synthetic world, measure its explanations); with `framed` (a detector-framed world of the same
    seed), also its retrieval there and the explanation measures beside templates (lgur.eval.faithfulness),
    each prototype scored on the part it reads on val; with `gallery`, run query-bench on it. Each
    measurement is reported as a line and stored in the card, which is written once at the end."""
    from ..data.dataset import caption_vocabulary
    from ..data.readers import read_dataset
    from ..eval.evaluate import record_in_card, score_test_splits
    from ..eval.faithfulness import part_points
    from ..eval.quality import explanation_quality, format_quality
    from ..eval.querybench import format_query_bench, run_query_bench
    from ..search.atoms import text_atom_average
    from .sampling import split_records

    model, card = load_checkpoint(checkpoint)
    kept = ("training", "data", "vocabulary", "atom_average", "details")
    keep: dict[str, Any] = {k: v for k, v in card.items() if k in kept}
    run = Path(checkpoint).parent / "result.json"
    if run.is_file() and not isinstance(command, dict):
        result = json.loads(run.read_text())
        keep.setdefault("training", {}).update(
            {k: result[k] for k in ("train_seconds", "total_seconds", "best_epoch") if k in result}
        )
    if isinstance(command, dict):  # the lineage's provenance: its command and every stage's, nothing else
        keep["training"] = command
    elif command:
        keep.setdefault("training", {})["command"] = command
    world = Path(data or "") / "world.json"
    if data and world.is_file():  # the synthetic world's recipe: seed, sizes, vocabulary
        keep.setdefault("data", {})["world"] = json.loads(world.read_text())
    if card.get("metrics"):
        keep["metrics_before_export"] = card["metrics"]
    path = save_checkpoint(model, out, keep, dtype=dtype)
    if not data and not gallery:
        return path
    exported, card = load_checkpoint(path)  # measure what users get, not the training weights
    if data:
        records, _ = read_dataset(data)
        if "vocabulary" not in card:  # older runs: the words of the training captions
            card["vocabulary"] = caption_vocabulary([c for r in records if r.split == "train" for c in r.captions])
        splits = split_records(records, seed=0)
        average = text_atom_average(exported, [c for r in splits.get("val", []) for c in r.captions])
        if average:  # of the exported weights: what the app's relative atom weights divide by
            card["atom_average"] = average
        card |= score_test_splits(exported, data, splits, cache, path.parent / "cmc.png", card["vocabulary"])
        for name, m in card["metrics"].items():
            report(f"{name}: R@1 {m['R@1']} R@5 {m['R@5']} R@10 {m['R@10']} mAP {m['mAP']}")
        if (Path(data) / "synthetic_attributes.json").is_file():  # part labels: measure the explanations
            # beside a fixed point per part: on the world's own camera a template scores about as well
            card["explanations"] = explanation_quality(exported, data, "test", points=part_points(data))
            report(format_quality(card["explanations"]))
    if data and framed:
        from ..eval.evaluate import split_metrics
        from ..eval.faithfulness import faithfulness, format_faithfulness, pointing

        framed_splits = split_records(read_dataset(framed)[0], seed=0)
        card["metrics"]["test-framed"] = split_metrics(exported, framed_splits["test"], "test", framed, cache)[0]
        m = card["metrics"]["test-framed"]
        report(f"test-framed: R@1 {m['R@1']} R@5 {m['R@5']} R@10 {m['R@10']} mAP {m['mAP']}")
        assignment = pointing(exported, framed, "val", part_points(data))["regions"]["assignment"]  # read on val
        card["faithfulness"] = faithfulness(exported, data, framed, "test", assignment=assignment)
        report(format_faithfulness(card["faithfulness"]))
    if gallery:  # short typed queries against the gallery the app ships
        card["query_bench"] = {}
        for style in ("default", "check"):
            bench = run_query_bench(path, gallery, style)
            report(format_query_bench(bench, show=0))
            kept = (
                "queries",
                "precision@10",
                "top1",
                "chance",
                "by_kind",
                "details",
                "read_as_the_app_does",
            )  # by_kind: the page's weak-spot notes
            card["query_bench"][style] = {k: bench[k] for k in kept}
    record_in_card(path, card)
    return path
