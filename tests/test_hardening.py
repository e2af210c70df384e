"""Hardening: hostile queries and uploads, untrusted model files, concurrency, crash safety, fuzzing."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import app as explorer_app
from lgur.app.explorer import create
from lgur.data.readers import DatasetFormatError, read_dataset
from lgur.eval.bench import rss_mib
from lgur.model.checkpoint import CheckpointError, card_path, load_checkpoint
from lgur.search.index import load_index
from lgur.search.query import QueryError, clean_query
from tests.conftest import REPO, serve, served_explorer, tiny_explorer

SHIPPED = sorted((REPO / "gallery" / "images").glob("*.jpg"))

HOSTILE_QUERIES = [
    "",
    "   \t\n  ",
    "a " * 5000,  # 10,000 characters
    "woman 👩‍🦰 with a 🎒 backpack 🔥🔥",
    "穿红色外套背黑色背包的女人",
    "امرأة ترتدي معطفا أحمر",  # right-to-left
    "man\x00 in\x07 a\x1b[31m red\u202e coat\x7f",
    "<img src=x onerror=alert(1)>",
    "<script>alert('x')</script> man in black",
    "' OR 1=1; -- DROP TABLE people",
    "lone surrogate \udcff in text",
]


EXPLORER = {"images": 16, "seed": 4, "shared_uploads": True}  # the conftest fixture `explorer`


@pytest.mark.parametrize("query", HOSTILE_QUERIES)
def test_hostile_queries_get_results_or_a_message(explorer: explorer_app.Explorer, query: str) -> None:
    items, status, response = explorer.search(query, 10)
    answer = explorer.api_search(query, 3)
    if response is None:  # nothing left after cleaning: a message, never an error page
        assert items == [] and "Type a description" in status
        assert answer["results"] == [] and "Type a description" in answer["error"]
        return
    assert len(items) == 10 and "10 results" in status
    assert len(answer["results"]) == 3 and "error" not in answer
    # The status is Markdown and names the query's unknown words: no markup of the query survives in it.
    assert "<" not in status and "&lt;" not in status  # words are letters only: the markup is dropped
    maps, words, *_ = explorer.explain(response, 0, "last", "mean", "P1")
    assert len(maps) == 7 and [w for w, _ in words] == response.query.words  # words stay plain text


def test_long_queries_are_truncated_and_flagged(explorer: explorer_app.Explorer) -> None:
    _, status, response = explorer.search("a man in a red shirt " * 500, 5)
    assert response.query.truncated and "longer than the model reads" in status
    assert len(clean_query("x" * 50_000)) == 2000


# -- uploads ------------------------------------------------------------------------------------


def _png_bomb(path: Path, side: int = 30_000) -> None:
    """A valid 1-bit PNG of side x side pixels whose compressed data is ~100 KB."""
    raw = zlib.compressobj(9)
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    data = b"".join(raw.compress(row) for _ in range(side)) + raw.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _upload_batch(folder: Path) -> tuple[list[Path], dict[str, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    good = []
    ok = folder / "ok.jpg"
    shutil.copy(SHIPPED[40], ok)
    good.append(ok)
    with Image.open(SHIPPED[41]) as image:
        frames = [image.convert("RGB"), image.convert("RGB").rotate(5)]
        frames[0].save(folder / "walk.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
        image.convert("CMYK").save(folder / "cmyk.jpg")
        grey = np.asarray(image.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(grey).save(folder / "deep16.png")
    good += [folder / "walk.gif", folder / "cmyk.jpg", folder / "deep16.png"]
    bad = {}
    data = SHIPPED[42].read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    bad["cut.jpg"] = "corrupt image"
    (folder / "zero.jpg").write_bytes(b"")
    bad["zero.jpg"] = "empty file"
    (folder / "letter.png").write_text("Dear reader, this is not a picture.")
    bad["letter.png"] = "not a JPEG, PNG, WebP, BMP or GIF image"
    with Image.open(SHIPPED[43]) as image:
        image.save(folder / "tiff.png", format="TIFF")  # a format we do not serve, under a .png name
    bad["tiff.png"] = "not a JPEG, PNG, WebP, BMP or GIF image"
    _png_bomb(folder / "bomb.png")
    bad["bomb.png"] = "too large"
    big = folder / "huge.jpg"
    big.write_bytes(data + os.urandom(21 * 1024 * 1024))
    bad["huge.jpg"] = "file too large"
    (folder / "script.sh").write_text("rm -rf /")
    bad["script.sh"] = "unsupported file type"
    return good, bad


def _own_explorer(root: Path, images: int = 16) -> explorer_app.Explorer:
    """A tiny explorer on its own gallery copy whose uploads join the gallery, for tests that add files."""
    return tiny_explorer(root, images, seed=4, shared_uploads=True)


def _copy_of_its_checkpoint(explorer: explorer_app.Explorer, path: Path) -> Path:
    """The checkpoint the explorer serves (tiny_explorer's, beside its gallery), copied with its card to
    `path` (the served model itself is folded for serving and is never saved)."""
    served = next(explorer.engine.gallery.parent.glob("models/*.safetensors"))
    shutil.copy(served, path)
    shutil.copy(card_path(served), card_path(path))
    return path


def test_upload_batch_keeps_good_files_refuses_bad_ones(tmp_path: Path) -> None:
    explorer = _own_explorer(tmp_path / "own")
    before = {e.path for e in explorer.engine.index.entries}
    good, bad = _upload_batch(tmp_path / "incoming")
    report, _ = explorer.gallery.upload([str(p) for p in good] + [str(tmp_path / "incoming" / name) for name in bad])
    after = {e.path for e in explorer.engine.index.entries}
    assert before <= after  # nothing already in the gallery is lost
    assert len(after - before) == len(good), report
    for name, reason in bad.items():
        line = next(line for line in report.splitlines() if f"`{name}`" in line)
        assert reason in line, line
    # Every accepted image is searchable and renders its explanations.
    response = explorer.search("a person", 50)[2]
    files = {r.file for r in response.results}
    assert {f"uploads/{p.name}" for p in good} <= files


def test_odd_upload_names_are_stored_visibly_and_indexed(tmp_path: Path) -> None:
    explorer = _own_explorer(tmp_path / "own", images=4)
    incoming = tmp_path / "incoming"
    names = [".hidden.png", "..png", "....png", "..\\..\\evil3.png", "name with spaces;rm.png"]
    sources = []
    for i, name in enumerate(names):
        (incoming / str(i)).mkdir(parents=True)
        with Image.open(SHIPPED[60 + i]) as image:
            image.save(incoming / str(i) / name, format="PNG")
        sources.append(incoming / str(i) / name)
    report, _ = explorer.gallery.upload([str(p) for p in sources])
    assert f"Added {len(names)} image(s)" in report, report
    stored = sorted(f for f in explorer.engine.files() if f.startswith("uploads/"))
    assert len(stored) == len(names)
    assert all(not Path(f).name.startswith(".") and "\\" not in f and " " not in f for f in stored), stored
    assert "uploads/evil3.png" in stored and (explorer.engine.gallery / "uploads" / "evil3.png").is_file()


def test_concurrent_uploads_of_one_name_lose_nothing(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from lgur.model.checkpoint import checkpoint_fingerprint

    explorer = _own_explorer(tmp_path / "own", images=4)
    clients = []
    for i in range(8):  # eight visitors upload different pictures, six of them called hb.png
        folder = tmp_path / f"client{i}"
        folder.mkdir()
        name = "hb.png" if i < 6 else f"own-{i}.png"
        with Image.open(SHIPPED[80 + i]) as image:
            image.save(folder / name)
        clients.append(folder / name)
    with ThreadPoolExecutor(8) as pool:
        reports = list(pool.map(lambda p: explorer.gallery.upload([str(p)])[0], clients))
    assert all(r.startswith("Added 1 image(s)") for r in reports), reports
    stored = sorted((explorer.engine.gallery / "uploads").iterdir())
    assert len(stored) == 8
    stored_bytes = sorted(p.read_bytes() for p in stored)
    assert stored_bytes == sorted(p.read_bytes() for p in clients)  # every client's bytes, each once
    engine = explorer.engine
    on_disk = load_index(engine.gallery, engine.index_dir, checkpoint_fingerprint(engine.card))
    assert len(on_disk) == 12 and {f"uploads/{p.name}" for p in stored} <= {e.path for e in on_disk.entries}
    for thread in threading.enumerate():  # the start-up's atlas word table writes through a temporary too
        if thread.name == "warm-up":
            thread.join()
    assert not [p for p in engine.gallery.rglob(".*") if p.is_file() and p.name != ".lock"]  # no temporaries
    found = {f for f, _ in engine.search_ids("a person", 50)}
    assert {f"uploads/{p.name}" for p in stored} <= found  # every added file is searchable


def test_a_huge_query_is_cut_before_it_is_expanded() -> None:
    import tracemalloc

    tracemalloc.start()
    cleaned = clean_query("\ufdfa" * 1_000_000)  # 1 character, 18 after NFKC
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(cleaned) == 2000 and peak < 64 * 2**20, peak


# -- untrusted model files ------------------------------------------------------------------


def test_untrusted_model_files_are_refused(explorer: explorer_app.Explorer, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (marker.touch, ())

    import pickle

    (models / "model.pt").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="never loaded"):
        load_checkpoint(models / "model.pt", allowed_dirs=[models])
    assert not marker.exists()

    source = _copy_of_its_checkpoint(explorer, models / "ok.safetensors")
    from safetensors.torch import load_file, save_file

    state = load_file(str(source))
    state["pgu.prototypes"] = torch.zeros(3, 3)
    save_file(state, str(models / "shapes.safetensors"))
    card = json.loads(card_path(source).read_text())
    from lgur.model.checkpoint import sha256_file

    card["weights_sha256"] = sha256_file(models / "shapes.safetensors")
    card_path(models / "shapes.safetensors").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=r"pgu\.prototypes: file has \(3, 3\)"):
        load_checkpoint(models / "shapes.safetensors", allowed_dirs=[models])

    shutil.copy(source, models / "encoder.safetensors")
    card = json.loads(card_path(source).read_text())
    card["text_encoder"] = {"name": "bert-base-uncased", "fingerprint": "f" * 64, "source": "hub"}
    card_path(models / "encoder.safetensors").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="text encoder differs.*bert-base-uncased"):
        load_checkpoint(models / "encoder.safetensors", allowed_dirs=[models])

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(source, outside / "x.safetensors")
    shutil.copy(card_path(source), outside / "x.json")
    with pytest.raises(CheckpointError, match="outside the folders"):
        load_checkpoint(outside / "x.safetensors", allowed_dirs=[models])
    (models / "link.safetensors").symlink_to(outside / "x.safetensors")
    with pytest.raises(CheckpointError, match="outside the folders"):
        load_checkpoint(models / "link.safetensors", allowed_dirs=[models])
    with pytest.raises(CheckpointError, match="outside the folders"):
        load_checkpoint(models / ".." / "elsewhere" / "x.safetensors", allowed_dirs=[models])


# -- fuzzing ----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=300))
def test_fuzz_query_path(explorer: explorer_app.Explorer, text: str) -> None:
    try:
        cleaned = clean_query(text)
    except QueryError:
        return
    assert cleaned and len(cleaned) <= 2000
    hits = explorer.engine.search_ids(text, 3)
    assert len(hits) == 3 and all(np.isfinite(score) for _, score in hits)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.integers(-5, 20000), st.text(max_size=5), st.none()),
        "file_path": st.one_of(st.text(max_size=30), st.just("a.jpg"), st.just("../../etc/passwd"), st.integers()),
        "img_path": st.one_of(st.text(max_size=30), st.just("a.jpg")),
        "captions": st.one_of(st.lists(st.one_of(st.text(max_size=40), st.integers(), st.none()), max_size=3), JSONISH),
        "split": st.one_of(st.sampled_from(["train", "val", "test", "bogus"]), JSONISH),
    },
)


LAYOUTS = st.sampled_from(["reid_raw.json", "ICFG-PEDES.json", "data_captions.json", "captions.json"])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(ENTRY, JSONISH), max_size=8), LAYOUTS)
def test_fuzz_dataset_readers(tmp_path_factory: pytest.TempPathFactory, entries: list, name: str) -> None:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "imgs").mkdir()
    Image.new("RGB", (8, 16)).save(root / "imgs" / "a.jpg")
    (root / name).write_text(json.dumps(entries))
    try:
        records, report = read_dataset(root)
    except DatasetFormatError:
        return
    assert len(records) + report.skipped_total <= len(entries)
    for r in records:
        assert r.captions and r.image_path.is_file() and r.split in {"train", "val", "test", "test-paraphrase"}


# -- crash safety -------------------------------------------------------------------------------

UPLOAD_SCRIPT = """
import sys, time
from pathlib import Path
from lgur.app.explorer import create
explorer = create(Path(sys.argv[1]), Path(sys.argv[2]), progress=False, shared_uploads=True)
import lgur.search.index as I
original = I.index_arrays
def slow(*args, **kwargs):
    print("EMBEDDING", flush=True)
    time.sleep(0.3)
    return original(*args, **kwargs)
I.index_arrays = slow
files = sorted(Path(sys.argv[3]).iterdir())
explorer.gallery.upload([str(f) for f in files])
print("DONE", flush=True)
"""


@pytest.mark.slow
def test_sigkill_during_upload_indexing_loses_nothing(explorer: explorer_app.Explorer, tmp_path: Path) -> None:
    gallery = tmp_path / "gallery"
    (gallery / "images").mkdir(parents=True)
    for src in SHIPPED[:20]:
        shutil.copy(src, gallery / "images" / src.name)
    checkpoint = tmp_path / "tiny.safetensors"
    _copy_of_its_checkpoint(explorer, checkpoint)
    create(checkpoint, gallery, progress=False)  # a built, consistent index
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    for src in SHIPPED[100:150]:  # one full upload (the per-upload limit is 50 files)
        shutil.copy(src, incoming / src.name)
    before = {p.relative_to(gallery).as_posix() for p in gallery.rglob("*.jpg")}

    proc = subprocess.Popen(
        [sys.executable, "-c", UPLOAD_SCRIPT, str(checkpoint), str(gallery), str(incoming)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    embedded = 0
    for line in proc.stdout:
        embedded += line.startswith("EMBEDDING")
        if embedded == 1:  # copies done, embedding under way: kill before the index is written
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    accepted = {p.relative_to(gallery).as_posix() for p in (gallery / "uploads").glob("*.jpg")}
    assert len(accepted) == 50  # all copies had finished; indexing was interrupted
    from lgur.model.checkpoint import checkpoint_fingerprint, read_card

    stale = load_index(gallery.resolve(), gallery / ".lgur-index", checkpoint_fingerprint(read_card(checkpoint)))
    assert not accepted & {e.path for e in stale.entries}  # the kill came before the index was written
    restarted = create(checkpoint, gallery, progress=False)
    indexed = {e.path for e in restarted.engine.index.entries}
    assert before <= indexed and accepted <= indexed  # nothing lost
    fresh = load_index(gallery.resolve(), gallery / ".lgur-index", restarted.engine.index.checkpoint)
    assert len(fresh) == len(indexed)  # what is on disk verifies and matches
    assert not [p for p in gallery.rglob(".*") if p.is_file() and p.name != ".lock"]  # no temporaries left


# -- concurrency ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_memory_after_1000_sessions_is_bounded(explorer: explorer_app.Explorer) -> None:
    import secrets

    from lgur.eval.bench import PageClient

    with served_explorer(explorer) as (url, proc):
        pid = proc.pid
        page = PageClient(url)  # as a browser tab sends it (gradio_client would add its polling to every call)
        rss = {}
        for n in range(1, 1001):
            page.session = secrets.token_hex(8)  # a new visitor each time
            page.call("explore", [f"person number {n} in a red coat", 50, "last", "mean", "P1"])
            if n in (100, 1000):
                rss[n] = rss_mib(pid)
    print(f"resident memory after 100 / 1,000 sessions: {rss[100]:.0f} / {rss[1000]:.0f} MiB")
    assert rss[1000] <= 1.10 * rss[100], rss


@pytest.mark.slow
def test_sixteen_concurrent_clients(explorer: explorer_app.Explorer, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    # The shipped model on a small gallery: real query encoding, quick index.
    checkpoint = REPO / "assets" / "lgur_cpu.safetensors"
    if not checkpoint.is_file():
        pytest.fail("the shipped checkpoint is missing")
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for src in SHIPPED[:64]:
        shutil.copy(src, gallery / src.name)
    local = create(checkpoint, gallery, progress=False).engine  # also builds the index
    # Sixteen visitors, told apart by the address a Space's proxy reports (each may have 2 requests pending).
    with serve(checkpoint, gallery, LGUR_PROXY_HOPS="1") as (url, proc):
        pid = proc.pid
        colours = ["red", "blue", "green", "black", "white", "yellow", "pink", "grey"]
        garments = ["coat", "t-shirt", "jacket", "hoodie"]
        queries = [
            [f"{colours[(c + i) % 8]} {garments[(c * 3 + i) % 4]} person {c}-{i}" for i in range(25)] for c in range(16)
        ]

        def session(mine: list[str]) -> list[tuple[str, dict, float]]:
            address = "198.51.100." + re.search(r"person (\d+)-", mine[0]).group(1)  # one per visitor
            own = Client(url, verbose=False, download_files=False, headers={"x-forwarded-for": address})
            out = []
            for q in mine:
                start = time.perf_counter()
                out.append((q, own.predict(q, 5, api_name="/search"), time.perf_counter() - start))
            return out

        with ThreadPoolExecutor(16) as pool:
            # Warm-up with the same concurrency: each worker thread's allocator arena and the
            # server's thread pool grow once; a leak is growth that continues after that.
            list(pool.map(session, [[f"warm-up {q}" for q in mine[:5]] for mine in queries]))
            rss_warm = rss_mib(pid)
            answers = [a for chunk in pool.map(session, queries) for a in chunk]
        rss_after = rss_mib(pid)
    errors = [a for a in answers if "error" in a[1]]
    assert not errors and len(answers) == 400
    for query, result, _ in answers:  # each answer belongs to its own query
        assert result["query"] == clean_query(query)
        expected = [f for f, _ in local.search_ids(query, 5)]
        assert [r["file"] for r in result["results"]] == expected
    latencies = sorted(t for *_, t in answers)
    report = {
        "clients": 16,
        "queries": len(answers),
        "errors": len(errors),
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p95_ms": 1000 * latencies[int(0.95 * len(latencies))],
        "rss_after_warmup_mib": rss_warm,
        "rss_after_run_mib": rss_after,
    }
    (tmp_path / "concurrency.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))  # pytest -s shows the figures
    assert rss_after <= 1.10 * rss_warm, report
