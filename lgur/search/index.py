"""Gallery index: what the search engine needs, computed once per image.

For a folder of images the index holds a manifest (relative path, sha256, size), the
dictionary-branch embeddings and part vectors, an explanation cache (PGU prototype attention
per layer and head, foreground weights, atom histogram) and a faiss index. It is incremental
(only new or changed files are embedded), tied to the checkpoint's fingerprint (a different
model rebuilds it), and one file written atomically (arrays, manifest and a checksum
together), so a truncated, corrupt or stale index is detected and rebuilt, never served.
Updates of one index are serialised by a file lock (threads and processes alike).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load, save

from ..data.dataset import normalize
from ..files import IMAGE_SUFFIXES, atomic_output, read_checked_image, remove_temporaries, sha256_file
from ..model.lgur import LGUR

log = logging.getLogger(__name__)

FORMAT = "lgur-index"
FORMAT_VERSION = 4  # 2: arrays and manifest in one file; 3: atom histogram weighted by m only where learned;
# 4: the detail detector's phrase lifts
INDEX_FOLDER = ".lgur-index"  # inside the gallery unless told otherwise; hidden, so never indexed itself
# Exact inner-product search up to this many images, IVF beyond. Measured on 2 cores with
# 1536-d embeddings: exact search costs ~0.5 ms per 1,000 images per query, so past ~50k it
# dominates the query time (`python -m lgur bench search`).
EXACT_LIMIT = 50_000
# With an IVF index, a query with detail phrases re-ranks this many of the best by cosine.
DETAIL_CANDIDATES = 1000
ARRAYS = ("embeddings", "parts", "prototype_attention", "foreground", "atom_histogram", "detail_lift")


class IndexUnusable(RuntimeError):
    """An index that cannot be used; the message says why."""


def default_index_dir(gallery: str | Path) -> Path:
    return Path(gallery).resolve() / INDEX_FOLDER


@contextlib.contextmanager
def index_lock(index_dir: Path) -> Iterator[None]:
    """Exclusive while held: one update of this index at a time, across threads and processes."""
    index_dir.mkdir(parents=True, exist_ok=True)
    with open(index_dir / ".lock", "a") as handle:  # a new open file per holder: flock excludes each
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class Entry:
    path: str  # relative to the gallery folder, with forward slashes
    sha256: str
    size: int
    mtime_ns: int


@dataclass
class GalleryIndex:
    gallery: Path
    entries: list[Entry]
    arrays: dict[str, np.ndarray]  # ARRAYS, first axis = entries
    checkpoint: str  # fingerprint of the model that made it
    rejected: list[dict[str, str]] = field(default_factory=list)
    kind: str = "flat"
    faiss_index: Any = None
    approximate_recall_at_10: float | None = None
    _rows: dict[str, int] | None = field(default=None, repr=False)
    _detail_lift: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.arrays["embeddings"])

    def row(self, path: str) -> int | None:
        """The row of a gallery-relative file name, None if it is not indexed."""
        if self._rows is None:
            self._rows = {e.path: i for i, e in enumerate(self.entries)}
        return self._rows.get(path)

    @property
    def embeddings(self) -> np.ndarray:
        return self.arrays["embeddings"]

    def build_faiss(self, nlist: int | None = None, seed: int = 0) -> None:
        """Exact inner product up to EXACT_LIMIT images; IVF beyond, with its recall@10 measured."""
        x = np.ascontiguousarray(self.embeddings, dtype=np.float32)
        d = x.shape[1] if x.size else 1
        if len(x) <= EXACT_LIMIT:
            self.kind, self.approximate_recall_at_10 = "flat", None
            self.faiss_index = faiss.IndexFlatIP(d)
            self.faiss_index.add(x)
            return
        nlist = nlist or int(4 * np.sqrt(len(x)))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        index.train(x[rng.choice(len(x), size=min(len(x), 64 * nlist), replace=False)])
        index.add(x)
        index.nprobe = max(16, nlist // 16)
        self.kind, self.faiss_index = "ivf", index
        self.approximate_recall_at_10 = measure_recall(index, x, rng)

    def search(self, queries: np.ndarray, k: int, details: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k best rows per query (Q, E) by cosine; with `details` (Q, K), the query's weighted
        phrases (lgur.model.details), by cosine + details @ lift(phrase, image): exact up to EXACT_LIMIT
        images, else over the DETAIL_CANDIDATES best by cosine."""
        if self.faiss_index is None:
            self.build_faiss()
        k = min(k, len(self))
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if details is None or not details.any():
            return self.faiss_index.search(queries, k)
        # torch, not numpy: numpy's BLAS threads would spin against the model's on the same cores
        lift = self.detail_lift  # (G, K): the same detector as `details`, by the fingerprint
        wanted = torch.from_numpy(np.ascontiguousarray(details, dtype=np.float32))  # (Q, K)
        if self.kind == "flat":
            scores = torch.from_numpy(queries) @ torch.from_numpy(self.embeddings).float().T + wanted @ lift.T
            rows = torch.arange(len(self)).expand(len(queries), -1)
        else:
            cosine, found = self.faiss_index.search(queries, max(k, DETAIL_CANDIDATES))
            rows = torch.from_numpy(np.maximum(found, 0))
            scores = torch.from_numpy(np.where(found < 0, -np.inf, cosine))  # fewer candidates than asked: last
            scores = scores + torch.einsum("qk,qck->qc", wanted, lift[rows])
        best = scores.topk(k, dim=1).indices
        return scores.gather(1, best).numpy(), rows.gather(1, best).numpy()

    @property
    def detail_lift(self) -> torch.Tensor:
        """(G, K) float32 copy of the stored phrase lifts (lgur.model.details), converted once."""
        if self._detail_lift is None:
            self._detail_lift = torch.from_numpy(self.arrays["detail_lift"]).float()
        return self._detail_lift


