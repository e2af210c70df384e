"""`python -m lgur space DIR`: exactly what a Space needs, CPU torch, and it serves /search."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lgur.app.space import CPU_INDEX, cpu_requirements, write_space
from tests.conftest import REPO, free_port, served_app


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_space(tmp_path_factory.mktemp("spaces") / "lgur-explorer").folder


def test_the_folder_holds_what_the_space_runs_and_nothing_else(space: Path) -> None:
    top = sorted(p.name for p in space.iterdir())
    expected = [
        "README.md",
        "SECURITY.md",
        "app.py",
        "assets",
        "docs",
        "gallery",
        "lgur",
        "requirements.txt",
        "style.css",
    ]
    assert top == expected
    files = [p.relative_to(space) for p in space.rglob("*") if p.is_file()]
    assert not [f for f in files if "__pycache__" in f.parts or f.suffix == ".pyc" or f.name.startswith(".")]
    package = {f.relative_to(REPO) for f in (REPO / "lgur").rglob("*.py") if "__pycache__" not in f.parts}
    assert package == {f for f in files if f.parts[0] == "lgur"}
    images = {f.name for f in (REPO / "gallery" / "images").iterdir()}
    assert images == {f.name for f in files if f.parts[:2] == ("gallery", "images")}
    checkpoint = Path("assets") / "lgur_cpu.safetensors"
    assert (space / checkpoint).read_bytes() == (REPO / checkpoint).read_bytes()
    assert (space / "README.md").read_text().startswith("---\ntitle: LGUR Explorer")  # the Space's configuration
    assert max((space / f).stat().st_size for f in files) < 10 * 2**20  # nothing needs large-file storage


def test_requirements_take_cpu_torch_and_keep_every_other_pin(space: Path) -> None:
    lines = (space / "requirements.txt").read_text().splitlines()
    assert lines[0] == f"--extra-index-url {CPU_INDEX}"
    pins = [line for line in (REPO / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")]
    for pin in pins:
        name, version = pin.split("==")
        expected = f"{pin}+cpu" if name in ("torch", "torchvision") else pin
        assert expected in lines, expected
    assert not [line for line in lines if "nvidia" in line or "cuda" in line]
    assert cpu_requirements("torch==2.14.1\nnumpy==2.4.6\n").splitlines()[1:] == ["torch==2.14.1+cpu", "numpy==2.4.6"]


def test_an_existing_folder_is_refused_untouched(space: Path, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_space(taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".taken-")]  # no staging left behind


@pytest.mark.slow
def test_the_space_starts_with_spaces_variables_and_answers_search(space: Path) -> None:
    from gradio_client import Client

    for image in sorted((space / "gallery" / "images").iterdir())[24:]:  # a small gallery: a quick first start
        image.unlink()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LGUR_", "GRADIO_SERVER"))}
    env |= {"GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port), "PYTHONPATH": ""}
    with served_app(port=port, env=env, app=space / "app.py") as (url, _):
        client = Client(url, download_files=False, verbose=False)
        body = client.predict("a woman in a crimson coat", 5, api_name="/search")
    assert len(body["results"]) == 5 and body["colours_read_as"] == {"crimson": "red"}
    assert all((space / "gallery" / r["file"]).is_file() for r in body["results"])
