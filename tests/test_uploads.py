"""Visitors' private uploads (lgur.app.uploads) and who a request comes from (lgur.app.visitors)."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from lgur.app.uploads import UploadLimits, UploadStore
from lgur.app.visitors import limit_per_visitor, visitor_address, visitor_limits
from lgur.eval.bench import PageClient as Visitor
from lgur.files import check_image, open_rgb
from lgur.search.gallery import PROCESS_FILE
from tests.conftest import REPO, served_explorer

SHIPPED = sorted((REPO / "gallery" / "images").glob("*.jpg"))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


EXPLORER = {"images": 6}  # the conftest fixture `explorer`


def _photos(folder: Path, count: int, start: int = 40) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(SHIPPED[start + i], folder / f"p{start + i}.jpg")) for i in range(count)]


def test_no_number_of_other_visitors_evicts_an_upload(explorer, tmp_path: Path) -> None:
    store = UploadStore(tmp_path / "sessions")
    for n in range(5):
        assert store.add(explorer.engine, f"visitor-{n}", _photos(tmp_path / f"in{n}", 1, 40 + n)).added
    for n in range(1000):  # throwaway sessions: they search, they look up nothing of anyone else's
        assert store.gallery(f"throwaway-{n}") is None
    assert all(len(store.gallery(f"visitor-{n}")) == 1 for n in range(5))


def test_the_sweeper_removes_stale_visitors_and_orphans_only(explorer, tmp_path: Path) -> None:
    clock = Clock()
    store = UploadStore(tmp_path / "sessions", UploadLimits(lifetime=100), clock=clock)
    store.add(explorer.engine, "old", _photos(tmp_path / "a", 1))
    store.add(explorer.engine, "active", _photos(tmp_path / "b", 1, 41))
    orphan = tmp_path / "sessions" / "images" / "left-by-a-crash"
    orphan.mkdir(parents=True)
    old, active = store.gallery("old"), store.gallery("active")
    clock.now = 90
    store.gallery("active")  # a search counts as a use
    clock.now = 150
    assert store.sweep() == 2  # the stale visitor and the orphan folder
    assert store.gallery("old") is None and not old.images.exists() and not old.index_dir.exists()
    assert not orphan.exists()
    assert store.gallery("active") is active and active.images.is_dir()
    assert store.usage() == (sum(p.stat().st_size for p in active.images.iterdir()), 1)


def test_a_visitor_who_leaves_loses_their_uploads_at_once(explorer, tmp_path: Path) -> None:
    explorer.gallery.store = UploadStore(tmp_path / "sessions")
    explorer.gallery.upload([str(p) for p in _photos(tmp_path / "in", 2)], "tab-1")
    folder = explorer.gallery.store.gallery("tab-1").images
    assert len(list(folder.iterdir())) == 2
    explorer.gallery.leave("tab-1")
    assert not folder.exists() and explorer.gallery.store.usage() == (0, 0)
    assert explorer.gallery.browse(1, "tab-1")[1].endswith("(0 uploaded, listed first).")


def test_the_store_has_a_quota_for_all_visitors_together(explorer, tmp_path: Path) -> None:
    photos = _photos(tmp_path / "in", 5)
    store = UploadStore(tmp_path / "sessions", UploadLimits(total_files=3, address_share=1.0))
    assert len(store.add(explorer.engine, "a", photos[:2], "10.0.0.1").added) == 2
    report = store.add(explorer.engine, "b", photos[2:], "10.0.0.2")
    assert len(report.added) == 1 and len(report.rejected) == 2
    assert all("space for uploads is full" in reason for _, reason in report.rejected)
    size = photos[0].stat().st_size
    by_bytes = UploadStore(tmp_path / "bytes", UploadLimits(total_bytes=size + 1, address_share=1.0))
    report = by_bytes.add(explorer.engine, "c", photos[:1] + photos[:1])
    assert len(report.added) == 1 and "space for uploads is full" in report.rejected[0][1]


def test_each_upload_is_stored_once(explorer, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    in_cache = [
        Path(shutil.copy(SHIPPED[50 + i], (cache / f"h{i}").mkdir(parents=True) or cache / f"h{i}")) for i in range(2)
    ]
    outside = _photos(tmp_path / "elsewhere", 1)
    store = UploadStore(tmp_path / "sessions", cache=cache)
    store.uploaded(in_cache, "10.0.0.1")  # as the upload route records them
    report = store.add(explorer.engine, "a", in_cache + outside, "10.0.0.1")
    assert len(report.added) == 3
    assert not any(p.exists() for p in in_cache) and not list(cache.iterdir())  # the cache copies are gone
    assert outside[0].exists()  # nothing outside the cache is ever deleted


def test_nothing_a_visitor_names_is_deleted_unless_they_uploaded_it(explorer, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    files = [
        Path(shutil.copy(SHIPPED[60 + i], (cache / f"h{i}").mkdir(parents=True) or cache / f"h{i}")) for i in range(3)
    ]
    theirs, app_output, mine = files  # another address's upload; a file the app put there (a plot); my own
    store = UploadStore(tmp_path / "sessions", cache=cache)
    store.uploaded([theirs], "10.0.0.2")
    store.uploaded([mine], "10.0.0.1")
    store.add(explorer.engine, "a", files, "10.0.0.1")  # named in my upload event
    with store.holding([theirs, app_output], "10.0.0.1"):  # and as my photo
        pass
    assert theirs.exists() and app_output.exists() and not mine.exists()


def test_an_upload_no_event_claims_is_swept(explorer, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    clock = SimpleNamespace(now=0.0)
    sent = Path(shutil.copy(SHIPPED[63], (cache / "h").mkdir(parents=True) or cache / "h"))
    store = UploadStore(tmp_path / "sessions", UploadLimits(unclaimed=60), cache=cache, clock=lambda: clock.now)
    store.uploaded([sent], "10.0.0.1")
    clock.now = 30
    store.sweep()
    assert sent.exists()
    clock.now = 61
    store.sweep()
    assert not sent.exists()


def test_one_address_holds_at_most_its_share_of_the_quota(explorer, tmp_path: Path) -> None:
    photos = _photos(tmp_path / "in", 6)
    store = UploadStore(tmp_path / "sessions", UploadLimits(total_files=8, address_share=0.25))  # 2 each
    added = [len(store.add(explorer.engine, f"throwaway-{n}", photos[n : n + 1], "10.0.0.1").added) for n in range(4)]
    assert added == [1, 1, 0, 0]  # its third session is refused: the address holds its share
    report = store.add(explorer.engine, "other", photos[4:6], "10.0.0.2")
    assert len(report.added) == 2  # another visitor is not locked out


def test_concurrent_uploads_of_one_visitor_share_one_folder_and_the_cap(explorer, tmp_path: Path) -> None:
    store = UploadStore(tmp_path / "sessions", UploadLimits(files_per_visitor=5))
    batches = [_photos(tmp_path / f"in{i}", 2, 40 + 2 * i) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        reports = list(pool.map(lambda files: store.add(explorer.engine, "one-tab", files), batches))
    assert sum(len(r.added) for r in reports) == 5
    refused = [reason for r in reports for _, reason in r.rejected]
    assert refused == ["your 5 uploads are used up"] * 3
    assert len(list((tmp_path / "sessions" / "images").iterdir())) == 1  # one folder, none orphaned
    assert len(store.gallery("one-tab")) == 5 == len(list(store.gallery("one-tab").images.iterdir()))


def test_uploads_beyond_the_concurrency_limit_wait_or_are_refused(explorer, tmp_path: Path) -> None:
    store = UploadStore(tmp_path / "sessions", UploadLimits(concurrent=1, wait=0.2))
    assert store._slots.acquire()  # another visitor's upload is being indexed
    report = store.add(explorer.engine, "a", _photos(tmp_path / "in", 1))
    assert not report.added and "busy with other uploads" in report.rejected[0][1]
    threading.Timer(0.1, store._slots.release).start()  # ... and ends in time for the next one
    assert len(store.add(explorer.engine, "a", _photos(tmp_path / "in2", 1, 45)).added) == 1


def test_pixel_caps_fit_a_person_photo(tmp_path: Path) -> None:
    flat = tmp_path / "flat.png"
    Image.new("L", (6300, 6300), 7).save(flat)  # 52 KB on disk, 40 megapixels
    start = time.perf_counter()
    assert "too large for a person photo" in check_image(flat)
    assert time.perf_counter() - start < 0.5  # refused from its header: nothing decoded
    grey16 = tmp_path / "grey16.png"
    Image.fromarray(np.full((4000, 3500), 60_000, dtype=np.uint16)).save(grey16)
    assert "too large for a person photo" in check_image(grey16)
    camera = tmp_path / "camera.jpg"
    Image.new("RGB", (6000, 4000), (200, 30, 30)).save(camera, quality=90)
    assert check_image(camera) is None  # a camera photo is fine ...
    decoded = open_rgb(camera)
    assert decoded.size == (1500, 1000) and decoded.getpixel((700, 500))[0] > 150  # ... read at 1/4 scale
    small = open_rgb(SHIPPED[0])
    with Image.open(SHIPPED[0]) as original:
        assert small.size == original.size  # the gallery's images are read as they are


def _request(host: str, *forwarded: str):
    """A request from `host` with one X-Forwarded-For header line per entry of `forwarded`."""
    from starlette.datastructures import Headers

    headers = Headers(raw=[(b"x-forwarded-for", line.encode()) for line in forwarded])
    return SimpleNamespace(headers=headers, client=SimpleNamespace(host=host))


def test_the_visitor_address_behind_trusted_proxies() -> None:
    assert visitor_address(_request("10.0.0.9")) == "10.0.0.9"
    assert visitor_address(_request("10.0.0.9", "203.0.113.7"), proxy_hops=0) == "10.0.0.9"  # not believed
    assert visitor_address(_request("10.0.0.9", "203.0.113.7"), proxy_hops=1) == "203.0.113.7"
    spoofed = "198.51.100.1, 198.51.100.2, 203.0.113.7"  # the client wrote the first two itself
    assert visitor_address(_request("10.0.0.9", spoofed), proxy_hops=1) == "203.0.113.7"
    assert visitor_address(_request("10.0.0.9", spoofed), proxy_hops=2) == "198.51.100.2"
    assert visitor_address(_request("10.0.0.9"), proxy_hops=1) == "10.0.0.9"  # no header: the peer
    # The client's own line first, the proxy's line after it: every line counts, from the right.
    for n in range(10):
        own = f"198.51.100.{n}"
        assert visitor_address(_request("10.0.0.9", own, "203.0.113.7"), proxy_hops=1) == "203.0.113.7"
    assert visitor_limits({}) == (2, 0) and visitor_limits({"SPACE_ID": "me/lgur"}) == (2, 1)
    assert visitor_limits({"LGUR_PER_VISITOR": "5", "LGUR_PROXY_HOPS": "2"}) == (5, 2)
    with pytest.raises(SystemExit, match="LGUR_PROXY_HOPS must be a whole number"):
        visitor_limits({"LGUR_PROXY_HOPS": "one"})


def test_the_queue_refuses_a_visitor_with_too_many_pending_requests() -> None:
    import asyncio

    accepted = []

    class Queue:  # the parts of gradio.queueing.Queue that the limit reads
        def __init__(self) -> None:
            self.event_queue_per_concurrency_id = {"explore": SimpleNamespace(queue=[])}
            self.active_jobs = [None, None]

        async def push(self, body, request, username):
            accepted.append(body)
            self.event_queue_per_concurrency_id["explore"].queue.append(SimpleNamespace(request=request))
            return True, f"event-{len(accepted)}", "success"

    queue = Queue()
    limit_per_visitor(queue, per_visitor=2, proxy_hops=1)

    def push(body: str, who: str):
        return asyncio.run(queue.push(body=body, request=_request("10.0.0.9", who), username=None))

    assert push("a1", "203.0.113.7")[0] and push("a2", "203.0.113.7")[0]
    refused = push("a3", "203.0.113.7")
    assert refused[0] is False and refused[2] == "queue_full" and "Too many requests from your address" in refused[1]
    assert push("b1", "198.51.100.4")[0]  # another visitor is not held back
    queue.event_queue_per_concurrency_id["explore"].queue.pop(0)  # one of the first visitor's finished
    assert push("a4", "203.0.113.7")[0]
    assert accepted == ["a1", "a2", "b1", "a4"]


# -- served: the app as a Space runs it ----------------------------------------------------------


def _timed_search(visitor: Visitor) -> float:
    start = time.perf_counter()
    (answer,) = visitor.call("search", ["a woman in a red coat", 5])
    assert answer["results"], answer
    return time.perf_counter() - start


@pytest.mark.slow
def test_served_uploads_outlive_any_number_of_other_sessions(explorer, tmp_path: Path) -> None:
    with served_explorer(explorer, LGUR_MAX_SESSIONS="5") as (url, _):
        visitors = [Visitor(url) for _ in range(3)]
        for n, visitor in enumerate(visitors):
            (report, *_) = visitor.call("upload_files", [visitor.upload(_photos(tmp_path / f"in{n}", 1, 60 + n))])
            assert report.startswith("Added 1 image(s)"), report
        for n in range(20):  # four times the sessions whose page state the server keeps
            Visitor(url).call("explore", [f"person {n} in red", 5, "last", "mean", "P1"])
        for visitor in visitors:
            _, where = visitor.call("browse", [1])
            assert "(1 uploaded, listed first)" in where, where


@pytest.mark.slow
def test_a_flooding_visitor_cannot_lock_out_another(explorer) -> None:
    with served_explorer(explorer, LGUR_PROXY_HOPS="1") as (url, _):
        other = Visitor(url, "198.51.100.20")
        baseline = [_timed_search(other) for _ in range(12)]
        stop, refused, served = threading.Event(), [], []

        def flood() -> None:  # one of many sessions from one address, re-running the heaviest event
            mine = Visitor(url, "203.0.113.66")
            while not stop.is_set():
                try:
                    mine.call("explore", ["flood", 50, "last", "mean", "P1"])
                    served.append(1)
                except RuntimeError as error:
                    refused.append(str(error))
                    time.sleep(0.2)

        with ThreadPoolExecutor(16) as pool:
            for _ in range(16):
                pool.submit(flood)
            time.sleep(2.0)
            during = [_timed_search(other) for _ in range(12)]  # a refusal would raise here
            stop.set()
    print(
        f"search median {1000 * np.median(baseline):.0f} ms alone, {1000 * np.median(during):.0f} ms during a "
        f"flood ({len(served)} flood requests served, {len(refused)} refused)"
    )
    assert served and refused and all("Too many requests from your address" in r for r in refused)
    # The target (within 3x) is measured by `python -m lgur bench hostile`; on 2 shared cores a test
    # only guards against a stall (before the per-visitor limit: refused outright, "Queue is full").
    assert np.median(during) <= 10 * np.median(baseline)


@pytest.mark.slow
def test_costly_pictures_are_refused_cheaply_while_others_search(explorer, tmp_path: Path) -> None:
    from lgur.eval.bench import rss_mib

    flat = tmp_path / "flat.png"
    Image.new("L", (6300, 6300), 7).save(flat)  # tens of KB, 40 megapixels
    for n in range(4):  # different bytes for every file (a trailer after the image's end), as a hostile script sends
        (tmp_path / str(n)).mkdir()
        for i in range(8):
            (tmp_path / str(n) / f"flat{i}.png").write_bytes(flat.read_bytes() + f"{n}-{i}".encode())
    with served_explorer(explorer, LGUR_PROXY_HOPS="1") as (url, proc):
        other = Visitor(url, "198.51.100.20")
        baseline = [_timed_search(other) for _ in range(12)]
        start_rss, peak = rss_mib(proc.pid), [0.0]
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mib(proc.pid))
                time.sleep(0.05)

        def upload(n: int) -> str:  # four visitors, eight such pictures each
            visitor = Visitor(url, f"203.0.113.{n + 1}")
            return visitor.call("upload_files", [visitor.upload(sorted((tmp_path / str(n)).iterdir()))])[0]

        watcher = threading.Thread(target=watch)
        watcher.start()
        with ThreadPoolExecutor(4) as pool:
            reports = pool.map(upload, range(4))
            during = [_timed_search(other) for _ in range(12)]
            reports = list(reports)
        stop.set()
        watcher.join()
    print(
        f"search median {1000 * np.median(baseline):.0f} ms alone, {1000 * np.median(during):.0f} ms during "
        f"the uploads; server {start_rss:.0f} MiB, peak {peak[0]:.0f} MiB"
    )
    for report in reports:
        assert report.startswith("Added 0 image(s)") and report.count("too large for a person photo") == 8, report
    assert np.median(during) <= 10 * np.median(baseline)  # the 2x target: `python -m lgur bench hostile`
    assert peak[0] - start_rss < 500


@pytest.mark.slow
def test_a_dead_servers_upload_cache_is_removed_at_restart(explorer, tmp_path: Path) -> None:
    with served_explorer(explorer) as (url, proc):
        cached = Path(Visitor(url).upload(_photos(tmp_path / "in", 1))[0]["path"])  # never added: only cached
        assert cached.is_file()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert cached.is_file()  # what a crash leaves behind ...
    with served_explorer(explorer):
        assert not cached.exists()  # ... the next start removes


@pytest.mark.slow
def test_closing_the_page_deletes_the_uploads(explorer, tmp_path: Path) -> None:
    import tempfile

    with served_explorer(explorer) as (url, proc):
        visitor = Visitor(url)
        (server,) = [
            f
            for f in (Path(tempfile.gettempdir()) / "lgur-sessions").iterdir()
            if (f / PROCESS_FILE).is_file() and (f / PROCESS_FILE).read_text() == str(proc.pid)
        ]
        uploads = server / "uploads" / "images"
        with visitor.http.stream("GET", f"{visitor.url}/gradio_api/heartbeat/{visitor.session}"):  # the open page
            visitor.call("upload_files", [visitor.upload(_photos(tmp_path / "in", 1))])
            (folder,) = uploads.iterdir()
            assert len(list(folder.iterdir())) == 1
        deadline = time.time() + 20
        while folder.exists() and time.time() < deadline:  # the page closed: Gradio's unload event
            time.sleep(0.2)
        assert not folder.exists()


def test_the_upload_route_is_metered_per_address(explorer, tmp_path: Path) -> None:
    """POST /gradio_api/upload counts against the sending address (60 uploads per 10 minutes), and a
    cache file one address sent is never deleted by another's event."""
    photo = _photos(tmp_path / "in", 1)[0]
    with served_explorer(explorer, LGUR_PROXY_HOPS="1") as (url, _):
        flooder = Visitor(url)
        flooder.http.headers["x-forwarded-for"] = "203.0.113.66"
        codes = [
            flooder.http.post(
                f"{flooder.url}/gradio_api/upload", files=[("files", (photo.name, photo.read_bytes()))]
            ).status_code
            for _ in range(61)
        ]
        assert codes[:60] == [200] * 60 and codes[60] == 429
        victim = Visitor(url)
        victim.http.headers["x-forwarded-for"] = "203.0.113.7"
        (sent,) = victim.upload([photo])  # another address is metered on its own
        thief = Visitor(url)
        thief.http.headers["x-forwarded-for"] = "203.0.113.66"
        thief.call("upload_files", [[sent]])  # names the victim's cache copy in its own upload event
        assert Path(sent["path"]).is_file()  # not deleted: the victim's address sent it


