"""The command line entry point."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_model_json_reports_counts_and_times() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lgur",
            "bench",
            "model",
            "--presets",
            "cpu",
            "--json",
            "--repeats",
            "1",
            "--batch",
            "2",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": ""},
    )
    result = json.loads(out.stdout)
    (row,) = result["presets"]
    assert row["preset"] == "cpu" and row["patch_grid"] == [16, 6]
    assert row["params_trainable"] > 0 and row["params_frozen"] > 0
    assert row["ms_per_image"] > 0 and row["ms_per_caption"] > 0
