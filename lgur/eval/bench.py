"""Benchmarks: scripts that measure and print figures (and JSON), never timed tests."""

from __future__ import annotations

import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..model.config import preset
from ..model.lgur import LGUR
from ..model.serving import fold_for_serving, parameter_counts

SAMPLE_CAPTION = (
    "A young woman with long black hair wears a red coat over a white shirt, blue jeans and white sneakers. "
    "She carries a black backpack on her shoulders."
)


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return {"p50_ms": pick(0.5) * 1e3, "p95_ms": pick(0.95) * 1e3, "n": len(ordered)}


@torch.inference_mode()
def bench_model(preset_name: str, batch: int = 8, repeats: int = 5) -> dict[str, Any]:
    """Parameter counts and median forward time per image and per caption (retrieval path)."""
    config = preset(preset_name)
    config.image.pretrained = False  # a benchmark needs no download
    config.text.allow_random_init = True  # the paper's BERT-base is not shipped; its shape is what counts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LGUR(config).eval()
    h, w = config.image.img_size
    images = torch.randn(batch, 3, h, w)
    ids, mask = model.tokenize([SAMPLE_CAPTION] * batch)
    image_s = median_seconds(lambda: model.embed_images(images), repeats)
    text_s = median_seconds(lambda: model.embed_texts(ids, mask), repeats)
    counts = parameter_counts(model)
    return {
        "preset": preset_name,
        "text_encoder": f"{config.text.name} ({model.text_encoder.source})",
        "image_size": [h, w],
        "patch_grid": list(model.image_encoder.grid),
        "atoms": config.num_atoms,
        "prototypes": config.num_prototypes,
        "embedding_dim": config.embedding_dim,
        "params_trainable": counts["trainable"],
        "params_frozen": counts["frozen"],
        "batch": batch,
        "ms_per_image": image_s / batch * 1e3,
        "ms_per_caption": text_s / batch * 1e3,
        "caption_tokens": int(mask.sum(1)[0]),
    }


def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }


def _timed(fn: Callable[[str], object], queries: list[str], clear: Callable[[], None] | None = None) -> list[float]:
    samples = []
    for q in queries:
        if clear:
            clear()
        start = time.perf_counter()
        fn(q)
        samples.append(time.perf_counter() - start)
    return samples


