"""What the explorer's page shows, as plain functions of plain values (no Gradio here).

`Explorer` holds the search engine and answers the Search tab's events: a search, the panels
of one selected result, the guidance map of one word, which words mattered, "why not this
one?", and the `/search` API. The other tabs are its parts (lgur.app.tabs): `photos` (search by
photo), `gallery` (browsing, a visitor's uploads) and `model` (card, tables, atom atlas).
`app.py` lays the page out and wires these methods to it; tests call them directly.
"""

from __future__ import annotations

import html
import logging
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from ..data.dataset import content_word
from ..files import remove_temporaries
from ..model.details import MIN_READING
from ..search.engine import SearchEngine, SearchResponse, SearchResult, word_effects, words_left_out
from ..search.explain import (
    atom_chart,
    atom_names,
    display_rgb,
    overlay,
    prototype_names,
    prototype_overlays,
    reading_name,
    word_highlights,
)
from ..search.gallery import private_sessions_root
from ..search.query import QueryError, result_count
from .tabs import GALLERY_ROUTE, GalleryTab, ModelTab, PhotoSearch
from .uploads import UploadLimits, UploadStore

log = logging.getLogger("lgur.app")
INTRO = (
    "# LGUR Explorer\nDescribe a person; the model ranks the gallery and shows **why**: which body part each "
    "of its six part detectors looked at (LGUR's PGU prototypes), which of your words mattered, and the "
    "shared dictionary atoms both sides were rebuilt from (DGA), and where a detail detector saw the "
    'phrases you typed ("black backpack"). The people are a synthetic world the project generates.'
)
MAX_DETAIL_MAPS = 4  # phrase maps after the prototype maps


def reading_note(readings: list[tuple[str, float] | None]) -> str:
    """How the prototypes are named: by what each reads on this image, where it reads something."""
    unnamed = [f"P{p + 1}" for p, r in enumerate(readings) if r is None]
    note = (
        "Each prototype is named by the detail it reads on this image (the phrase the detector sees where "
        f"its map is at least {MIN_READING:g}x as strong as a flat map)"
    )
    return note + (f"; {', '.join(unnamed)} read nothing in particular here." if unnamed else ".")


def atoms_note(atoms: list[int], names: dict[int, tuple[str, float] | None]) -> str:
    """The chart's atoms, each with the word that uses it most over its average (where one stands out)."""
    named = [f"{a} *{html.escape(n[0])}* ({n[1]:.0f}x)" for a in atoms if (n := names.get(a))]
    if not named:
        return "No atom of the chart is used by one word much more than by the others."
    return "Atoms of the chart, by the word that uses each most (times its average use): " + ", ".join(named) + "."


def detail_note(result: SearchResult) -> str:
    """The detail detector's probability of each of the query's phrases on this result (phrases of two
    words first: "black backpack" says more than "black")."""
    shown = sorted(result.details.items(), key=lambda item: -item[0].count(" "))
    return "Detail detector: " + ", ".join(f"**{html.escape(p)}** {100 * v:.0f}%" for p, v in shown) + "."


@dataclass(frozen=True)
class Example:
    """A built-in example query and the attributes it asks for, in the gallery manifest's terms: a
    test checks that the shipped gallery holds at least 5 such people and that the shipped model
    puts at least 5 of them in its top 10."""

    text: str
    wants: tuple[tuple[str, str], ...]


EXAMPLE_QUERIES = [
    Example("a woman in a red coat", (("gender", "female"), ("top_type", "coat"), ("top_colour", "red"))),
    Example(
        "A man in a white t-shirt and blue jeans, walking along the street.",
        (
            ("gender", "male"),
            ("top_type", "t-shirt"),
            ("top_colour", "white"),
            ("bottom_type", "jeans"),
            ("bottom_colour", "blue"),
        ),
    ),
    Example(
        "a man with a black backpack and white sneakers",
        (
            ("gender", "male"),
            ("bag_type", "backpack"),
            ("bag_colour", "black"),
            ("shoe_type", "sneakers"),
            ("shoe_colour", "white"),
        ),
    ),
    Example("someone in red boots", (("shoe_type", "boots"), ("shoe_colour", "red"))),
    Example("person holding an umbrella", (("carried_object", "umbrella"),)),
    Example(
        "a woman in a yellow top and blue jeans",
        (("gender", "female"), ("top_colour", "yellow"), ("bottom_type", "jeans"), ("bottom_colour", "blue")),
    ),
    Example("a woman in a crimson coat", (("gender", "female"), ("top_type", "coat"), ("top_colour", "red"))),
]
EXAMPLES = [e.text for e in EXAMPLE_QUERIES]


