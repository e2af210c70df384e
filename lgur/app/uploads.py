"""Visitors' private uploads: a store of the app's own, bounded in total, swept when stale.

Each visitor (one browser tab's session, or one API client's) gets a `PrivateGallery` the
first time they upload. The store, not the web framework's per-session state, holds it, so
no number of other sessions can push it out. It lives until the visitor leaves (the page's
unload event) or `lifetime` seconds after their last use, whichever comes first; a sweeper
removes what is past its lifetime and any folder no visitor holds.

Bounds: one visitor's uploads are serialised (the per-visitor cap is checked inside that
lock), all visitors together share a quota of files and bytes, and at most `concurrent`
uploads are decoded and indexed at once. Each file is stored once: the web framework's
copy in its upload cache is deleted as soon as ours is written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..search.engine import SearchEngine
from ..search.gallery import MAX_PRIVATE_IMAGES, AddReport, PrivateGallery, add_images

log = logging.getLogger(__name__)
SESSION_SECONDS = 3600


@dataclass(frozen=True)
class UploadLimits:
    """How much the store holds. The defaults fit a free Hugging Face Space (50 GB of ephemeral disk)."""

    files_per_visitor: int = MAX_PRIVATE_IMAGES
    total_files: int = 4_000
    total_bytes: int = 2 * 2**30
    lifetime: float = SESSION_SECONDS  # seconds since the visitor's last search or upload
    concurrent: int = 2  # uploads decoded and indexed at once, all visitors together
    wait: float = 60.0  # seconds an upload waits for a free slot before it is refused

    @classmethod
    def from_environ(cls, environ: dict[str, str]) -> UploadLimits:
        """LGUR_UPLOAD_QUOTA_MB, LGUR_UPLOAD_QUOTA_FILES, LGUR_UPLOAD_MINUTES override the defaults."""
        limits = cls()
        try:
            return cls(
                total_bytes=int(float(environ.get("LGUR_UPLOAD_QUOTA_MB", limits.total_bytes / 2**20)) * 2**20),
                total_files=int(environ.get("LGUR_UPLOAD_QUOTA_FILES", limits.total_files)),
                lifetime=float(environ.get("LGUR_UPLOAD_MINUTES", limits.lifetime / 60)) * 60,
            )
        except ValueError as error:
            raise ValueError(f"upload limits in the environment must be numbers ({error})") from None


@dataclass
class Visitor:
    gallery: PrivateGallery
    last_used: float
    lock: threading.Lock = field(default_factory=threading.Lock)  # one upload at a time
    bytes: int = 0
    files: int = 0


def folder_usage(folder: Path) -> tuple[int, int]:
    """(bytes, files) of the regular files directly in `folder`."""
    sizes = [e.stat().st_size for e in os.scandir(folder) if e.is_file()] if folder.is_dir() else []
    return sum(sizes), len(sizes)


class UploadStore:
    def __init__(
        self,
        root: Path,
        limits: UploadLimits | None = None,
        cache: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        """root: where the visitors' folders go; cache: the web framework's upload folder, whose
        copies of uploaded files are deleted once stored (nothing outside it is ever deleted)."""
        self.root = root
        self.limits = limits or UploadLimits()
        self.cache = cache.resolve() if cache else None
        self.clock = clock
        self._visitors: dict[str, Visitor] = {}
        self._lock = threading.Lock()  # the visitors and the quota's accounting
        self._reserved = (0, 0)  # (bytes, files) admitted to uploads in progress
        self._slots = threading.BoundedSemaphore(self.limits.concurrent)
        self._holders: Counter[Path] = Counter()  # cache files that uploads in progress read

    # -- looking up ---------------------------------------------------------------------------
    def gallery(self, visitor: str | None) -> PrivateGallery | None:
        """The visitor's gallery, if they uploaded; counts as a use (their lifetime restarts)."""
        with self._lock:
            entry = self._visitors.get(visitor) if visitor else None
            if entry is None:
                return None
            entry.last_used = self.clock()
            return entry.gallery

    def usage(self) -> tuple[int, int]:
        """(bytes, files) stored and admitted, all visitors together."""
        with self._lock:
            return self._usage()

    def _usage(self) -> tuple[int, int]:
        stored = [(v.bytes, v.files) for v in self._visitors.values()]
        return sum(b for b, _ in stored) + self._reserved[0], sum(f for _, f in stored) + self._reserved[1]

    # -- adding -------------------------------------------------------------------------------
    def add(self, engine: SearchEngine, visitor: str, files: list[Path]) -> AddReport:
        """Validate, store and index `files` for `visitor` (see gallery.add_images), within the
        per-visitor cap and the store's quota; their cache copies are deleted in any case."""
        with self.holding(files):
            if not self._slots.acquire(timeout=self.limits.wait):
                return AddReport(
                    rejected=[(f.name, "the server is busy with other uploads; try again soon") for f in files]
                )
            try:
                entry = self._entry(visitor)
                with entry.lock:  # a visitor's uploads one at a time: the cap holds, nothing is orphaned
                    admitted, refused, reserved = self._admit(files)
                    try:
                        report = add_images(engine, admitted, private=entry.gallery, cap=self.limits.files_per_visitor)
                    finally:
                        with self._lock:
                            self._reserved = (self._reserved[0] - reserved, self._reserved[1] - len(admitted))
                            entry.bytes, entry.files = folder_usage(entry.gallery.images)
                            entry.last_used = self.clock()
                    report.rejected += refused
                    return report
            finally:
                self._slots.release()

    def _entry(self, visitor: str) -> Visitor:
        with self._lock:
            if visitor not in self._visitors:
                self._visitors[visitor] = Visitor(PrivateGallery.create(self.root), self.clock())
            return self._visitors[visitor]

    def _admit(self, files: list[Path]) -> tuple[list[Path], list[tuple[str, str]], int]:
        """Files in order while they fit the store's quota, and their bytes (reserved until the upload ends)."""
        admitted, refused = [], []
        with self._lock:
            used_bytes, used_files = start = self._usage()
            for path in files:
                size = self._size(path)
                if used_files + 1 > self.limits.total_files or used_bytes + size > self.limits.total_bytes:
                    refused.append(
                        (path.name, "the space for uploads is full (all visitors together); try again later")
                    )
                    continue
                used_bytes, used_files = used_bytes + size, used_files + 1
                admitted.append(path)
            reserved = used_bytes - start[0]
            self._reserved = (self._reserved[0] + reserved, self._reserved[1] + len(admitted))
        return admitted, refused, reserved

    @staticmethod
    def _size(path: Path) -> int:
        try:
            return path.stat().st_size
        except OSError:
            return 0

    @contextlib.contextmanager
    def holding(self, files: list[Path]) -> Iterator[None]:
        """While held, `files` may be read; after, those in the upload cache are deleted (our own copy
        is stored by then), unless another upload in progress holds the same one (the cache keeps
        one file per content, shared by every visitor who sent those bytes)."""
        cached = [p for p in map(self._in_cache, files) if p is not None]
        with self._lock:
            self._holders.update(cached)
        try:
            yield
        finally:
            with self._lock:
                self._holders.subtract(cached)
                for path in {p for p in cached if self._holders[p] <= 0}:
                    del self._holders[path]
                    with contextlib.suppress(OSError):
                        path.unlink(missing_ok=True)
                        if path.parent != self.cache:
                            path.parent.rmdir()  # the per-content folder the cache makes, if now empty

    def _in_cache(self, path: Path) -> Path | None:
        try:
            resolved = path.resolve()
        except OSError:
            return None
        inside = self.cache is not None and resolved.is_relative_to(self.cache) and resolved != self.cache
        return resolved if inside else None

    # -- removing -----------------------------------------------------------------------------
    def discard(self, visitor: str | None) -> bool:
        """The visitor left: delete their uploads (after an upload in progress ends)."""
        with self._lock:
            entry = self._visitors.get(visitor) if visitor else None
        if entry is None:
            return False
        with entry.lock:
            with self._lock:
                if self._visitors.get(visitor) is entry:
                    del self._visitors[visitor]
            entry.gallery.remove()
        return True

    def sweep(self) -> int:
        """Remove every visitor past their lifetime, and any folder under root no visitor holds
        (one cut short by an error). -> how many were removed."""
        now = self.clock()
        with self._lock:
            stale = [k for k, v in self._visitors.items() if now - v.last_used > self.limits.lifetime]
        removed = 0
        for visitor in stale:
            with self._lock:
                entry = self._visitors.get(visitor)
            if entry is None or not entry.lock.acquire(blocking=False):
                continue  # gone already, or uploading now: not stale after all
            try:
                with self._lock:
                    if now - entry.last_used <= self.limits.lifetime or self._visitors.get(visitor) is not entry:
                        continue
                    del self._visitors[visitor]
                entry.gallery.remove()
                removed += 1
            finally:
                entry.lock.release()
        with self._lock:  # no visitor can be added while the folders are read
            held = {p.name for v in self._visitors.values() for p in (v.gallery.images, v.gallery.index_dir)}
            for kind in ("images", "index"):
                for folder in (self.root / kind).iterdir() if (self.root / kind).is_dir() else []:
                    if folder.name not in held:
                        shutil.rmtree(folder, ignore_errors=True)
                        removed += 1
        return removed

    def start_sweeper(self, every: float = 60.0) -> threading.Thread:
        """Sweep every `every` seconds in a daemon thread, for the life of the process."""

        def loop() -> None:
            while True:
                time.sleep(every)
                try:
                    self.sweep()
                except OSError as error:  # a disk hiccup must not end the sweeping
                    log.warning("sweeping uploads failed: %s", error)

        thread = threading.Thread(target=loop, name="upload-sweeper", daemon=True)
        thread.start()
        return thread