def bench_search(
    checkpoint: str, gallery: str, repeats: int | None = None, big: int = 100_000, seed: int = 0
) -> dict[str, Any]:
    """p50/p95 of: the text encoder alone, search (ids + scores), the full response with explanations
    for 10 results, on the gallery and on a `big` gallery of synthetic embeddings; indexing throughput."""
    import tempfile

    import numpy as np

    from ..model.checkpoint import checkpoint_fingerprint, load_checkpoint
    from ..search.engine import SearchEngine, read_manifest
    from ..search.index import EXACT_LIMIT, GalleryIndex, update_index

    repeats = repeats or 50
    model, card = load_checkpoint(checkpoint)
    fold_for_serving(model)  # as the app serves it (SearchEngine.open)
    fingerprint = checkpoint_fingerprint(card)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        index, report = update_index(model, fingerprint, gallery, tmp)
        indexing_seconds = time.perf_counter() - start
    engine = SearchEngine(model, index, card, read_manifest(Path(gallery)))
    manifest = list(engine.manifest.values())
    rng = np.random.default_rng(seed)
    captions = [c for m in manifest for c in m.get("captions", [])] or [SAMPLE_CAPTION]
    queries = [captions[i] for i in rng.choice(len(captions), size=repeats + 5, replace=len(captions) < repeats + 5)]
    warm, queries = queries[:5], queries[5:]
    for q in warm:
        engine.search(q, 10)

    @torch.inference_mode()
    def text_encoder_alone(q: str) -> None:
        ids, mask = model.tokenize([q])
        model.text_encoder(ids, mask)

    rows: dict[str, Any] = {}
    rows["text_encoder"] = percentiles(_timed(text_encoder_alone, queries))
    rows["search_ids"] = percentiles(_timed(lambda q: engine.search_ids(q, 10), queries, engine.clear_cache))
    rows["full_response_10"] = percentiles(_timed(lambda q: engine.search(q, 10), queries, engine.clear_cache))
    for q in queries:  # warm the query cache: repeated queries skip the text encoder
        engine.search_ids(q, 10)
    rows["cached_query_search"] = percentiles(_timed(lambda q: engine.search_ids(q, 10), queries))

    # A big gallery of synthetic embeddings (only search depends on gallery size): the real gallery's
    # embeddings, perturbed, so the big gallery is distributed like a real one.
    dim = index.embeddings.shape[1]
    base = index.embeddings[rng.integers(0, len(index), size=big)]
    fake = base + rng.normal(scale=0.5 / np.sqrt(dim), size=base.shape).astype(np.float32)
    fake /= np.linalg.norm(fake, axis=1, keepdims=True)
    big_index = GalleryIndex(Path(gallery), [], {"embeddings": fake}, fingerprint)
    start = time.perf_counter()
    big_index.build_faiss()
    build_seconds = time.perf_counter() - start
    assert len(big_index) == big
    rows[f"search_ids_{big}"] = percentiles(
        _timed(lambda q: big_index.search(engine.embed_query(q)[None], 10), queries, engine.clear_cache)
    )
    exact = GalleryIndex(Path(gallery), [], {"embeddings": fake}, fingerprint)
    import faiss

    exact.faiss_index = faiss.IndexFlatIP(dim)
    exact.faiss_index.add(fake)
    rows[f"search_ids_{big}_exact"] = percentiles(
        _timed(lambda q: exact.search(engine.embed_query(q)[None], 10), queries, engine.clear_cache)
    )
    text_p50 = rows["text_encoder"]["p50_ms"]
    search_p50 = rows["search_ids"]["p50_ms"]
    return {
        "benchmark": "search",
        "environment": environment(),
        "checkpoint": str(checkpoint),
        "gallery": {"path": str(gallery), "images": len(index), "index": index.kind},
        "indexing": {
            "images": report.embedded,
            "seconds": round(indexing_seconds, 2),
            "images_per_second": round(report.embedded / indexing_seconds, 1),
        },
        "latency": rows,
        "big_gallery": {
            "images": big,
            "index": big_index.kind,
            "exact_limit": EXACT_LIMIT,
            "build_seconds": round(build_seconds, 2),
            "approximate_recall_at_10": big_index.approximate_recall_at_10,
        },
        "ratios": {
            "search_over_text_encoder": round(search_p50 / text_p50, 3),
            "big_over_shipped_search": round(rows[f"search_ids_{big}"]["p50_ms"] / search_p50, 3),
            "big_exact_over_shipped_search": round(rows[f"search_ids_{big}_exact"]["p50_ms"] / search_p50, 3),
        },
        "targets": {
            "search_over_text_encoder": "<= 1.5",
            "full_response_10_p50_ms": "<= 300",
            "big_over_shipped_search": "<= 2",
            "indexing_images_per_second": ">= 100",
        },
    }


def format_search(result: dict[str, Any]) -> str:
    lines = [f"gallery: {result['gallery']['images']} images ({result['gallery']['index']})"]
    for name, row in result["latency"].items():
        lines.append(f"  {name:28s} p50 {row['p50_ms']:8.2f} ms   p95 {row['p95_ms']:8.2f} ms   (n={row['n']})")
    big = result["big_gallery"]
    recall = big["approximate_recall_at_10"]
    lines.append(
        f"big gallery: {big['images']} synthetic embeddings, index {big['index']}"
        + (f", recall@10 vs exact {recall:.3f}" if recall is not None else "")
    )
    lines.append(f"indexing: {result['indexing']['images_per_second']} images/s")
    lines.append("ratios: " + ", ".join(f"{k} {v}" for k, v in result["ratios"].items()))
    return "\n".join(lines)