@pytest.mark.slow
def test_uploads_are_shown_from_their_one_copy_to_their_address_only(explorer, tmp_path: Path) -> None:
    """The gallery and the results show a visitor's upload by its URL on the upload route: Gradio's cache
    gets no second copy, another address is told 404, and the URL is gone once the page closes."""
    photo = _photos(tmp_path / "in", 1)[0]
    with served_explorer(explorer, LGUR_PROXY_HOPS="1") as (url, _):
        visitor = Visitor(url, address="203.0.113.7")
        with visitor.http.stream("GET", f"{visitor.url}/gradio_api/heartbeat/{visitor.session}"):  # the open page
            (sent,) = visitor.upload([photo])
            cache = Path(sent["path"]).parents[1]
            report, shown, *_ = visitor.call("upload_files", [[sent]])
            assert "Added 1" in report
            link = shown[0]["image"]["url"]
            assert "/uploads/" in link and link.endswith(photo.name), link
            assert visitor.http.get(link).status_code == 200
            copies = [p for p in cache.rglob("*") if p.is_file() and p.read_bytes() == photo.read_bytes()]
            assert copies == []  # the cache copy deleted once stored, and none made to show it
            results, *_ = visitor.call("explore", ["a person", 50, "last", "mean", "P1"])
            results = results["value"] if isinstance(results, dict) else results
            assert any("/uploads/" in (r["image"].get("url") or "") for r in results)
            assert Visitor(url, address="198.51.100.9").http.get(link).status_code == 404
            assert visitor.http.get(link.replace(photo.name, "..%2Fx.jpg")).status_code == 404
        deadline = time.time() + 20  # the page closed: Gradio's unload event
        while visitor.http.get(link).status_code == 200 and time.time() < deadline:
            time.sleep(0.2)
        assert visitor.http.get(link).status_code == 404


