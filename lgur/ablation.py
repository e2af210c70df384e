"""The ablation: does each LGUR module earn its keep? Four models, one training budget.

- global baseline: the same encoders, mean-pooled features, the same losses (no DGA, no PGU)
- + DGA: dictionary reconstruction, foreground weights, cross-modality guidance; mean pooling
- + PGU: shared prototypes; no dictionary
- full LGUR
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .files import atomic_write_bytes
from .train import recipe, train

VARIANTS = {
    "global baseline": {"use_dga": False, "use_pgu": False},
    "+ DGA": {"use_dga": True, "use_pgu": False},
    "+ PGU": {"use_dga": False, "use_pgu": True},
    "full LGUR": {"use_dga": True, "use_pgu": True},
}
KEYS = ("R@1", "R@5", "R@10", "mAP")


def run_ablation(
    data: str, out: str, epochs: int = 3, cache: str | None = None, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """Train the four variants with identical data, seed, epochs and schedule; resumable per run."""
    out_dir = Path(out)
    results = {}
    # The decisive pair first, so a cut-short session still has the comparison that matters.
    for name in ("full LGUR", "global baseline", "+ PGU", "+ DGA"):
        switches = VARIANTS[name]
        run = out_dir / name.replace("+ ", "plus-").replace(" ", "-")
        done = run / "result.json"
        if done.is_file():
            results[name] = json.loads(done.read_text())
            continue
        no_prototypes = {} if switches["use_pgu"] else {"prototype_diversity": 0.0}  # nothing to diversify
        cfg = recipe(
            "cpu", data=data, out=str(run), epochs=epochs, seed=seed, cache_dir=cache,
            decay_epochs=(epochs - 1,), decay_reference=epochs, **switches, **no_prototypes,
        )  # fmt: skip
        results[name] = train(cfg, progress=progress)
        atomic_write_bytes(out_dir / "ablation.md", ablation_table(results).encode())
    results = {name: results[name] for name in VARIANTS}
    table = ablation_table(results)
    atomic_write_bytes(out_dir / "ablation.json", json.dumps(results, indent=2).encode())
    atomic_write_bytes(out_dir / "ablation.md", table.encode())
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
