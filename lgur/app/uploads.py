"""Visitors' private uploads: a store of the app's own, bounded in total, swept when stale.

Each visitor (one browser tab's session, or one API client's) gets a `PrivateGallery` the
first time they upload. The store, not the web framework's per-session state, holds it, so
no number of other sessions can push it out. It lives until the visitor leaves (the page's
unload event) or `lifetime` seconds after their last use, whichever comes first; a sweeper
removes what is past its lifetime and any folder no visitor holds.

Bounds: one visitor's uploads are serialised (the per-visitor cap is checked inside that
lock), all visitors together share a quota of files and bytes, of which one address (all
its sessions together) may hold at most `address_share`, and at most `concurrent` uploads
are decoded and indexed at once. Each file is stored once: the web framework's copy in its
upload cache is deleted as soon as ours is written. Only a copy that the same address sent
through the upload route (`uploaded`) is ever deleted so; copies nobody used within
`unclaimed` seconds are swept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..search.engine import SearchEngine
from ..search.gallery import MAX_PRIVATE_IMAGES, AddReport, PrivateGallery, add_images
from .visitors import visitor_address

log = logging.getLogger(__name__)
SESSION_SECONDS = 3600
UPLOAD_ROUTE = "/uploads"  # GET /uploads/<gallery token>/<file>: a visitor's own upload, to that visitor's address


@dataclass(frozen=True)
class UploadLimits:
    """How much the store holds. The defaults fit a free Hugging Face Space (50 GB of ephemeral disk)."""

    files_per_visitor: int = MAX_PRIVATE_IMAGES
    total_files: int = 4_000
    total_bytes: int = 2 * 2**30
    lifetime: float = SESSION_SECONDS  # seconds since the visitor's last search or upload
    concurrent: int = 2  # uploads decoded and indexed at once, all visitors together
    address_share: float = 0.25  # of the quota, the most one address (all its sessions) may hold
    unclaimed: float = 900.0  # seconds an upload-route file may wait for the event that uses it
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
    address: str = "local"  # where the visitor's requests come from (visitors.visitor_address)
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
        proxy_hops: int = 0,
    ):
        """root: where the visitors' folders go; cache: the web framework's upload folder, whose
        copies of uploaded files are deleted once stored (nothing outside it is ever deleted)."""
        self.root = root
        self.limits = limits or UploadLimits()
        self.cache = cache.resolve() if cache else None
        self.clock, self.proxy_hops = clock, proxy_hops
        self._visitors: dict[str, Visitor] = {}
        self._lock = threading.Lock()  # the visitors and the quota's accounting
        self._reserved = (0, 0)  # (bytes, files) admitted to uploads in progress
        self._slots = threading.BoundedSemaphore(self.limits.concurrent)
        self._holders: Counter[Path] = Counter()  # cache files that uploads in progress read
        self._uploaded: dict[Path, tuple[str, float]] = {}  # cache file -> (the address that sent it, when)

    # -- looking up ---------------------------------------------------------------------------
    def address_of(self, request: Any) -> str:
        """The address a request comes from (behind `proxy_hops` trusted proxies): whose uploads are whose."""
        return visitor_address(request, self.proxy_hops)

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

    def shown(self, path: str | Path, root: str) -> str:
        """What the page shows for an image: a visitor's upload as its URL on the upload route (so the
        web framework serves our one copy, and makes none of its own), anything else as its path.
        root: the page's root URL (page_root); without one, the path."""
        path = Path(path)
        images = self.root / "images"
        if not root or path.parent.parent != images:
            return str(path)
        return f"{root}{UPLOAD_ROUTE}/{path.parent.name}/{quote(path.name)}"

    def served(self, token: str, name: str, address: str) -> Path | None:
        """The upload file `name` of the gallery `token`, if `address` is the one that uploaded it."""
        with self._lock:
            entry = next((v for v in self._visitors.values() if v.gallery.images.name == token), None)
        if entry is None or entry.address != address or "/" in name or name.startswith("."):
            return None
        path = entry.gallery.images / name
        return path if path.is_file() else None

    # -- adding -------------------------------------------------------------------------------
    def add(self, engine: SearchEngine, visitor: str, files: list[Path], address: str = "local") -> AddReport:
        """Validate, store and index `files` for `visitor` (see gallery.add_images), within the
        per-visitor cap, the address's share and the store's quota; the cache copies `address` sent are
        deleted in any case."""
        with self.holding(files, address):
            if not self._slots.acquire(timeout=self.limits.wait):
                return AddReport(
                    rejected=[(f.name, "the server is busy with other uploads; try again soon") for f in files]
                )
            try:
                entry = self._entry(visitor, address)
                with entry.lock:  # a visitor's uploads one at a time: the cap holds, nothing is orphaned
                    admitted, refused, reserved = self._admit(files, address)
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

    def _entry(self, visitor: str, address: str) -> Visitor:
        with self._lock:
            if visitor not in self._visitors:
                self._visitors[visitor] = Visitor(PrivateGallery.create(self.root), self.clock(), address=address)
            return self._visitors[visitor]

    def _admit(self, files: list[Path], address: str) -> tuple[list[Path], list[tuple[str, str]], int]:
        """Files in order while they fit the address's share and the store's quota, and their bytes
        (reserved until the upload ends)."""
        admitted, refused = [], []
        share = self.limits.address_share
        with self._lock:
            used_bytes, used_files = start = self._usage()
            mine = [(v.bytes, v.files) for v in self._visitors.values() if v.address == address]
            own_bytes, own_files = sum(b for b, _ in mine), sum(f for _, f in mine)
            for path in files:
                size = self._size(path)
                if used_files + 1 > self.limits.total_files or used_bytes + size > self.limits.total_bytes:
                    refused.append(
                        (path.name, "the space for uploads is full (all visitors together); try again later")
                    )
                    continue
                if (
                    own_files + 1 > share * self.limits.total_files
                    or own_bytes + size > share * self.limits.total_bytes
                ):
                    refused.append((path.name, "your address holds its share of the space for uploads; try later"))
                    continue
                used_bytes, used_files = used_bytes + size, used_files + 1
                own_bytes, own_files = own_bytes + size, own_files + 1
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

    def uploaded(self, files: list[str | Path], address: str) -> None:
        """`address` sent `files` through the upload route: the copies that address's events may delete."""
        now = self.clock()
        with self._lock:
            for path in map(self._in_cache, map(Path, files)):
                if path is not None:
                    self._uploaded[path] = (address, now)

    @contextlib.contextmanager
    def holding(self, files: list[Path], address: str = "local") -> Iterator[None]:
        """While held, `files` may be read; after, those in the upload cache that `address` sent are
        deleted (our own copy is stored by then), unless another upload in progress holds the same one.
        Any other file a visitor names (another's upload, the app's own outputs) is never deleted."""
        with self._lock:
            cached = [p for p in map(self._in_cache, files) if p is not None and self._sent_by(p, address)]
            self._holders.update(cached)
        try:
            yield
        finally:
            with self._lock:
                self._holders.subtract(cached)
                for path in {p for p in cached if self._holders[p] <= 0}:
                    del self._holders[path]
                    self._delete_cached(path)

    def sent(self, path: str | Path, address: str) -> Path | None:
        """`path` resolved, if it is a file in the upload cache that `address` sent (else None): the
        only files an API call may name as its upload."""
        resolved = self._in_cache(Path(path))
        with self._lock:
            return resolved if resolved is not None and self._sent_by(resolved, address) else None

    def _sent_by(self, path: Path, address: str) -> bool:
        return self._uploaded.get(path, ("",))[0] == address

    def _delete_cached(self, path: Path) -> None:
        self._uploaded.pop(path, None)
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
    def remove(self, engine: SearchEngine, visitor: str | None, names: list[str]) -> list[str]:
        """The visitor deletes some of their uploads (names as their gallery lists them; any other name
        is ignored): gone at once from the folder, the index and the decode cache. -> the names deleted."""
        with self._lock:
            entry = self._visitors.get(visitor) if visitor else None
        if entry is None:
            return []
        with entry.lock:  # after an upload in progress
            gone = entry.gallery.delete(engine, names)
            with self._lock:
                entry.bytes, entry.files = folder_usage(entry.gallery.images)
                entry.last_used = self.clock()
        return gone

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
        with self._lock:  # upload-route files no event used in time
            for path, (_, sent) in list(self._uploaded.items()):
                if now - sent > self.limits.unclaimed and self._holders[path] <= 0:
                    self._delete_cached(path)
                    removed += 1
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