def detail_comparison(image: SearchResult, top: SearchResult) -> str:
    """Why not this one, by the detail detector: both detail scores and each phrase's probability."""
    phrases = ", ".join(
        f"**{html.escape(p)}** {100 * v:.0f}% vs {100 * top.details.get(p, 0):.0f}%" for p, v in image.details.items()
    )
    return (
        f"Detail score {image.detail_score:+.3f} against {top.detail_score:+.3f}; the detector's probability of "
        f"each phrase, this image vs the top result: {phrases}."
    )


@dataclass
class Choices:
    """A dropdown's options (label, value pairs or plain values) and the one picked."""

    choices: list[Any] = field(default_factory=list)
    value: str | None = None


class Explorer:
    """The app's behaviour: every event handler is a method over plain values."""

    def __init__(
        self,
        engine: SearchEngine,
        shared_uploads: bool = False,
        sessions: Path | None = None,
        uploads: str = "uploads",
        limits: UploadLimits | None = None,
        cache: Path | None = None,
    ):
        """shared_uploads: uploads go into the gallery for everyone (local use); otherwise each
        visitor's uploads stay private to them, in their own folder under `sessions` (see
        uploads.UploadStore: `limits`, and `cache`, the web framework's upload folder)."""
        self.engine = engine
        self.card = engine.card
        model = engine.model.config
        self.layers = ["last"] + [str(i + 1) for i in range(model.pgu_layers)]
        self.heads = ["mean"] + [str(i + 1) for i in range(model.pgu_heads)]
        count = model.num_prototypes if model.use_pgu else 1
        # Plain numbers where no image is in view; on an image, what each reads there (readings)
        self.prototypes = [f"P{p + 1}" for p in range(count)]
        store = UploadStore(sessions or private_sessions_root() / secrets.token_hex(4), limits, cache)
        self.photos = PhotoSearch(engine, store, self.prototypes)
        self.gallery = GalleryTab(engine, store, shared_uploads, uploads)  # uploads: its sub-folder for shared ones
        self.model = ModelTab(engine, prototype_names(self.card, count))  # the card's measured regions
        remove_temporaries(engine.gallery / uploads)  # copies cut short by a crash: never accepted
        self._left_out: dict[bytes, tuple] = {}  # words_left_out of recent queries, oldest first
        self._left_out_lock = threading.Lock()

    # -- search -------------------------------------------------------------------------------
    @property
    def foreground_label(self) -> str:
        """The m panel's label: where m comes from (trained, fitted after training, or untrained)."""
        model = self.engine.model
        source = "" if model.config.pgu_foreground else " (fitted to the detail detector)"
        return "DGA foreground weight m" + (source if model.learns_foreground else " (untrained here)")

    @property
    def guidance_label(self) -> str:
        """The guidance panel's label: what its map is (times m only where the model learns m)."""
        weighted = " x foreground weight m" if self.engine.model.learns_foreground else ""
        return f"Regions this word feeds (their attention to it{weighted})"

    def search(
        self, query: str, k: float, visitor: str | None = None, root: str = ""
    ) -> tuple[list[tuple[str, str]], str, SearchResponse | None]:
        """-> results gallery (file, caption), a status line, the response (kept per session).
        visitor: the session's key; their private uploads are searched with the gallery, and shown by
        their URL under the page's `root` (UploadStore.shown)."""
        private = self.gallery.store.gallery(visitor)
        try:
            response = self.engine.search(query, result_count(k), private.index if private else None)
        except QueryError as error:
            return [], f"⚠️ {html.escape(str(error))}", None
        shown = self.gallery.store.shown
        items = [(shown(r.path, root), f"#{r.rank} · {r.score:.2f}") for r in response.results]
        note = " (the query was longer than the model reads; the end was ignored)" if response.query.truncated else ""
        status = f"{len(items)} results in {1000 * response.seconds:.0f} ms{note}. Select one to see why it matched."
        for note in response.weak_spots:
            status = f"ℹ️ {html.escape(note)}\n\n{status}"
        if response.colour_note:
            status = f"🎨 Colours read as the model knows them: {html.escape(response.colour_note)}.\n\n{status}"
        if response.word_note:
            status = f"✏️ Words read as the descriptions write them: {html.escape(response.word_note)}.\n\n{status}"
        if response.warning:
            status = f"⚠️ {html.escape(response.warning)}\n\n{status}"
        if not items:
            status = "The gallery is empty: add images in the Gallery tab."
        return items, status, response

    def picked(self, layer: str, head: str, prototype: str) -> tuple[int, int | None, int]:
        """The (layer, head, prototype) indices a visitor picked; a value that is not one of the choices
        (the dropdowns accept any text, so that a refusal never echoes it) reads as the default."""
        li = self.layers.index(layer) - 1 if layer in self.layers[1:] else -1
        hi = self.heads.index(head) - 1 if head in self.heads[1:] else None
        name = str(prototype).split()[0] if prototype and str(prototype).split() else ""  # "P3 upper body"
        return li, hi, self.prototypes.index(name) if name in self.prototypes else 0

    def explain(
        self, response: SearchResponse | None, selected: int, layer: str, head: str, prototype: str
    ) -> tuple[list[tuple[Any, str]], list[tuple[str, float]], Any, Any, str, Any]:
        """Panels for one result: prototype maps, highlighted words, atom chart, foreground map, notes
        and the chart's atoms (for the atlas). So that no panel opens empty, the atom picked is the
        first both sides share (else the chart's first); `details` draws its atlas.
        """
        if response is None or not response.results:
            return [], [], None, None, "", Choices()
        result = response.results[min(max(int(selected), 0), len(response.results) - 1)]
        li, hi, pi = self.picked(layer, head, prototype)
        readings = self.engine.prototype_readings(result, li)
        names = [reading_name(p, r) for p, r in enumerate(readings)]  # what each reads on this image
        maps = prototype_overlays(result, response.prototype_grid, li, hi, names) + self.detail_overlays(
            response, result
        )
        words = word_highlights(response.query, pi, li, hi)
        relative = self.engine.relative_atoms
        chart = atom_chart(
            response.query.atom_weights,
            result.atom_weights,
            result.salient_atoms,
            result.shared_atoms,
            title="weight / average" if relative else "mean atom weight",
            reference=1.0 if relative else None,
            image_label="image (foreground-weighted)" if self.engine.model.learns_foreground else "image",
        )
        foreground = overlay(display_rgb(result.path), result.foreground, response.grid, alpha=0.55)
        best = result.strongest_part
        meta = result.metadata
        charted = [a for a in result.salient_atoms if a in result.shared_atoms]  # starred on the chart
        elsewhere = len(result.shared_atoms) - len(charted)
        lines = [
            f"**Result #{result.rank}** `{html.escape(result.file)}`, "
            + (
                f"score **{result.score:.3f}** = cosine similarity {result.cosine:.3f} + details "
                f"{result.detail_score:+.3f}. {detail_note(result)}"
                if result.details
                else f"cosine similarity **{result.score:.3f}**."
            ),
            f"Strongest part: **{names[best]}** ({100 * result.score_share[best]:.0f}% of the similarity). "
            + reading_note(readings),
            atoms_note(result.salient_atoms, self.atom_names(result.salient_atoms)),
            (
                "Atoms particular to both (by weight relative to the average description and gallery image)"
                if relative
                else "Atoms in both top 20s"
            )
            + f", starred on the chart: {', '.join(map(str, charted)) or 'none'}"
            + (f"; {elsewhere} more in both top 20s, off the chart." if elsewhere else "."),
        ]
        if meta.get("captions"):
            lines.append(f"Gallery caption: _{html.escape(meta['captions'][0])}_")
        atom_choices = [(f"{a} (shared)", str(a)) for a in charted]
        atom_choices += [(str(a), str(a)) for a in result.salient_atoms if a not in charted]
        return (
            maps,
            words,
            chart,
            foreground,
            "\n\n".join(lines),
            Choices(atom_choices, atom_choices[0][1] if atom_choices else None),
        )

    def readings(self, result: SearchResult, layer: int = -1) -> list[str]:
        """Each prototype's name on this image: 'P3 black backpack', or 'P3' where it reads nothing in particular."""
        return [reading_name(p, r) for p, r in enumerate(self.engine.prototype_readings(result, layer))]

    def atom_names(self, atoms: list[int]) -> dict[int, tuple[str, float] | None]:
        """Each atom's most specific word over the gallery's captions (the atlas's word table)."""
        words, table = self.engine.atlas.word_atoms()
        return atom_names(words, table, atoms, terms=self.engine.model.config.detail_terms)

    def detail_overlays(self, response: SearchResponse, result: SearchResult) -> list[tuple[Any, str]]:
        """Where the detail detector saw the query's phrases on this result (phrases of two words
        first, at most MAX_DETAIL_MAPS), captioned with its probability of each."""
        if not result.details:
            return []
        where = self.engine.detail_maps(response.query, result.path)
        order = sorted(range(len(response.query.phrases)), key=lambda i: -response.query.phrases[i].count(" "))
        image = display_rgb(result.path)
        return [
            (overlay(image, where[:, i], response.grid), f"{100 * result.details[phrase]:.0f}% {phrase}")
            for i in order[:MAX_DETAIL_MAPS]
            for phrase in [response.query.phrases[i]]
        ]

    def details(
        self, response: SearchResponse | None, selected: int, layer: str, head: str, prototype: str, atom: str | None
    ) -> tuple[Any, Any, list[tuple[Any, str]], str, list[tuple[str, float | None]]]:
        """The panels drawn just after `explain`'s: the query's words for the guidance picker, the
        guidance map of the word picked, the atlas of one atom, and which words mattered to this result.

        They come second because scoring the words (the query re-read without each one) is the slowest
        part of a result's explanation. The word picked is the describing word (not "a" or "with") that
        helped this result's score most, as "which words mattered" shows it, else the one the selected
        prototype reads most, so that the guidance panel never opens empty.
        """
        if response is None or not response.results:
            return Choices(), None, *self.chart_atom_atlas(atom), []
        result = response.results[min(max(int(selected), 0), len(response.results) - 1)]
        words = response.query.words
        choices = [f"{i + 1}: {w}" for i, w in enumerate(words)]
        effects = self.word_effects(response, result)
        candidates = [i for i, w in enumerate(words) if content_word(w)] or range(len(words))
        helped = [i for i in candidates if effects[i] > 0]
        if helped:
            pick = max(helped, key=lambda i: effects[i])
        else:
            li, hi, pi = self.picked(layer, head, prototype)
            read = word_highlights(response.query, pi, li, hi)
            pick = max(candidates, key=lambda i: read[i][1], default=None)
        word = choices[pick] if pick is not None else None
        return (
            Choices(choices, word),
            self.guidance(response, selected, word),
            *self.chart_atom_atlas(atom),
            self.scaled_effects(words, effects),
        )

    def words_that_mattered(self, response: SearchResponse | None, selected: int) -> list[tuple[str, float | None]]:
        """Each query word with its effect on the selected result's score (the score with the word
        left out, as a share of the largest effect: + helped, - hurt; None: "a", "with", not scored),
        for a highlighted text."""
        if response is None or not response.results:
            return []
        effects = self.word_effects(response, response.results[min(max(int(selected), 0), len(response.results) - 1)])
        return self.scaled_effects(response.query.words, effects)

    @staticmethod
    def scaled_effects(words: list[str], effects: np.ndarray) -> list[tuple[str, float | None]]:
        """word_effects as a highlighted text: each effect as a share of the largest (None: not scored)."""
        scored = effects[~np.isnan(effects)]
        scale = float(np.abs(scored).max()) if len(scored) else 0.0
        # An unscored word is plain text, and plain neighbours would run together ("witha"): it
        # keeps its space.
        return [
            (w + " ", None) if scale <= 0 or np.isnan(e) else (w, round(float(e) / scale, 3))
            for w, e in zip(words, effects)
        ]

    def word_effects(self, response: SearchResponse, result: SearchResult) -> np.ndarray:
        """(W,) what each query word adds to the result's score (search.word_effects; NaN: not
        scored). The image-independent half is kept for the last few queries: another result of the
        query reuses it."""
        key = response.query.token_ids.tobytes()
        with self._left_out_lock:
            left_out = self._left_out.get(key)
        if left_out is None:
            left_out = words_left_out(self.engine.model, response.query)
            with self._left_out_lock:
                self._left_out[key] = left_out
                while len(self._left_out) > 16:
                    self._left_out.pop(next(iter(self._left_out)))  # the oldest
        return word_effects(self.engine.model, response.query, result.parts, left_out)

    def chart_atom_atlas(self, atom: str | None) -> tuple[list[tuple[Any, str]], str]:
        """The atlas of the atom picked from the chart; nothing while none is picked."""
        return self.model.atom_atlas(atom) if atom not in (None, "") else ([], "")

    def guidance(self, response: SearchResponse | None, selected: int, word: str | None) -> Any:
        """Which regions of the selected image read the chosen query word (cross-modality guidance)."""
        if response is None or not response.results or not word:
            return None
        result = response.results[min(max(int(selected), 0), len(response.results) - 1)]
        try:
            column = int(str(word).split(":", 1)[0]) - 1
        except ValueError:
            return None
        if not 0 <= column < len(response.query.words):
            return None
        weights = self.engine.guidance(response.query, result.path)
        return overlay(display_rgb(result.path), weights[:, column], response.grid)

    def api_search(self, query: str, k: float = 10) -> dict[str, Any]:
        """The /search endpoint: plain JSON (gallery file names, scores, per-prototype similarities).

        An error answer names the problem without echoing the input back."""
        try:
            response = self.engine.search(query, result_count(k))
        except QueryError as error:
            return {"error": str(error), "results": []}
        body = response.to_json()
        for result in body["results"]:
            result["url"] = f"{GALLERY_ROUTE}/{quote(result['file'])}"
        return body

    # -- why not this one? -----------------------------------------------------------------------
    def why_not(self, response: SearchResponse | None, file: str | None) -> tuple[str, list[tuple[Any, str]]]:
        """An image the visitor expected, beside the top result: its rank and score, per prototype the
        similarity of both, the part where it loses most, the atoms that differ; both sets of maps."""
        if response is None or not response.results:
            return "Search first, then pick the image you expected.", []
        try:
            comparison = self.engine.compare(response.query.text, file)
        except QueryError as error:
            return html.escape(str(error)), []
        image, top = comparison.image, comparison.top
        lose = comparison.loses_most
        table = "\n".join(
            ["| prototype | this image | top result |", "| --- | --- | --- |"]
            + [
                f"| {n} | {a:.2f} | {b:.2f} |"
                for n, a, b in zip(self.prototypes, image.part_similarity, top.part_similarity)
            ]
        )
        text = "\n\n".join(
            [
                f"`{html.escape(image.file)}` ranks **#{image.rank}** of {comparison.gallery_size:,} (score "
                f"{image.score:.3f}; the top result `{html.escape(top.file)}` {top.score:.3f}).",
                f"It loses most on **{self.prototypes[lose]}** (similarity {image.part_similarity[lose]:.2f} against "
                f"{top.part_similarity[lose]:.2f}).",
                table,
                f"Atoms the top result shares with the query and this image does not: "
                f"{', '.join(map(str, comparison.atoms_it_lacks)) or 'none'}; shared only by this image: "
                f"{', '.join(map(str, comparison.atoms_only_it_has)) or 'none'}.",
            ]
            + ([detail_comparison(image, top)] if image.details else [])
        )
        mine = prototype_overlays(image, response.prototype_grid, names=self.readings(image))[:-1]
        theirs = prototype_overlays(top, response.prototype_grid, names=self.readings(top))[:-1]
        maps = [item for pair in zip(mine, theirs) for item in pair]
        maps = [(picture, f"{'this' if i % 2 == 0 else 'top'}: {caption}") for i, (picture, caption) in enumerate(maps)]
        return text, maps

    def api_why_not(self, query: str, file: str) -> dict[str, Any]:
        """The /why_not endpoint: a gallery file's rank and explanation for a query, beside the top result's."""
        try:
            return self.engine.compare(query, file).to_json()
        except QueryError as error:
            return {"error": str(error)}

    def gallery_image(self, file: str) -> Path | None:
        """The image behind GET /gallery/<file>: indexed gallery files only, by gallery-relative name."""
        return self.engine.image_path(file)


