"""Adding images to a gallery: validate, publish without overwriting anything, index, and take
back what the model could not read.

The app's upload box and a script call `add_images` the same way. Concurrent calls are
safe: each file is published under a name nobody else holds (a hard link that fails if
the name exists), and index updates are serialised by the index's lock.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from .files import IMAGE_SUFFIXES, TEMPORARY_SUFFIX, check_image
from .search import SearchEngine

MAX_FILES_PER_CALL = 50
MAX_NAME_CHARS = 120


@dataclass
class AddReport:
    added: list[str] = field(default_factory=list)  # gallery-relative names, as stored
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (name as given, reason)
    gallery_size: int = 0


def safe_file_name(name: str) -> str:
    """A plain, visible file name from whatever a client sent: no folders (either slash), no
    leading dots (hidden files are never indexed), no control or odd characters."""
    name = unicodedata.normalize("NFKC", name).replace("\\", "/").rsplit("/", 1)[-1]
    suffix = Path(name).suffix.lower()
    stem = name[: len(name) - len(suffix)] if suffix else name
    stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in stem.lstrip(".")).strip("_")
    return (stem or "image")[:MAX_NAME_CHARS] + suffix


def publish(source: Path, folder: Path, name: str) -> Path:
    """Copy `source` into `folder` under `name` or, when taken, `name-1`, `name-2`...; never
    overwrites and never shows a half-written file (copy to a hidden temporary, then link)."""
    folder.mkdir(parents=True, exist_ok=True)
    stem, suffix = Path(name).stem, Path(name).suffix
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=TEMPORARY_SUFFIX)  # hidden: not indexed
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        shutil.copyfile(source, tmp)
        os.chmod(tmp, 0o644)
        for n in range(10_000):
            target = folder / (f"{stem}-{n}{suffix}" if n else name)
            try:
                os.link(tmp, target)  # atomic, and fails if the name exists
                return target
            except FileExistsError:
                continue
    finally:
        tmp.unlink(missing_ok=True)
    raise OSError(f"no free name for {name} in {folder}")


def add_images(engine: SearchEngine, files: list[str | Path], folder: str = "uploads") -> AddReport:
    """Validate `files`, copy the good ones into `engine`'s gallery (under `folder`), index them.

    Files the index then refuses (decoding failed after all) are removed again and reported.
    """
    report = AddReport()
    paths = [Path(f) for f in files]
    for path in paths[MAX_FILES_PER_CALL:]:
        report.rejected.append((path.name, f"more than {MAX_FILES_PER_CALL} files in one upload"))
    target_folder = engine.gallery / folder
    published: dict[str, str] = {}  # stored relative name -> name as given
    for path in paths[:MAX_FILES_PER_CALL]:
        given = path.name
        name = safe_file_name(given)
        if Path(name).suffix not in IMAGE_SUFFIXES:
            report.rejected.append((given, f"unsupported file type {Path(name).suffix or '(none)'}"))
            continue
        problem = check_image(path)
        if problem:
            report.rejected.append((given, problem))
            continue
        stored = publish(path, target_folder, name)
        published[stored.relative_to(engine.gallery).as_posix()] = given
    if published:
        update = engine.refresh()
        for item in update.rejected:  # refused on decoding after all: take the file out again
            if item["path"] in published:
                (engine.gallery / item["path"]).unlink(missing_ok=True)
                report.rejected.append((published.pop(item["path"]), item["reason"]))
    indexed = set(engine.files())
    report.added = [name for name in published if name in indexed]
    report.rejected += [(given, "not indexed") for name, given in published.items() if name not in indexed]
    report.gallery_size = len(engine)
    return report
