"""`python -m lgur space DIR`: exactly what a Hugging Face Space needs, in one folder.

The app, the package, the shipped checkpoint and gallery, the README (its front matter is the
Space's configuration) and a requirements file that takes CPU torch from PyTorch's CPU index,
so the Space builds once, without the CUDA libraries. Nothing else: no tests, caches, runs,
worlds or indexes. The folder is assembled beside DIR and renamed into place, so DIR is
either complete or absent.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# What the Space runs, relative to the repository: files, or folders copied with `patterns`.
SPACE_FILES = ["app.py", "README.md", "SECURITY.md", "requirements.txt"]
SPACE_FOLDERS = {"lgur": ("*.py",), "assets": ("*",), "gallery": ("manifest.json", "images/*"), "docs": ("*.md",)}
OPTIONAL_FILES = ["style.css", "LICENSE"]
LARGE_FILE = 10 * 2**20  # the Hub stores larger files only through its large-file storage (Xet/LFS)
BINARY_IN_GIT = 2**20  # binary files above about 1 MB are refused by a plain `git push` to a Space


@dataclass
class SpaceReport:
    folder: Path
    files: int
    bytes: int
    large: list[str]  # over 10 MB: need the Hub's large-file storage
    binary_over_1mb: list[str]  # fine with `hf upload`; need `git lfs track` for a plain git push


def cpu_requirements(text: str) -> str:
    """requirements.txt -> the same pins with torch and torchvision from PyTorch's CPU index."""
    lines = [f"--extra-index-url {CPU_INDEX}"]
    for line in text.splitlines():
        line = re.sub(r"^(torch|torchvision)==([\w.]+)\s*$", r"\1==\2+cpu", line.strip())
        if line:
            lines.append(line)
    return "\n".join(lines) + "\n"


def space_files(repo: Path = REPO) -> list[Path]:
    """Every file the Space gets, relative to the repository."""
    files = [Path(f) for f in SPACE_FILES] + [Path(f) for f in OPTIONAL_FILES if (repo / f).is_file()]
    for folder, patterns in SPACE_FOLDERS.items():
        for pattern in patterns:
            files += [p.relative_to(repo) for p in sorted((repo / folder).rglob(pattern)) if p.is_file()]
    missing = [str(f) for f in files if not (repo / f).is_file()]
    if missing:
        raise FileNotFoundError(f"the repository lacks {', '.join(missing)}")
    return [f for f in dict.fromkeys(files) if "__pycache__" not in f.parts and not f.name.startswith(".")]


def write_space(out: str | Path, repo: Path = REPO) -> SpaceReport:
    """Write the Space's folder to `out`, which must not exist yet."""
    out = Path(out).resolve()
    if out.exists():
        raise FileExistsError(f"{out} exists: give a new folder (nothing was written)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        files = space_files(repo)
        for f in files:
            (staging / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / f, staging / f)
        (staging / "requirements.txt").write_text(cpu_requirements((repo / "requirements.txt").read_text()))
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    sizes = {str(f): (out / f).stat().st_size for f in files}
    text = (".py", ".md", ".json", ".txt", ".css")
    binary = [f for f, size in sizes.items() if size > BINARY_IN_GIT and not f.endswith(text)]
    return SpaceReport(
        out, len(files), sum(sizes.values()), [f for f, s in sizes.items() if s > LARGE_FILE], sorted(binary)
    )


def format_report(report: SpaceReport) -> str:
    lines = [f"{report.folder}: {report.files} files, {report.bytes / 2**20:.1f} MiB"]
    if report.large:
        lines.append(f"over 10 MB (need the Hub's large-file storage): {', '.join(report.large)}")
    if report.binary_over_1mb:
        lines.append(
            f"binary files over 1 MB ({', '.join(report.binary_over_1mb)}): `hf upload` stores them in the Hub's "
            "large-file storage by itself; for a plain `git push`, `git lfs track` them first"
        )
    lines.append(f"next: hf upload YOUR_NAME/lgur-explorer {report.folder} . --repo-type space")
    return "\n".join(lines)