def rss_mib(pid: int) -> float:
    """Resident memory of a process, MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PageClient:
    """What a browser tab sends, over raw HTTP: its own session, any event of the page by its
    api_name (documented or not), uploads into Gradio's cache; from `address` as a Space's proxy
    reports it (X-Forwarded-For; the app must be started with LGUR_PROXY_HOPS=1 to believe it)."""

    def __init__(self, url: str, address: str | None = None) -> None:
        import secrets

        import httpx

        self.url = url.rstrip("/")
        self.session = secrets.token_hex(8)
        self.http = httpx.Client(headers={"x-forwarded-for": address} if address else {}, timeout=120)
        config = self.http.get(f"{self.url}/config").json()
        self.events = {d["api_name"]: d["id"] for d in config["dependencies"] if d.get("api_name")}

    def upload(self, paths: list[Path]) -> list[dict]:
        """The files in Gradio's upload cache, as the upload box sends them: -> FileData values."""
        sent = [("files", (p.name, p.read_bytes())) for p in paths]
        stored = self.http.post(f"{self.url}/gradio_api/upload", files=sent).json()
        return [{"path": s, "orig_name": p.name, "meta": {"_type": "gradio.FileData"}} for s, p in zip(stored, paths)]

    def join(self, event: str, data: list) -> Any:
        """Queue one event: -> the HTTP response (503 when refused)."""
        body = {
            "data": data,
            "fn_index": self.events[event],
            "session_hash": self.session,
            "event_data": None,
            "trigger_id": None,
        }
        return self.http.post(f"{self.url}/gradio_api/queue/join", json=body)

    def call(self, event: str, data: list) -> list:
        """Queue one event and wait for its output values (RuntimeError if refused or failed)."""
        import json

        joined = self.join(event, data)
        if joined.status_code != 200:
            raise RuntimeError(f"refused ({joined.status_code}): {joined.text}")
        event_id = joined.json()["event_id"]
        stream = f"{self.url}/gradio_api/queue/data"
        with self.http.stream("GET", stream, params={"session_hash": self.session}) as lines:
            for line in lines.iter_lines():
                message = json.loads(line[5:]) if line.startswith("data:") else {}
                if message.get("msg") == "process_completed" and message.get("event_id") == event_id:
                    if not message.get("success"):
                        raise RuntimeError(f"failed: {message}")
                    return message["output"]["data"]
        raise RuntimeError("the event stream ended without the event's output")

    def show(self, values: list) -> list:
        """Fetch every file an event's output values point to, as the page does to draw them: -> values."""

        def urls(value: Any) -> list[str]:
            if isinstance(value, dict):
                own = [value["url"]] if isinstance(value.get("url"), str) else []
                return own + [u for v in value.values() for u in urls(v)]
            return [u for v in value for u in urls(v)] if isinstance(value, list) else []

        for url in urls(values):
            self.http.get(url).raise_for_status()
        return values


def start_app(
    app: str | Path, checkpoint: str, gallery: str, port: int, env: dict[str, str] | None = None
) -> tuple[Any, str, float]:
    """`python app.py` as a user starts it: -> (process, url, seconds until it answered)."""
    import os
    import subprocess
    import sys
    import urllib.request

    app = Path(app)
    if not app.is_file():
        raise SystemExit(f"no app at {app}: run from the repository root or pass --app PATH")
    cmd = [sys.executable, str(app), "--port", str(port), "--checkpoint", str(checkpoint), "--gallery", str(gallery)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=1) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
            if time.perf_counter() - start > 600:
                raise RuntimeError("app did not start within 10 minutes")
    except BaseException:
        proc.terminate()
        raise
    return proc, url, time.perf_counter() - start