@pytest.mark.slow
def test_search_by_photo_takes_an_uploaded_photo_through_the_api(explorer, tmp_path: Path) -> None:
    """gradio_client's handle_file: the photo is checked as the page's upload is, searched, and its cache
    copy deleted; a path the client did not upload is refused."""
    from gradio_client import Client, handle_file

    expected = explorer.engine.files()[5]
    with served_explorer(explorer) as (url, _):
        client = Client(url, verbose=False, download_files=False)
        own = client.predict(handle_file(str(explorer.engine.gallery / expected)), 4, api_name="/search_by_photo")
        assert own["results"][0]["file"] == expected  # an uploaded copy of a gallery image finds it first
        text = tmp_path / "notes.png"
        text.write_text("not an image")
        refused = client.predict(handle_file(str(text)), 4, api_name="/search_by_photo")
        assert "cannot be used" in refused["error"] and str(tmp_path) not in str(refused)
        named = {"path": str(explorer.engine.gallery / expected), "meta": {"_type": "gradio.FileData"}}
        (answer,) = Visitor(url).call("search_by_photo", [named, 4])  # a raw request: no upload made
        assert "Upload the photo" in answer["error"]


@pytest.mark.slow
def test_a_visitor_deletes_their_uploads_one_or_all(explorer, tmp_path: Path) -> None:
    """Gone at once from the folder, the index (search) and the upload route; another session's names
    are ignored."""
    photos = _photos(tmp_path / "in", 3)
    with served_explorer(explorer) as (url, _):
        visitor, other = Visitor(url), Visitor(url)
        *_, listed = visitor.call("upload_files", [visitor.upload(photos)])
        names = [c[0] if isinstance(c, list) else c for c in listed["choices"]]
        assert sorted(names) == sorted(p.name for p in photos)
        shown, _ = visitor.call("browse", [1])
        links = {item["caption"]: item["image"]["url"] for item in shown[: len(photos)]}
        report, *_ = other.call("delete_uploads", [names])
        assert "None of those" in report and visitor.http.get(links[names[0]]).status_code == 200
        report, shown, *_ = visitor.call("delete_uploads", [[names[0]]])
        assert "Deleted 1" in report and visitor.http.get(links[names[0]]).status_code == 404
        assert names[0] not in [item["caption"] for item in shown]
        results, *_ = visitor.call("explore", ["a person", 50, "last", "mean", "P1"])
        results = results["value"] if isinstance(results, dict) else results
        shown_results = [r["image"].get("url") or "" for r in results]
        assert not any(links[names[0]] == u for u in shown_results)
        assert sum("/uploads/" in u for u in shown_results) == 2  # the other two are still searched
        report, *_ = visitor.call("delete_all_uploads", [])
        assert "Deleted 2" in report and all(visitor.http.get(u).status_code == 404 for u in links.values())
