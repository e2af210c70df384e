"""Adding images to a gallery: validate, publish without overwriting anything, index, and take
back what the model could not read.

The app's upload box and a script call `add_images` the same way. Concurrent calls are
safe: each file is published under a name nobody else holds (a hard link that fails if
the name exists), and index updates are serialised by the index's lock.

Images go either into the shared gallery (the command line, or the app with its explicit
flag) or into a visitor's `PrivateGallery`: their own folder and index, searched together
with the shared gallery, deleted when their session ends.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..files import DECODED, IMAGE_SUFFIXES, TEMPORARY_SUFFIX, check_image
from .engine import PRIVATE_PREFIX, SearchEngine
from .index import GalleryIndex, update_index

MAX_FILES_PER_CALL = 50
MAX_PRIVATE_IMAGES = 200  # per visitor
MAX_NAME_CHARS = 120
PROCESS_FILE = "process"  # in a server's sessions folder: its process id


@dataclass
class PrivateGallery:
    """One visitor's uploads: a folder of images (served to them) and its index (not served)."""

    images: Path
    index_dir: Path
    index: GalleryIndex | None = None

    @classmethod
    def create(cls, root: Path) -> PrivateGallery:
        token = secrets.token_hex(16)  # unguessable: the folder name is part of the image URLs
        return cls(root / "images" / token, root / "index" / token)

    def __len__(self) -> int:
        return len(self.index) if self.index is not None else 0

    def files(self) -> list[str]:
        return [e.path for e in self.index.entries] if self.index is not None else []

    def remove(self) -> None:
        shutil.rmtree(self.images, ignore_errors=True)
        shutil.rmtree(self.index_dir, ignore_errors=True)
        DECODED.forget(self.images)

    def delete(self, engine: SearchEngine, names: list[str]) -> list[str]:
        """Delete the uploads `names` (as files() lists them; others are ignored) from the folder, the
        index and the decode cache: -> the names deleted."""
        held = set(self.files())
        gone = [n for n in dict.fromkeys(names) if n in held and "/" not in n]
        for name in gone:
            (self.images / name).unlink(missing_ok=True)
        if gone:
            DECODED.forget(self.images)
            if len(gone) == len(held):  # nothing left to index
                shutil.rmtree(self.index_dir, ignore_errors=True)
                self.index = None
            else:
                self.index, _ = update_index(engine.model, engine.index.checkpoint, self.images, self.index_dir)
        return gone


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


def add_images(
    engine: SearchEngine,
    files: list[str | Path],
    folder: str = "uploads",
    private: PrivateGallery | None = None,
    cap: int = MAX_PRIVATE_IMAGES,
) -> AddReport:
    """Validate `files`, copy the good ones into `engine`'s gallery (under `folder`), or into the
    visitor's `private` gallery (`cap` images at most), and index them. The caller serialises calls
    for one private gallery (uploads.UploadStore does).

    Files the index then refuses (decoding failed after all) are removed again and reported.
    """
    report = AddReport()
    paths = [Path(f) for f in files]
    room, limit = MAX_FILES_PER_CALL, f"more than {MAX_FILES_PER_CALL} files in one upload"
    if private is not None and cap - len(private) < room:
        room, limit = max(cap - len(private), 0), f"your {cap} uploads are used up"
    for path in paths[room:]:
        report.rejected.append((path.name, limit))
    root = engine.gallery if private is None else private.images
    target_folder = root / folder if private is None else root
    published: dict[str, str] = {}  # stored relative name -> name as given
    for path in paths[:room]:
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
        published[stored.relative_to(root).as_posix()] = given
    if published:
        if private is None:
            update = engine.refresh()
        else:
            private.index, update = update_index(engine.model, engine.index.checkpoint, root, private.index_dir)
        for item in update.rejected:  # refused on decoding after all: take the file out again
            if item["path"] in published:
                (root / item["path"]).unlink(missing_ok=True)
                report.rejected.append((published.pop(item["path"]), item["reason"]))
    indexed = set(engine.files() if private is None else private.files())
    prefix = "" if private is None else PRIVATE_PREFIX
    report.added = [prefix + name for name in published if name in indexed]
    report.rejected += [(given, "not indexed") for name, given in published.items() if name not in indexed]
    report.gallery_size = len(engine) + (len(private) if private is not None else 0)
    return report


def private_sessions_root() -> Path:
    """Where visitors' private uploads (and the app's upload cache) live: one folder per server process,
    named by a random token (the web framework's upload answers show the path, so not the process id,
    which is written inside as PROCESS_FILE). Folders of processes that are gone are removed."""
    root = Path(tempfile.gettempdir()) / "lgur-sessions"
    own = None
    for folder in root.glob("*") if root.is_dir() else []:
        if folder.name.startswith("."):  # being made by a process that starts now
            continue
        try:
            owner = int((folder / PROCESS_FILE).read_text())
        except (OSError, ValueError):
            owner = None
        if owner == os.getpid():
            own = folder  # this process's own, made by an earlier call
            continue
        try:
            if owner is None:
                raise ProcessLookupError
            os.kill(owner, 0)  # still running: not ours to touch
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            pass
    if own is not None:
        return own
    making = root / f".{secrets.token_hex(8)}"
    making.mkdir(parents=True)
    (making / PROCESS_FILE).write_text(str(os.getpid()))
    folder = root / secrets.token_hex(8)
    making.rename(folder)  # appears whole, its owner already written
    return folder


def gallery_page(
    shared: list[str], gallery: Path, mine: list[Path], page: Any, per_page: int, uploads: str = "uploads"
) -> tuple[list[Path], str]:
    """One page of a gallery listing, uploads first (the visitor's own `mine`, then the shared gallery's
    files under `uploads`): the image files of the page and a line saying where we are. A page number
    out of range (or not a number) is clamped."""
    shared = sorted(shared, key=lambda f: (not f.startswith(f"{uploads}/"), f))
    files = list(mine) + [gallery / f for f in shared]
    pages = max(1, math.ceil(len(files) / per_page))
    number = int(page) if isinstance(page, int | float) and math.isfinite(page) else 1
    number = min(max(number, 1), pages)
    uploaded = len(mine) + sum(f.startswith(f"{uploads}/") for f in shared)
    where = f"Page {number} of {pages}: {len(files)} images ({uploaded} uploaded, listed first)."
    return files[(number - 1) * per_page : number * per_page], where
