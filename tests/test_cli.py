"""The command line entry point."""

from __future__ import annotations

import json
import subprocess
import sys

from lgur.model.serving import parameter_counts


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
    from lgur.model.config import preset
    from lgur.model.lgur import LGUR

    counts = parameter_counts(LGUR(preset("cpu")))
    assert (row["params_trainable"], row["params_frozen"]) == (counts["trainable"], counts["frozen"])
    assert 0 < row["ms_per_image"] < 10_000 and 0 < row["ms_per_caption"] < 10_000  # measured, in milliseconds


def test_search_refuses_a_bad_result_count_before_loading_anything() -> None:
    for k in ("0", "51", "-3"):
        command = [sys.executable, "-m", "lgur", "search", "a man", "-k", k, "--checkpoint", "missing.safetensors"]
        out = subprocess.run(command, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
        assert out.returncode == 2 and "number of results must be from 1 to 50" in out.stderr, out.stderr