class MeteredUploads:
    """Gradio's upload route (POST /gradio_api/upload) behind a meter: each address may send at most
    `requests` uploads and `max_bytes` bytes per `window` seconds, refused (429) before a byte is stored,
    and the files it stores are recorded as that address's (UploadStore.uploaded), which only that
    address's events may delete and which are swept when unclaimed."""

    def __init__(
        self,
        route: Any,
        store: UploadStore,
        requests: int = 60,
        max_bytes: int = 200 * 2**20,
        window: float = 600.0,
    ) -> None:
        self.route, self.store = route, store
        self.requests, self.max_bytes, self.window = requests, max_bytes, window
        self._sent: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def admit(self, address: str, length: int) -> str | None:
        """None if `address` may send `length` more bytes now (and count them), else why not."""
        now = self.store.clock()
        with self._lock:
            for who in [w for w, sent in self._sent.items() if not sent or now - sent[-1][0] > self.window]:
                del self._sent[who]  # nothing of theirs left in the window
            sent = self._sent.setdefault(address, deque())
            while sent and now - sent[0][0] > self.window:
                sent.popleft()
            if len(sent) >= self.requests or sum(n for _, n in sent) + length > self.max_bytes:
                return f"Too many uploads from your address; wait {self.window / 60:.0f} minutes."
            sent.append((now, length))
            return None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        from starlette.requests import Request
        from starlette.responses import PlainTextResponse

        request = Request(scope)
        address = self.store.address_of(request)
        try:
            length = int(request.headers["content-length"])
        except (KeyError, ValueError):
            await PlainTextResponse("An upload must say its length.", status_code=411)(scope, receive, send)
            return
        refusal = self.admit(address, length)
        if refusal:
            await PlainTextResponse(refusal, status_code=429)(scope, receive, send)
            return
        status, body = [0], []

        async def recorded(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body":
                body.append(message.get("body", b""))
            await send(message)

        await self.route.handle(scope, receive, recorded)
        if status[0] == 200:
            with contextlib.suppress(ValueError, TypeError):
                self.store.uploaded([str(p) for p in json.loads(b"".join(body))], address)


def meter_uploads(app: Any, store: UploadStore, **meter: Any) -> MeteredUploads:
    """Put a MeteredUploads in front of a launched Gradio app's upload route (routes match in order)."""
    from starlette.routing import Route

    routes = list(app.router.routes)
    for route in list(routes):  # and those of included routers (Gradio's API routes are one)
        routes += getattr(getattr(route, "original_router", None), "routes", [])
    for route in routes:
        if getattr(route, "path", "").endswith("/upload") and "POST" in (getattr(route, "methods", None) or ()):
            metered = MeteredUploads(route, store, **meter)
            app.router.routes.insert(0, Route(route.path, metered, methods=["POST"]))
            return metered
    raise RuntimeError("this Gradio app has no upload route to meter")
