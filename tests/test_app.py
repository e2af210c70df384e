"""The Gradio explorer: event functions called directly, the /search API, and a real browser."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app as explorer_app
from lgur.app.explorer import Choices, server_address
from lgur.app.server import add_gallery_route, launch_options
from lgur.app.uploads import UploadStore
from lgur.model.checkpoint import resolve_checkpoint
from lgur.search.engine import word_effects
from tests.conftest import REPO, free_port, served_app, tiny_explorer

QUERY = "a woman in a red coat with a black backpack"


def test_search_and_explain_events(explorer: explorer_app.Explorer) -> None:
    items, status, response = explorer.search(QUERY, 5)
    assert len(items) == 5 and all(Path(path).is_file() for path, _ in items)
    assert "5 results" in status
    maps, words, chart, foreground, summary, atom_choices = explorer.explain(response, 1, "last", "mean", "P2")
    assert len(maps) == explorer.engine.model.config.num_prototypes + 1
    assert all(isinstance(image, Image.Image) for image, _ in maps)
    shares = [float(caption.split("%")[0]) for _, caption in maps[:-1]]  # "38% P2 ...": the share shows first
    assert all(caption.split("% ", 1)[1].startswith(f"P{i + 1}") for i, (_, caption) in enumerate(maps[:-1]))
    assert abs(sum(shares) - 100) <= len(shares)  # rounded shares of the score
    assert maps[-1][1].startswith("all") and maps[-1][0].height > maps[0][0].height  # the combined map's legend
    assert [w for w, _ in words] == response.query.words and max(v for _, v in words) == pytest.approx(1.0)
    assert isinstance(chart, Image.Image) and chart.width > 300
    assert isinstance(foreground, Image.Image)
    assert "Result #2" in summary
    assert not explorer._left_out  # the words are scored in the second step, not the first
    result = response.results[1]
    assert [int(v) for _, v in atom_choices.choices] == [
        a for a in result.salient_atoms if a in result.shared_atoms
    ] + [a for a in result.salient_atoms if a not in result.shared_atoms]
    assert atom_choices.value == atom_choices.choices[0][1]
    word_choices, guidance, atlas, atlas_words, mattered = explorer.details(
        response, 1, "last", "mean", "P2", atom_choices.value
    )
    assert word_choices.choices[0] == "1: a"
    # No panel opens empty: the guidance map of the describing word (not "a") that helped this result's
    # score most, as "which words mattered" shows it (else the one the prototype reads most); the
    # atlas of the first atom.
    described = [i for i, (w, _) in enumerate(words) if w not in ("a", "in", "with", "and")]
    effects = word_effects(explorer.engine.model, response.query, response.results[1].parts)
    helped = [i for i in described if effects[i] > 0]
    top_word = max(helped, key=lambda i: effects[i]) if helped else max(described, key=lambda i: words[i][1])
    assert word_choices.value == word_choices.choices[top_word]
    assert np.array_equal(np.asarray(guidance), np.asarray(explorer.guidance(response, 1, word_choices.value)))
    assert len(atlas) > 0 and atlas_words.startswith(f"**Atom {atom_choices.value}**")
    assert explorer.details(None, 0, "last", "mean", "P1", None) == (Choices(), None, [], "", [])
    # Which words mattered: one batch of leave-one-word-out scores, scaled to the largest effect;
    # "a" and "in" are not scored.
    assert [w.strip() for w, _ in mattered] == response.query.words
    assert max(abs(v) for _, v in mattered if v is not None) == pytest.approx(1.0)
    unscored = [w for w, v in mattered if v is None]
    assert unscored == [w + " " for w in response.query.words if w in ("a", "in", "with", "and")]  # spaced: "with a"
    # Another result of the same query reuses the query's half of the work, with the same figures.
    cached = dict(explorer._left_out)
    assert response.query.token_ids.tobytes() in cached
    again = explorer.words_that_mattered(response, 0)
    assert all(explorer._left_out[key] is value for key, value in cached.items())  # nothing recomputed
    fresh = word_effects(explorer.engine.model, response.query, response.results[0].parts)
    scale = np.nanmax(np.abs(fresh))
    assert [v for _, v in again] == [None if np.isnan(e) else pytest.approx(e / scale, abs=1e-3) for e in fresh]
    # Another layer and a single head give different maps.
    other = explorer.explain(response, 1, "1", "2", "P2")[0]
    assert not np.array_equal(np.asarray(maps[0][0]), np.asarray(other[0][0]))
    image = explorer.guidance(response, 1, "4: red")
    assert isinstance(image, Image.Image)
    assert explorer.guidance(response, 1, None) is None


def test_a_model_with_a_detail_detector_ranks_by_it_and_shows_where(tmp_path: Path) -> None:
    phrases = ("backpack", "black", "black backpack", "jacket", "man", "red", "red jacket")
    explorer = tiny_explorer(tmp_path, images=12, detail_terms=phrases, detail_weight=0.5)
    _, _, response = explorer.search("a man in a red jacket", 5)
    assert response.query.phrases == ["jacket", "man", "red", "red jacket"]
    index = explorer.engine.index
    for result in response.results:
        lift = index.arrays["detail_lift"][result.row].astype(np.float32)
        assert result.detail_score == pytest.approx(0.5 * np.mean(lift[[3, 4, 5, 6]]), abs=1e-4)  # all known
        assert result.score == pytest.approx(
            float(index.embeddings[result.row] @ response.query.embedding) + result.detail_score, abs=1e-4
        )
        assert set(result.details) == set(response.query.phrases)
    assert [r.score for r in response.results] == sorted((r.score for r in response.results), reverse=True)
    maps, *_, summary, _ = explorer.explain(response, 0, "last", "mean", "P1")
    prototypes = explorer.engine.model.config.num_prototypes + 1
    assert [caption.split("% ", 1)[1] for _, caption in maps[prototypes:]] == ["red jacket", "jacket", "man", "red"]
    assert "Detail detector: **red jacket**" in summary and "= cosine similarity" in summary
    assert explorer.api_search("red jacket", 3)["results"][0]["details"].keys() == {"jacket", "red", "red jacket"}
    _, _, plain = explorer.search("a person in grey", 3)  # no phrase it knows: cosine alone
    assert plain.query.details is None and all(not r.details and r.detail_score == 0 for r in plain.results)


def test_the_page_says_which_words_were_read_as_what(tmp_path: Path) -> None:
    phrases = ("jacket", "man", "red", "red jacket")
    card = {"vocabulary": ["a", "man", "in", "red", "jacket", "boots"]}
    explorer = tiny_explorer(tmp_path, images=6, card=card, detail_terms=phrases, detail_weight=0.5)
    _, status, response = explorer.search("a man in a Redjacket and crimson boot", 3)
    assert response.query.text == "a man in a red jacket and red boots"
    assert response.query.phrases == ["jacket", "man", "red", "red jacket"]  # the detector reads the split phrase
    assert "Words read as the descriptions write them: Redjacket -&gt; red jacket, boot -&gt; boots." in status
    assert "Colours read as the model knows them: crimson -&gt; red." in status
    body = explorer.api_search("a man in a Redjacket", 3)
    assert body["words_read_as"] == {"Redjacket": "red jacket"} and "warning" not in body


@pytest.mark.parametrize("query", ["", "   ", "\n\t"])
def test_empty_queries_get_a_message_not_an_error(explorer: explorer_app.Explorer, query: str) -> None:
    items, status, response = explorer.search(query, 10)
    assert items == [] and response is None and "Type a description" in status
    assert explorer.explain(None, 0, "last", "mean", "P1")[0] == []


def test_api_search_is_plain_json(explorer: explorer_app.Explorer) -> None:
    import json

    result = explorer.api_search(QUERY, 4)
    json.dumps(result)  # serialisable as it is
    assert len(result["results"]) == 4
    scores = [r["score"] for r in result["results"]]
    assert scores == sorted(scores, reverse=True)
    assert all(len(r["part_similarity"]) == 6 for r in result["results"])
    assert all("path" not in r and not Path(r["file"]).is_absolute() for r in result["results"])  # no server paths
    assert explorer.api_search("  ", 4)["error"]


@pytest.mark.parametrize("k", [0, -1, 51, 1e9, 2.5, float("nan"), float("inf"), "abc", None, True, [1] * 1000])
def test_result_count_is_checked_and_never_echoed(explorer: explorer_app.Explorer, k) -> None:
    answer = explorer.api_search(QUERY, k)
    assert answer["results"] == [] and "from 1 to 50" in answer["error"]
    assert "abc" not in json.dumps(answer) and len(json.dumps(answer)) < 300
    items, status, response = explorer.search(QUERY, k)
    assert items == [] and response is None and "from 1 to 50" in status


def test_shared_upload_adds_good_files_and_reports_bad_ones(tmp_path: Path) -> None:
    explorer = tiny_explorer(tmp_path / "own", images=8)
    explorer.gallery.shared_uploads = True  # `python app.py --shared-uploads`: local use
    good = tmp_path / "walker.jpg"
    shutil.copy(sorted((REPO / "gallery" / "images").glob("*.jpg"))[30], good)
    text = tmp_path / "notes.png"
    text.write_text("hello")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    before = len(explorer.engine.index)
    report, browse = explorer.gallery.upload([str(good), str(text), str(empty)])
    assert not explorer.gallery.store.root.exists()  # nothing private
    assert len(explorer.engine.index) == before + 1
    assert "Added 1 image" in report and "notes.png" in report and "empty.jpg" in report
    assert browse[0][1] == "walker.jpg" and "uploads/" in browse[0][0]  # uploads are listed first
    assert "uploads/walker.jpg" in [f for f, _ in explorer.engine.search_ids("walker", 50)]  # and searchable


def test_private_uploads_are_seen_only_by_their_session(tmp_path: Path) -> None:
    explorer = tiny_explorer(tmp_path / "own", images=8)
    explorer.gallery.store = UploadStore(tmp_path / "sessions")
    shared_before = explorer.engine.files()
    mine = tmp_path / "mine.jpg"
    shutil.copy(sorted((REPO / "gallery" / "images").glob("*.jpg"))[30], mine)
    report, browse = explorer.gallery.upload([str(mine)], "visitor-a")  # a new session's first upload
    assert "Added 1 image" in report and "only you see them" in report
    assert explorer.engine.files() == shared_before  # the shared gallery did not change
    assert browse[0][1] == "mine.jpg" and len(browse) == 9  # theirs first, then the gallery
    _, _, a = explorer.search("someone", 50, "visitor-a")
    _, _, b = explorer.search("someone", 50, "visitor-b")  # another visitor
    assert "your uploads/mine.jpg" in [r.file for r in a.results] and len(a.results) == 9
    assert all(not r.file.startswith("your uploads/") for r in b.results) and len(b.results) == 8
    theirs = next(r for r in a.results if r.file == "your uploads/mine.jpg")
    assert explorer.explain(a, theirs.rank - 1, "last", "mean", "P1")[4].count("your uploads/mine.jpg") == 1
    assert isinstance(explorer.guidance(a, theirs.rank - 1, "1: someone"), Image.Image)
    private = explorer.gallery.store.gallery("visitor-a")
    assert private.images.is_dir() and private.images.is_relative_to(tmp_path / "sessions")
    explorer.gallery.leave("visitor-a")  # the page's unload event
    assert not private.images.exists() and not private.index_dir.exists()


def test_upload_folders_of_dead_servers_are_removed() -> None:
    import os
    import tempfile

    from lgur.search.gallery import PROCESS_FILE, private_sessions_root

    dead = Path(tempfile.gettempdir()) / "lgur-sessions" / "dead-server"
    (dead / "images" / "x").mkdir(parents=True, exist_ok=True)
    (dead / PROCESS_FILE).write_text("999999999")  # above any pid_max
    mine = private_sessions_root()
    assert not dead.exists() and (mine / PROCESS_FILE).read_text() == str(os.getpid())
    assert str(os.getpid()) not in mine.name  # the name is shown in upload answers: no process id
    assert private_sessions_root() == mine


def test_model_tab(explorer: explorer_app.Explorer) -> None:
    assert "dictionary atoms" in explorer.model.card_table()
    items, text = explorer.model.atom_atlas(3)
    assert len(items) == 8 and text.startswith("**Atom 3**")
    atlas = explorer.engine.atlas.atom(3)
    weights = explorer.engine.index.arrays["atom_histogram"][:, 3].astype(np.float32)
    expected = {explorer.engine.index.entries[i].path for i in np.argsort(-weights)[:8]}
    assert {p.relative_to(explorer.engine.gallery).as_posix() for p, _ in atlas.images} == expected
    assert atlas.words and all(w == w.lower() for w, _ in atlas.words)
    assert [v for _, v in atlas.words] == sorted((v for _, v in atlas.words), reverse=True)
    assert "numbered 0 to" in explorer.model.atom_atlas(10_000)[1] and explorer.model.atom_atlas(float("nan"))[0] == []
    # An atom's images are read once per gallery index: again, no image is encoded; a new index reads them anew.
    real, calls = explorer.engine.atlas.patch_atoms, []
    explorer.engine.atlas.patch_atoms = lambda rows: calls.append(rows) or real(rows)
    try:
        again = explorer.engine.atlas.atom(3)
        assert not calls and [p for p, _ in again.images] == [p for p, _ in atlas.images]
        index = explorer.engine.index
        explorer.engine.index = copy.copy(index)  # what refresh() does: another index object
        try:
            fresh = explorer.engine.atlas.atom(3)
        finally:
            explorer.engine.index = index
        assert len(calls) == 1 and all(np.allclose(a, b) for (_, a), (_, b) in zip(fresh.images, atlas.images))
    finally:
        del explorer.engine.atlas.patch_atoms


@pytest.fixture(scope="module")
def served(explorer: explorer_app.Explorer):
    demo = explorer_app.build_app(explorer)
    port = free_port()
    demo.queue()
    demo.launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        **launch_options(explorer),
    )
    add_gallery_route(demo, explorer)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_gradio_client_search_endpoint(served: str, explorer: explorer_app.Explorer) -> None:
    served_gallery = explorer.engine.gallery
    from gradio_client import Client

    client = Client(served, verbose=False, download_files=False)  # paths stay plain strings
    result = client.predict(QUERY, 7, api_name="/search")
    assert len(result["results"]) == 7
    scores = [r["score"] for r in result["results"]]
    assert scores == sorted(scores, reverse=True)
    assert all((Path(served_gallery) / r["file"]).is_file() for r in result["results"])
    import urllib.error
    import urllib.request

    first = result["results"][0]
    with urllib.request.urlopen(served.rstrip("/") + first["url"], timeout=10) as reply:  # the image, by its URL
        assert reply.read() == (Path(served_gallery) / first["file"]).read_bytes()
    for bad in ("/gallery/../models/tiny.safetensors", "/gallery/.lgur-index/index.safetensors", "/gallery/nope.jpg"):
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(served.rstrip("/") + bad, timeout=10)


def test_gradio_client_why_not_and_photo_endpoints(served: str, explorer: explorer_app.Explorer) -> None:
    from gradio_client import Client

    client = Client(served, verbose=False, download_files=False)
    expected = explorer.engine.files()[5]
    body = client.predict(QUERY, expected, api_name="/why_not")
    assert body == explorer.api_why_not(QUERY, expected)  # the same answer through the server
    assert body["image"]["file"] == expected and body["top"]["rank"] == 1
    assert "error" in client.predict(QUERY, "../../etc/passwd", api_name="/why_not")
    photo = client.predict(expected, 4, api_name="/search_by_photo")
    assert [r["file"] for r in photo["results"]] == [
        r["file"] for r in explorer.photos.api_search(expected, 4)["results"]
    ]
    assert expected not in [r["file"] for r in photo["results"]]
    assert "error" in client.predict("/etc/passwd", 4, api_name="/search_by_photo")


def test_only_gallery_images_are_served(served: str, explorer: explorer_app.Explorer) -> None:
    import tempfile
    import urllib.error
    import urllib.request

    def status(path: Path) -> int:
        try:
            with urllib.request.urlopen(f"{served}gradio_api/file={path}", timeout=10) as reply:
                return reply.status
        except urllib.error.HTTPError as error:
            return error.code

    assert status(explorer.engine.gallery / explorer.engine.files()[0]) == 200
    with tempfile.NamedTemporaryFile(suffix=".json") as secret:  # anything in the temp folder
        assert status(Path(secret.name)) in (403, 404)
    checkpoint = next(explorer.engine.gallery.parent.glob("models/*.safetensors"))
    assert status(checkpoint) in (403, 404)
    assert status(explorer.engine.index_dir / "index.safetensors") in (403, 404)


CHROMIUM = Path("/usr/bin/chromium")
BROWSER_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_real_browser_search_and_explanations(served: str, tmp_path: Path) -> None:
    if not CHROMIUM.is_file():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (.ci/run installs it)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 2200})
        page.goto(served)
        page.locator("#query textarea").fill(QUERY)
        page.locator("#query textarea").press("Enter")
        results = page.locator("#results img")
        expect(results.first).to_be_visible(timeout=60_000)
        assert results.count() == 10
        expect(page.locator("#summary")).to_contain_text("Result #1", timeout=30_000)
        results.nth(1).click()  # selecting another result redraws every panel for it
        expect(page.locator("#summary")).to_contain_text("Result #2", timeout=30_000)
        page.wait_for_function("!document.querySelector('.progress-text, .eta-bar')", timeout=30_000)
        maps = page.locator("#prototype-maps img")
        expect(maps.first).to_be_visible()
        assert maps.count() == 7
        expect(page.locator("#prototype-maps")).to_contain_text("P1")  # each map is named, with its share
        expect(page.locator("#words")).to_contain_text("backpack")
        words = page.locator("#words .score-token")  # one coloured token per query word
        assert words.count() == len(QUERY.split())
        expect(page.locator("#atom-chart img")).to_be_visible()
        expect(page.locator("#foreground img")).to_be_visible()
        expect(page.locator("#guidance img")).to_be_visible()  # filled without picking a word
        expect(page.locator("#chart-atom-patches img").first).to_be_visible()
        expect(page.locator("#chart-atom-words")).to_contain_text("Atom")
        # Markup in a query is shown as text: no script runs, no element is created.
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.locator("#query textarea").fill("<img src=x onerror=alert(1)> <b>bold</b> man")
        page.locator("#query textarea").press("Enter")
        expect(page.locator("#words")).to_contain_text("onerror", timeout=30_000)
        assert page.locator("img[src='x']").count() == 0 and page.locator("#words b").count() == 0
        assert dialogs == []
        page.screenshot(path=str(tmp_path / "browser_test.png"), full_page=True)
        browser.close()


def _pick(page, dropdown: str, option: str) -> None:
    """Choose an option of a Gradio dropdown: open it, type the name, click the option."""
    box = page.locator(f"{dropdown} input")
    box.click()
    box.press_sequentially(option)
    page.locator(f'{dropdown} li[role="option"][aria-label="{option}"]').click()


@pytest.mark.parametrize("width,height", [(1400, 2400), (390, 844)])
def test_real_browser_new_panels(served: str, explorer: explorer_app.Explorer, width: int, height: int) -> None:
    """Which words mattered, why not this one, search by photo: at desktop and phone width."""
    if not CHROMIUM.is_file():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (.ci/run installs it)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(served)
        page.locator("#query textarea").fill(QUERY)
        page.locator("#query textarea").press("Enter")
        expect(page.locator("#summary")).to_contain_text("Result #1", timeout=60_000)
        effects = page.locator("#word-effects .score-token")  # each query word, with its effect on the score
        expect(effects.first).to_be_visible(timeout=30_000)
        assert effects.count() == len(QUERY.split())
        caption = page.locator("#prototype-maps .caption-label").first
        if caption.count():
            assert "%" in caption.inner_text()  # the share of the score leads, so a phone still shows it
        expected = explorer.engine.files()[-1]
        _pick(page, "#why-not-file", expected)
        page.locator("#why-not-button").click()
        expect(page.locator("#why-not")).to_contain_text("ranks", timeout=30_000)
        expect(page.locator("#why-not")).to_contain_text("loses most")
        expect(page.locator("#why-not-maps img").first).to_be_visible()
        assert page.locator("#why-not-maps img").count() == 12
        page.get_by_role("tab", name="Search by photo").click()
        _pick(page, "#photo-file", explorer.engine.files()[0])
        page.locator("#photo-button").click()
        expect(page.locator("#photo-status")).to_contain_text("look alike", timeout=30_000)
        expect(page.locator("#photo-results img").first).to_be_visible()
        assert page.locator("#photo-results img").count() == 10
        assert page.locator("#photo-maps img").count() == explorer.engine.model.config.num_prototypes
        expect(page.locator("#photo-result-maps img").first).to_be_visible()
        browser.close()


@pytest.mark.parametrize("name", ["../../etc/passwd", "model.pt", "/abs/x.safetensors"])
def test_bad_hub_file_is_a_clean_start_error(name: str) -> None:
    with pytest.raises(ValueError, match="must be a .safetensors path"):
        resolve_checkpoint(None, "someone/lgur", name, "0" * 40)


def test_server_address_precedence() -> None:
    spaces = {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7861"}
    assert server_address(None, None, {}) == ("127.0.0.1", 7860)
    assert server_address(None, None, spaces) == ("0.0.0.0", 7861)
    assert server_address(None, None, spaces | {"LGUR_PORT": "9000"}) == ("0.0.0.0", 9000)
    assert server_address("127.0.0.1", 8000, spaces | {"LGUR_HOST": "::"}) == ("127.0.0.1", 8000)
    with pytest.raises(SystemExit, match="port must be a number"):
        server_address(None, None, {"GRADIO_SERVER_PORT": "http"})


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) listening on this port."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                found.append(local.rsplit(":", 1)[0])
    return found


def test_starts_as_a_space_would(explorer: explorer_app.Explorer) -> None:
    """`python app.py` with only Spaces' variables listens on every interface at the given port."""
    import os

    if not Path("/proc/net/tcp").is_file():
        pytest.skip("reads the listening sockets from /proc (Linux)")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LGUR_", "GRADIO_SERVER"))}
    env |= {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": str(port)}
    gallery = explorer.engine.index.gallery
    checkpoint = next(gallery.parent.glob("models/*.safetensors"))
    with served_app("--checkpoint", str(checkpoint), "--gallery", str(gallery), port=port, env=env):
        addresses = _listening(port)
        assert addresses and all(set(a) == {"0"} for a in addresses), addresses  # 0.0.0.0 (or ::), not loopback


def test_the_model_card_table_of_the_shipped_card() -> None:
    import json

    from lgur.app.card import card_table

    card = json.loads((REPO / "assets" / "lgur_cpu.json").read_text())
    table = card_table(card, [f"P{i + 1}" for i in range(6)]).splitlines()
    assert table[0] == "| model | |" and table[1] == "| --- | --- |"  # no empty header row
    assert all(line.count("|") >= 3 for line in table)
    training = next(line for line in table if line.startswith("| training data |"))
    assert "synthetic world (seed 0): 4,000 training identities" in training and "data/world" not in training
    test = card["metrics"]["test"]
    assert f"| test | R@1 {test['R@1']} · R@5 {test['R@5']} · R@10 {test['R@10']} · mAP {test['mAP']} |" in table
    default = card["query_bench"]["default"]
    assert default["details"]  # ranked as the app ranks, with the detail score, and the table says so
    assert default["read_as_the_app_does"]  # the queries read as the app reads them (lgur.search.reading)
    assert any(
        line.startswith("| short queries (default set, with details, read as the app reads them) |")
        and f"{default['precision@10']:.1f}%" in line
        for line in table
    )
    detector = f"| detail detector | {len(card['config']['detail_terms'])} caption phrases, weight "
    assert any(
        line.startswith(detector) and ("own fine-tuned copy" in line) == card["config"]["detail_stage"]
        for line in table
    )
    assert any(line.startswith("| prototypes |") for line in table)


def test_a_selected_result_is_decoded_once(explorer: explorer_app.Explorer, monkeypatch: pytest.MonkeyPatch) -> None:
    import lgur.files

    _, _, response = explorer.search("a person in black trousers", 5)
    lgur.files.DECODED.clear()
    opened: list[str] = []
    real = lgur.files.open_rgb
    monkeypatch.setattr(lgur.files, "open_rgb", lambda path: opened.append(str(path)) or real(path))
    panels = explorer.explain(response, 3, "last", "mean", "P1")
    explorer.details(response, 3, "last", "mean", "P1", panels[5].value)  # guidance map: the model reads it too
    assert opened.count(response.results[3].path) == 1


def test_why_not_this_one(explorer: explorer_app.Explorer) -> None:
    _, _, response = explorer.search(QUERY, 5)
    expected = explorer.engine.files()[-1]
    text, maps = explorer.why_not(response, expected)
    comparison = explorer.engine.compare(response.query.text, expected)
    assert f"ranks **#{comparison.image.rank}** of {len(explorer.engine):,}" in text
    assert explorer.prototypes[comparison.loses_most] in text and text.count("\n| P") == 6
    assert len(maps) == 12 and [c.split(":")[0] for _, c in maps[:4]] == ["this", "top", "this", "top"]
    assert explorer.why_not(None, expected)[0].startswith("Search first")
    assert "Pick an image of the gallery" in explorer.why_not(response, "../app.py")[0]
    body = explorer.api_why_not(QUERY, expected)
    assert body["image"]["file"] == expected and body["top"]["rank"] == 1 and "loses_most" in body
    assert explorer.api_why_not(QUERY, "/etc/passwd") == {
        "error": "Pick an image of the gallery (its name as the gallery lists it)."
    }


def test_search_by_photo(explorer: explorer_app.Explorer, tmp_path: Path) -> None:
    file = explorer.engine.files()[0]
    items, status, response, maps = explorer.photos.search(file, None, 6)
    assert len(items) == 6 and "look alike" in status and len(maps) == explorer.engine.model.config.num_prototypes
    assert file not in [r.file for r in response.results]
    assert len(explorer.photos.result_maps(response, 2)) == len(maps) + 1
    own = tmp_path / "me.jpg"
    shutil.copy(explorer.engine.gallery / file, own)  # an upload: the same picture finds the same people
    assert [i for i, _ in explorer.photos.search(None, str(own), 6)[0]][1:] == [i for i, _ in items][:5]
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    assert "cannot be used" in explorer.photos.search(None, str(fake))[1]
    assert "Pick a gallery image" in explorer.photos.search("../../etc/passwd", None)[1]
    body = explorer.photos.api_search(file, 4)
    assert len(body["results"]) == 4 and body["results"][0]["url"].startswith("/gallery/")
    assert "error" in explorer.photos.api_search("/etc/passwd", 4)


def test_the_atlas_word_table_is_kept_beside_the_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lgur.search.atlas import Atlas
    from lgur.search.engine import SearchEngine

    engine = tiny_explorer(tmp_path / "own", images=6).engine
    words, table = engine.atlas.word_atoms()
    assert words and table.shape == (len(words), engine.model.config.num_atoms)
    assert (engine.index_dir / "atlas_words.npz").is_file()
    checkpoint = next((tmp_path / "own" / "models").glob("*.safetensors"))
    again, _ = SearchEngine.open(checkpoint, engine.gallery, progress=False)

    def not_again(*args, **kwargs):
        raise AssertionError("the word table was computed again")

    monkeypatch.setattr(Atlas, "_word_table", not_again)
    kept_words, kept_table = again.atlas.word_atoms()  # a restart reads it at once
    assert kept_words == words and np.array_equal(kept_table, table)
    monkeypatch.undo()
    (engine.index_dir / "atlas_words.npz").write_bytes(b"damaged")
    other, _ = SearchEngine.open(checkpoint, engine.gallery, progress=False)
    assert other.atlas.word_atoms()[0] == words  # a damaged file is computed again, never an error


def test_a_tab_gets_the_results_from_the_gallery_and_every_image_of_the_answer(
    served: str, explorer: explorer_app.Explorer
) -> None:
    from lgur.eval.bench import PageClient

    page = PageClient(served)
    answer = page.call("explore", [QUERY, 3, "last", "mean", "P1"])
    shown = [item["image"]["path"] for item in answer[0]["value"]]
    gallery = explorer.engine.gallery.resolve()
    assert len(shown) == 3 and all(Path(p).resolve().is_relative_to(gallery) for p in shown)  # not copied per answer
    assert page.show(answer) is answer  # every file it points to is served (raises on a refused one)
    maps = answer[4]
    assert len(maps) >= explorer.engine.model.config.num_prototypes + 1
    assert all(not Path(m["image"]["path"]).resolve().is_relative_to(gallery) for m in maps)  # drawn: the cache


def test_a_model_with_fine_prototype_maps_draws_them_at_their_own_grid(tmp_path: Path) -> None:
    from lgur.model.config import cpu_lite0_preset

    image = cpu_lite0_preset().image
    image.img_size, image.weights = (64, 32), None  # a 4x2 patch grid, prototype maps at 8x4
    explorer = tiny_explorer(tmp_path, images=6, image=image, pgu_fine=True)
    engine = explorer.engine
    assert engine.grid == (4, 2) and engine.prototype_grid == (8, 4)
    arrays = engine.index.arrays
    assert arrays["prototype_attention"].shape[-1] == 32 and arrays["foreground"].shape[-1] == 8
    items, _, response = explorer.search(QUERY, 3)
    assert len(items) == 3 and response.prototype_grid == (8, 4) and response.grid == (4, 2)
    maps, _, _, foreground, _, _ = explorer.explain(response, 0, "last", "mean", "P1")
    assert len(maps) == engine.model.config.num_prototypes + 1 and isinstance(foreground, Image.Image)
    file = response.results[0].file
    _, _, photo, own_maps = explorer.photos.search(file, None, 3)
    assert photo.prototype_grid == (8, 4) and len(own_maps) == engine.model.config.num_prototypes
    assert len(explorer.photos.result_maps(photo, 0)) == engine.model.config.num_prototypes + 1


def test_the_atlas_refuses_an_atom_out_of_range_with_a_message(served: str) -> None:
    from lgur.eval.bench import PageClient

    page = PageClient(served)
    for bad in (9999, -1):
        items, text = page.call("atom_atlas", [bad])
        assert items == [] and "numbered 0 to" in text
    items, text = page.call("atom_atlas", [3])
    assert len(items) == 8 and text.startswith("**Atom 3**")


def test_the_readme_documents_the_api_as_it_answers(served: str, tmp_path: Path) -> None:
    """Every endpoint of /gradio_api/info is in the README's table with its parameters, and the rewritten
    query is what /search answers."""
    import json
    import re
    import urllib.request

    with urllib.request.urlopen(f"{served}gradio_api/info", timeout=10) as reply:
        info = json.load(reply)["named_endpoints"]
    rows = re.findall(r"^\| `(/\w+)` \| (.+?) \| (.+) \|$", (REPO / "README.md").read_text(), re.MULTILINE)
    documented = {name: takes for name, takes, _ in rows}
    assert set(documented) == set(info)
    for name, endpoint in info.items():
        parameters = [p["parameter_name"] for p in endpoint["parameters"]]
        named = re.findall(r"^`(\w+)`|, `(\w+)`", documented[name])
        assert [a or b for a, b in named] == parameters, name
    row = next(answers for name, _, answers in rows if name == "/search")
    asked, _ = re.search(r'e\.g\. "([^"]+)" -> "([^"]+)"', row).groups()
    reader = tiny_explorer(tmp_path, images=4, card={"vocabulary": ["a", "woman", "man", "in", "red", "coat"]})
    body = reader.api_search(asked, 3)
    readings = body.get("colours_read_as", {}) | body.get("words_read_as", {})
    assert readings and all(typed not in body["query"] and read in body["query"] for typed, read in readings.items())