def measure_recall(index: Any, x: np.ndarray, rng: np.random.Generator, queries: int = 200) -> float:
    """recall@10 of an approximate index against exact search, on gallery vectors perturbed as queries."""
    q = x[rng.choice(len(x), size=min(queries, len(x)), replace=False)]
    q = q + rng.normal(scale=0.05, size=q.shape).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    _, truth = exact.search(q, 10)
    _, found = index.search(q, 10)
    return float(np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)]))


# -- building --------------------------------------------------------------------------------


def scan_gallery(gallery: Path, index_dir: Path | None = None) -> list[Path]:
    """Image files under the gallery by suffix, sorted; hidden names and the index folder skipped."""
    files = []
    for path in sorted(gallery.rglob("*")):
        rel = path.relative_to(gallery)
        if any(part.startswith(".") for part in rel.parts) or (index_dir and index_dir in path.parents):
            continue
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            files.append(path)
    return files


@torch.inference_mode()
def index_arrays(model: LGUR, images: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 (B, 3, H, W) -> the arrays the index stores for each image."""
    explained = model.explain_images(normalize(torch.from_numpy(images)))
    parts = explained.parts
    attention = explained.prototype_attention  # (B, L, H, P, N) or None without PGU
    b, n = images.shape[0], explained.grid[0] * explained.grid[1]
    if explained.dictionary_weights is not None:
        histogram, foreground = explained.atom_histogram, explained.foreground
    else:
        histogram = torch.zeros(b, 1)
        foreground = torch.ones(b, n)
    if attention is None:
        attention = torch.full((b, 1, 1, 1, n), 1.0 / n)
    details = explained.detail_logits
    return {
        "embeddings": explained.embedding.float().numpy(),
        "parts": parts.half().numpy(),
        "prototype_attention": attention.half().numpy(),
        "foreground": foreground.half().numpy(),
        "atom_histogram": histogram.half().numpy(),
        "detail_lift": (torch.zeros(b, 0) if details is None else model.details.lift(details)).half().numpy(),
    }


def index_file(index_dir: Path) -> Path:
    return index_dir / "index.safetensors"


def _arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in ARRAYS:
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    return digest.hexdigest()


def save_index(index: GalleryIndex, index_dir: Path) -> None:
    """One file, one rename: the arrays with the manifest and their checksum in its header."""
    arrays = {k: np.ascontiguousarray(v) for k, v in index.arrays.items()}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "checkpoint": index.checkpoint,
        "entries": [e.__dict__ for e in index.entries],
        "rejected": index.rejected,
        "arrays_sha256": _arrays_digest(arrays),
    }
    with atomic_output(index_file(index_dir)) as tmp:
        tmp.write_bytes(save(arrays, metadata={"manifest": json.dumps(manifest)}))


def load_index(gallery: Path, index_dir: Path, checkpoint: str) -> GalleryIndex:
    """Load and verify; raises IndexUnusable saying what is wrong (missing, corrupt, other model)."""
    path = index_file(index_dir)
    if not path.is_file():
        raise IndexUnusable("no index yet")
    try:
        raw = path.read_bytes()
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])  # safetensors: length, JSON
        meta = json.loads(header["__metadata__"]["manifest"])
    except (ValueError, UnicodeDecodeError, OSError, KeyError, TypeError) as error:
        raise IndexUnusable(f"index unreadable ({type(error).__name__}: {error})") from error
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise IndexUnusable("not an index of this version")
    if meta.get("checkpoint") != checkpoint:
        raise IndexUnusable("index was built with a different checkpoint")
    try:
        arrays = load(raw)
    except (SafetensorError, ValueError) as error:
        raise IndexUnusable(f"index data unreadable, truncated or corrupt ({error})") from error
    try:
        entries = [Entry(**e) for e in meta["entries"]]
    except (KeyError, TypeError) as error:
        raise IndexUnusable(f"index manifest unreadable ({error})") from error
    if set(arrays) != set(ARRAYS) or any(len(arrays[k]) != len(entries) for k in ARRAYS):
        raise IndexUnusable("index arrays do not match its manifest")
    if _arrays_digest(arrays) != meta.get("arrays_sha256"):
        raise IndexUnusable("index data does not match its checksum (corrupt)")
    return GalleryIndex(gallery, entries, arrays, checkpoint, meta.get("rejected", []))


@dataclass
class UpdateReport:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    rejected: list[dict[str, str]] = field(default_factory=list)
    rebuilt_because: str | None = None
    embedded: int = 0

    def summary(self) -> str:
        text = (
            f"{self.unchanged} unchanged, {len(self.added)} added, {len(self.changed)} changed, "
            f"{len(self.removed)} removed, {len(self.rejected)} rejected"
        )
        return (f"rebuilt ({self.rebuilt_because}); " if self.rebuilt_because else "") + text


def update_index(
    model: LGUR,
    checkpoint: str,
    gallery: str | Path,
    index_dir: str | Path | None = None,
    batch_size: int = 64,
    progress: bool = False,
    files: list[Path] | None = None,
) -> tuple[GalleryIndex, UpdateReport]:
    """Bring the index of `gallery` in step with its files, embedding only what is new or changed.

    Holds the index's lock throughout, so concurrent updates run one after the other and the
    later one starts from what the earlier one saved.
    """
    gallery = Path(gallery).resolve()
    index_dir = Path(index_dir).resolve() if index_dir else default_index_dir(gallery)
    with index_lock(index_dir):
        for stale in remove_temporaries(index_dir):  # what a killed writer left behind
            log.warning("removed an interrupted write: %s", stale.name)
        return _update_index(model, checkpoint, gallery, index_dir, batch_size, progress, files)


def _update_index(
    model: LGUR,
    checkpoint: str,
    gallery: Path,
    index_dir: Path,
    batch_size: int,
    progress: bool,
    files: list[Path] | None,
) -> tuple[GalleryIndex, UpdateReport]:
    report = UpdateReport()
    try:
        old = load_index(gallery, index_dir, checkpoint)
    except IndexUnusable as error:
        old = None
        report.rebuilt_because = None if str(error) == "no index yet" else str(error)
        if report.rebuilt_because:
            log.warning("rebuilding the index of %s: %s", gallery, error)
    previous = {e.path: (i, e) for i, e in enumerate(old.entries)} if old else {}

    keep_rows, keep_entries, todo = [], [], []
    seen = set()
    for path in files if files is not None else scan_gallery(gallery, index_dir):
        rel = path.relative_to(gallery).as_posix()
        seen.add(rel)
        stat = path.stat()
        prior = previous.get(rel)
        if prior and prior[1].size == stat.st_size and prior[1].mtime_ns == stat.st_mtime_ns:
            keep_rows.append(prior[0])
            keep_entries.append(prior[1])
            report.unchanged += 1
            continue
        sha = sha256_file(path)
        if prior and prior[1].sha256 == sha:  # touched, same bytes
            keep_rows.append(prior[0])
            keep_entries.append(Entry(rel, sha, stat.st_size, stat.st_mtime_ns))
            report.unchanged += 1
            continue
        todo.append((path, Entry(rel, sha, stat.st_size, stat.st_mtime_ns), prior is not None))
    report.removed = sorted(set(previous) - seen)

    arrays = {k: old.arrays[k][keep_rows] for k in ARRAYS} if old and keep_rows else None
    size = model.config.image.img_size
    new_parts: dict[str, list[np.ndarray]] = {k: [] for k in ARRAYS}
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="indexing", unit="img", disable=not progress or not todo)
    done_entries = []
    for chunk, decoded in decoded_batches(todo, size, batch_size):
        batch, ok = [], []
        for (_, entry, known), (pixels, problem) in zip(chunk, decoded, strict=True):
            if problem:
                report.rejected.append({"path": entry.path, "reason": problem})
                continue
            (report.changed if known else report.added).append(entry.path)
            batch.append(pixels)
            ok.append(entry)
        if batch:
            for k, v in index_arrays(model, np.stack(batch)).items():
                new_parts[k].append(v)
            done_entries += ok
        bar.update(len(chunk))
    bar.close()
    report.embedded = len(done_entries)
    if done_entries:
        fresh = {k: np.concatenate(v) for k, v in new_parts.items()}
        arrays = fresh if arrays is None else {k: np.concatenate([arrays[k], fresh[k]]) for k in ARRAYS}
    if arrays is None:
        arrays = _empty_arrays(model)
    entries = keep_entries + done_entries
    order = sorted(range(len(entries)), key=lambda i: entries[i].path)  # stable, path order
    index = GalleryIndex(
        gallery, [entries[i] for i in order], {k: v[order] for k, v in arrays.items()}, checkpoint, report.rejected
    )
    changed = report.added or report.changed or report.removed or report.rebuilt_because or old is None
    if changed or old.rejected != report.rejected:
        save_index(index, index_dir)
    index.build_faiss()
    return index, report


def decoded_batches(
    todo: list[tuple[Path, Entry, bool]], size: tuple[int, int], batch_size: int
) -> Iterator[tuple[list[tuple[Path, Entry, bool]], list[tuple[np.ndarray | None, str | None]]]]:
    """Chunks of `todo` with each file checked and decoded once (read_checked_image); the next chunk
    decodes in a thread while the model reads this one (PIL releases the GIL while it decodes)."""
    chunks = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]

    def decode(chunk: list[tuple[Path, Entry, bool]]) -> list[tuple[np.ndarray | None, str | None]]:
        return [read_checked_image(path, size) for path, _, _ in chunk]

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(decode, chunks[0]) if chunks else None
        for i, chunk in enumerate(chunks):
            decoded = pending.result()
            if i + 1 < len(chunks):
                pending = pool.submit(decode, chunks[i + 1])
            yield chunk, decoded


def _empty_arrays(model: LGUR) -> dict[str, np.ndarray]:
    c = model.config
    h, w = model.image_encoder.grid
    maps = model.prototype_grid[0] * model.prototype_grid[1]
    p = c.num_prototypes if c.use_pgu else 1
    return {
        "embeddings": np.zeros((0, c.embedding_dim), np.float32),
        "parts": np.zeros((0, p, c.part_dim), np.float16),
        "prototype_attention": np.zeros((0, c.pgu_layers, c.pgu_heads, p, maps), np.float16),
        "foreground": np.zeros((0, h * w), np.float16),
        "atom_histogram": np.zeros((0, c.num_atoms), np.float16),
        "detail_lift": np.zeros((0, len(c.detail_terms)), np.float16),
    }


def merge_shards(shards: list[GalleryIndex], gallery: Path) -> GalleryIndex:
    """Concatenate indexes of disjoint slices of one gallery (made by the same checkpoint)."""
    fingerprints = {s.checkpoint for s in shards}
    if len(fingerprints) != 1:
        raise IndexUnusable("shards were built with different checkpoints")
    entries = [e for s in shards for e in s.entries]
    if len({e.path for e in entries}) != len(entries):
        raise IndexUnusable("shards overlap")
    arrays = {k: np.concatenate([s.arrays[k] for s in shards]) for k in ARRAYS}
    order = sorted(range(len(entries)), key=lambda i: entries[i].path)
    merged = GalleryIndex(
        gallery,
        [entries[i] for i in order],
        {k: v[order] for k, v in arrays.items()},
        fingerprints.pop(),
        [r for s in shards for r in s.rejected],
    )
    merged.build_faiss()
    return merged


def index_gallery(model: LGUR, checkpoint: str, gallery: Path, index_dir: Path, progress: bool = False) -> str:
    """`python -m lgur index`: update the index in this process, or under torchrun (WORLD_SIZE > 1)
    in shards merged by the first process. -> a report of what was done."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        index, report = update_index(model, checkpoint, gallery, index_dir, progress=progress)
        lines = [f"{len(index)} images indexed in {index_dir} ({index.kind}); {report.summary()}"]
        return "\n".join(lines + [f"  rejected {r['path']}: {r['reason']}" for r in report.rejected])
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        merged = build_index_sharded(model, checkpoint, gallery, index_dir, rank, world, progress and rank == 0)
    finally:
        dist.destroy_process_group()
    return f"merged {world} shards: {len(merged)} images indexed in {index_dir}" if merged is not None else ""


def build_index_sharded(
    model: LGUR, checkpoint: str, gallery: Path, index_dir: Path, rank: int, world: int, progress: bool = False
) -> GalleryIndex | None:
    """Each of `world` processes embeds every `world`-th file, the first merges the shards.

    Needs an initialised process group; returns the merged index on rank 0, None elsewhere.
    """
    import torch.distributed as dist

    files = scan_gallery(gallery, index_dir)[rank::world]
    update_index(model, checkpoint, gallery, index_dir / f"shard-{rank}", files=files, progress=progress)
    dist.barrier()
    if rank != 0:
        return None
    shards = [load_index(gallery, index_dir / f"shard-{r}", checkpoint) for r in range(world)]
    merged = merge_shards(shards, gallery)
    with index_lock(index_dir):
        save_index(merged, index_dir)
    return merged