def bench_app(
    checkpoint: str,
    gallery: str,
    repeats: int | None = None,
    port: int = 7899,
    seed: int = 0,
    app: str | Path = "app.py",
) -> dict[str, Any]:
    """Start `python app.py` (the repository's, by default from the current folder) as a user would,
    then time full queries through its API.

    Reports cold start to ready (index already built), resident memory, and p50/p95 of a query
    answered with 10 results and the first result's explanation panels (`/explore`), of the same
    followed by the step the page runs next (`/explore_details`: which words mattered, the guidance
    map of the word that mattered most, the atom atlas), and of `/search` (JSON). Each as a browser
    tab sends it (PageClient: the event queued, its answer pushed to the open stream). `/explore` also
    with every image of its answer then fetched one after another (a browser fetches them side by
    side), and through gradio_client, whose answer arrives up to 50 ms late because it polls for it.
    """
    import numpy as np
    from gradio_client import Client

    from ..search.engine import read_manifest

    repeats = repeats or 30
    proc, url, ready = start_app(app, checkpoint, gallery, port)
    try:
        rss_ready = rss_mib(proc.pid)
        page = PageClient(url)
        captions = [c for m in read_manifest(Path(gallery)).values() for c in m.get("captions", [])] or [SAMPLE_CAPTION]
        rng = np.random.default_rng(seed)
        picked = rng.choice(len(captions), size=5 * repeats + 3, replace=len(captions) < 5 * repeats + 3)
        queries = [captions[i] for i in picked]
        rounds = [queries[3 + r * repeats : 3 + (r + 1) * repeats] for r in range(5)]  # unseen queries each

        def explore(q: str) -> list:
            return page.call("explore", [q, 10, "last", "mean", "P1"])

        def explore_then_details(q: str) -> None:  # as the page does: the second step once the first is drawn
            atom = explore(q)[-1]["value"]
            page.call("explore_details", [None, None, "last", "mean", "P1", atom])  # the states: the server's

        for q in queries[:3]:
            explore_then_details(q)
        full = _timed(explore, rounds[0])
        drawn = _timed(lambda q: page.show(explore(q)), rounds[1])
        every = _timed(explore_then_details, rounds[2])
        plain = _timed(lambda q: page.call("search", [q, 10]), rounds[3])
        client = Client(url, verbose=False, download_files=False)
        polled = _timed(lambda q: client.predict(q, 10, "last", "mean", "P1", api_name="/explore"), rounds[4])
        rss_after = rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {
        "benchmark": "app",
        "environment": environment(),
        "cold_start_to_ready_s": round(ready, 2),
        "rss_ready_mib": round(rss_ready, 1),
        "rss_after_queries_mib": round(rss_after, 1),
        "explore_full_response_10": percentiles(full),
        "explore_with_images_10": percentiles(drawn),
        "explore_then_details_10": percentiles(every),
        "search_json_10": percentiles(plain),
        "explore_gradio_client_10": percentiles(polled),
        "targets": {"explore_full_response_10_p50_ms": "<= 300", "cold_start_s": "<= 20", "rss_mib": "<= 2048"},
    }