def create(
    checkpoint: Path,
    gallery: Path,
    progress: bool = True,
    shared_uploads: bool = False,
    sessions: Path | None = None,
    limits: UploadLimits | None = None,
    cache: Path | None = None,
) -> Explorer:
    """Open the checkpoint and the gallery (indexing what changed), start the background warm-up
    and the sweeper of stale uploads."""
    engine, report = SearchEngine.open(checkpoint, gallery, progress=progress)
    log.info("gallery %s: %s", gallery, report.summary())
    engine.warm_up()
    explorer = Explorer(engine, shared_uploads=shared_uploads, sessions=sessions, limits=limits, cache=cache)
    explorer.gallery.store.start_sweeper()
    return explorer


def server_address(host: str | None, port: int | None, environ: dict[str, str]) -> tuple[str, int]:
    """Where to listen: explicit flags, then LGUR_HOST/LGUR_PORT, then Gradio's own
    GRADIO_SERVER_NAME/GRADIO_SERVER_PORT (what Hugging Face Spaces sets), then 127.0.0.1:7860."""
    host = host or environ.get("LGUR_HOST") or environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    port_text = port or environ.get("LGUR_PORT") or environ.get("GRADIO_SERVER_PORT") or 7860
    try:
        return host, int(port_text)
    except ValueError:
        raise SystemExit(f"cannot start: the port must be a number, got {port_text!r}") from None