def bench_hostile(
    checkpoint: str, gallery: str, seconds: float = 20.0, port: int = 7898, app: str | Path = "app.py"
) -> dict[str, Any]:
    """Another visitor's `/search` while hostile visitors load the app (behind a proxy, as on a Space):
    1. alone; 2. while one address floods `/explore` (k=50) from 32 sessions; 3. while 4 visitors
    each upload 8 one-colour 6300x6300 PNGs (40 megapixels in ~50 KB each). Medians, refusals, and
    the server's resident memory at its peak."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from ..search.engine import read_manifest

    captions = [c for m in read_manifest(Path(gallery)).values() for c in m.get("captions", [])] or [SAMPLE_CAPTION]
    proc, url, _ = start_app(app, checkpoint, gallery, port, env={"LGUR_PROXY_HOPS": "1"})
    other = PageClient(url, "198.51.100.20")
    refused_other, asked = [], iter(range(10**9))

    def search_for(duration: float) -> list[float]:
        times, end = [], time.perf_counter() + duration
        while time.perf_counter() < end:
            start = time.perf_counter()
            try:  # a different description each time: no cached query encoding
                other.call("search", [captions[next(asked) % len(captions)], 10])
                times.append(time.perf_counter() - start)
            except RuntimeError as error:
                refused_other.append(str(error))
        return times

    peak, stop = [0.0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mib(proc.pid))
            time.sleep(0.05)

    try:
        search_for(2.0)  # warm-up
        alone = search_for(seconds)
        # The flooding client runs in its own process at the lowest priority: on a Space its CPU is
        # the attacker's, not the server's; here it shares the two cores, so it must not outrun them.
        flooder = subprocess.Popen(
            [sys.executable, "-m", "lgur.eval.bench", url, str(seconds + 4.0)],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: os.nice(19),
        )
        time.sleep(2.0)
        during_flood = search_for(seconds)
        served, refused = json.loads(flooder.communicate(timeout=120)[0])
        with tempfile.TemporaryDirectory() as folder:
            flat = Path(folder) / "flat.png"
            Image.new("L", (6300, 6300), 7).save(flat)
            for n in range(4):
                (Path(folder) / str(n)).mkdir()
                for i in range(8):  # different bytes each, as a hostile script sends
                    (Path(folder) / str(n) / f"flat{i}.png").write_bytes(flat.read_bytes() + f"{n}-{i}".encode())
            start_rss = rss_mib(proc.pid)
            watcher = threading.Thread(target=watch)
            watcher.start()

            def upload(n: int) -> str:
                visitor = PageClient(url, f"203.0.113.{n + 1}")
                files = visitor.upload(sorted((Path(folder) / str(n)).iterdir()))
                return visitor.call("upload_files", [files])[0]

            with ThreadPoolExecutor(4) as pool:
                reports = pool.map(upload, range(4))
                during_uploads = search_for(min(seconds, 10.0))
                reports = list(reports)
            stop.set()
            watcher.join()
    finally:
        stop.set()
        proc.terminate()
        proc.wait(timeout=30)
    p50 = {
        k: percentiles(v)["p50_ms"] for k, v in (("alone", alone), ("flood", during_flood), ("uploads", during_uploads))
    }
    return {
        "benchmark": "hostile",
        "environment": environment(),
        "search_alone": percentiles(alone),
        "search_during_flood": percentiles(during_flood),
        "search_during_costly_uploads": percentiles(during_uploads),
        "flood_requests_served": served,
        "flood_requests_refused": refused,
        "other_visitor_refused": len(refused_other),
        "uploads_refused_files": sum(r.count("too large for a person photo") for r in reports),
        "rss_before_uploads_mib": round(start_rss, 1),
        "rss_peak_during_uploads_mib": round(peak[0], 1),
        "ratios": {"flood": round(p50["flood"] / p50["alone"], 2), "uploads": round(p50["uploads"] / p50["alone"], 2)},
        "targets": {"flood": "<= 3x, never refused", "uploads": "<= 2x, peak <= +500 MiB"},
    }


MODEL_COLUMNS = [
    "preset",
    "patch_grid",
    "atoms",
    "prototypes",
    "embedding_dim",
    "params_trainable",
    "params_frozen",
    "ms_per_image",
    "ms_per_caption",
]


def _cell(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def format_model(rows: list[dict[str, Any]], keys: list[str] = MODEL_COLUMNS) -> str:
    """The model benchmark as an aligned table."""
    widths = {k: max(len(k), *(len(_cell(r.get(k))) for r in rows)) for k in keys}
    lines = ["  ".join(k.ljust(widths[k]) for k in keys)]
    lines += ["  ".join(_cell(r.get(k)).ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def flood(url: str, seconds: float, sessions: int = 32) -> tuple[int, int]:
    """One address re-running `/explore` (k=50) from many sessions, retrying at once when refused:
    -> (requests served, requests refused)."""
    from concurrent.futures import ThreadPoolExecutor

    served, refused, end = [], [], time.perf_counter() + seconds

    def one_session() -> None:
        mine = PageClient(url, "203.0.113.66")
        while time.perf_counter() < end:
            try:
                mine.call("explore", ["flood", 50, "last", "mean", "P1"])
                served.append(1)
            except RuntimeError:
                refused.append(1)

    with ThreadPoolExecutor(sessions) as pool:
        list(pool.map(lambda _: one_session(), range(sessions)))
    return len(served), len(refused)


if __name__ == "__main__":  # the flooding client of bench_hostile, in a process of its own
    import json
    import sys

    print(json.dumps(flood(sys.argv[1], float(sys.argv[2]))))
