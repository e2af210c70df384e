"""LGUR Explorer: search pedestrians by description and see why each result matched.

`python app.py` serves the shipped model and gallery on http://127.0.0.1:7860.
The interface is built from the `Explorer` methods below, plain functions of their
inputs that tests call directly; all model work happens in the `lgur` package.
"""

from __future__ import annotations

import argparse
import html
import logging
import math
import os
import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home; the Space may be offline

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from lgur import DEFAULT_CHECKPOINT, DEFAULT_GALLERY
from lgur.checkpoint import CheckpointError
from lgur.explain import atom_chart, overlay, prototype_names, prototype_overlays, word_highlights
from lgur.files import MAX_FILE_BYTES, open_rgb, remove_temporaries
from lgur.gallery import PrivateGallery, add_images, private_sessions_root
from lgur.quality import summary_rows
from lgur.search import QueryError, SearchEngine, SearchResponse

log = logging.getLogger("lgur.app")
ROOT = Path(__file__).resolve().parent
MAX_RESULTS = 50
PER_PAGE = 120  # gallery tab
GALLERY_ROUTE = "/gallery"  # GET /gallery/<file>: a gallery image by the name /search answers with
SESSION_SECONDS = 3600
MAX_SESSIONS = 200  # sessions whose state is kept (oldest dropped first): bounds memory
MAX_QUEUE = 64  # waiting requests; more are refused at once instead of piling up

EXAMPLES = [
    "a woman in a red coat with a black backpack",
    "A man wearing a white t-shirt, blue jeans and black sneakers. He carries a grey shoulder bag.",
    "young girl with long blonde hair in a pink skirt",
    "an old man with grey hair and glasses walking away from the camera",
    "person in a yellow hoodie holding an umbrella",
]


def _layer_index(layer: str) -> int:
    return -1 if layer in ("last", "", None) else int(layer) - 1


def _head_index(head: str) -> int | None:
    return None if head in ("mean", "", None) else int(head) - 1


def _prototype_index(prototype: str) -> int:
    return int(str(prototype).split()[0].lstrip("P")) - 1 if prototype else 0  # "P3" or "P3 upper body" -> 2


def result_count(k: Any) -> int:
    """The number of results asked for, as a whole number from 1 to MAX_RESULTS (else QueryError)."""
    if isinstance(k, bool) or not isinstance(k, int | float) or not math.isfinite(k) or k != int(k):
        raise QueryError(f"The number of results must be a whole number from 1 to {MAX_RESULTS}.")
    if not 1 <= k <= MAX_RESULTS:
        raise QueryError(f"The number of results must be from 1 to {MAX_RESULTS}.")
    return int(k)


class Explorer:
    """The app's behaviour: every event handler is a method over plain values."""

    def __init__(
        self,
        engine: SearchEngine,
        shared_uploads: bool = False,
        sessions: Path | None = None,
        uploads: str = "uploads",
    ):
        """shared_uploads: uploads go into the gallery for everyone (local use); otherwise each
        visitor's uploads stay private to their session, in their own folder under `sessions`."""
        self.engine = engine
        self.card = engine.card
        self.shared_uploads = shared_uploads
        self.sessions = sessions or private_sessions_root()
        self.uploads = uploads  # gallery sub-folder that receives shared uploads
        model = engine.model.config
        self.layers = ["last"] + [str(i + 1) for i in range(model.pgu_layers)]
        self.heads = ["mean"] + [str(i + 1) for i in range(model.pgu_heads)]
        self.prototypes = prototype_names(self.card, model.num_prototypes if model.use_pgu else 1)
        remove_temporaries(engine.gallery / uploads)  # copies cut short by a crash: never accepted

    # -- search -------------------------------------------------------------------------------
    def search(
        self, query: str, k: float, private: PrivateGallery | None = None
    ) -> tuple[list[tuple[str, str]], str, SearchResponse | None]:
        """-> results gallery (file, caption), a status line, the response (kept per session)."""
        try:
            response = self.engine.search(query, result_count(k), private.index if private else None)
        except QueryError as error:
            return [], f"⚠️ {html.escape(str(error))}", None
        items = [(r.path, f"#{r.rank} · {r.score:.2f}") for r in response.results]
        note = " (the query was longer than the model reads; the end was ignored)" if response.query.truncated else ""
        status = f"{len(items)} results in {1000 * response.seconds:.0f} ms{note}. Select one to see why it matched."
        if response.colour_note:
            status = f"🎨 Colours read as the model knows them: {html.escape(response.colour_note)}.\n\n{status}"
        if response.warning:
            status = f"⚠️ {html.escape(response.warning)}\n\n{status}"
        if not items:
            status = "The gallery is empty: add images in the Gallery tab."
        return items, status, response

    def explain(
        self, response: SearchResponse | None, selected: int, layer: str, head: str, prototype: str
    ) -> tuple[list[tuple[Any, str]], list[tuple[str, float]], Any, Any, str, Any, Any]:
        """Panels for one result: prototype maps, highlighted words, atom chart, foreground map, notes,
        the query's words (for the guidance map) and the chart's atoms (for the atlas).

        So that no panel opens empty, the word picked is the one the selected prototype reads most,
        and the atom the first both sides share (else the chart's first); `details` draws them.
        """
        if response is None or not response.results:
            empty = gr.update(choices=[], value=None)
            return [], [], None, None, "", empty, empty
        result = response.results[min(max(int(selected), 0), len(response.results) - 1)]
        li, hi, pi = _layer_index(layer), _head_index(head), _prototype_index(prototype)
        maps = prototype_overlays(result, response.grid, li, hi, self.prototypes)
        words = word_highlights(response.query, pi, li, hi)
        relative = self.engine.relative_atoms
        chart = atom_chart(
            response.query.atom_weights, result.atom_weights, result.salient_atoms, result.shared_atoms,
            title="weight / average" if relative else "mean atom weight", reference=1.0 if relative else None,
        )  # fmt: skip
        foreground = overlay(open_rgb(result.path), result.foreground, response.grid, alpha=0.55)
        best = result.strongest_part
        meta = result.metadata
        lines = [
            f"**Result #{result.rank}** `{html.escape(result.file)}`, cosine similarity **{result.score:.3f}**.",
            f"Strongest part: **{self.prototypes[best]}** ({100 * result.score_share[best]:.0f}% of the score).",
            (
                "Atoms particular to both (in the top 20 of the query and of the image, by weight relative to the "
                "average description and gallery image): "
                if relative
                else "Atoms shared by the query's and the image's top 20: "
            )
            + f"{', '.join(map(str, result.shared_atoms)) or 'none'}.",
        ]
        if meta.get("captions"):
            lines.append(f"Gallery caption: _{html.escape(meta['captions'][0])}_")
        word_choices = [f"{i + 1}: {w}" for i, w in enumerate(response.query.words)]
        word = word_choices[max(range(len(words)), key=lambda i: words[i][1])] if words else None
        shared = [a for a in result.salient_atoms if a in result.shared_atoms]
        atom_choices = [(f"{a} (shared)", str(a)) for a in shared]
        atom_choices += [(str(a), str(a)) for a in result.salient_atoms if a not in shared]
        return (
            maps,
            words,
            chart,
            foreground,
            "\n\n".join(lines),
            gr.update(choices=word_choices, value=word),
            gr.update(choices=atom_choices, value=atom_choices[0][1] if atom_choices else None),
        )

    def details(
        self, response: SearchResponse | None, selected: int, word: str | None, atom: str | None
    ) -> tuple[Any, list[tuple[Any, str]], str]:
        """The panels drawn after the rest: the guidance map of one word, the atlas of one atom."""
        return self.guidance(response, selected, word), *self.chart_atom_atlas(atom)

    def chart_atom_atlas(self, atom: str | None) -> tuple[list[tuple[Any, str]], str]:
        """The atlas of the atom picked from the chart; nothing while none is picked."""
        return self.atom_atlas(atom) if atom not in (None, "") else ([], "")

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
        return overlay(open_rgb(result.path), weights[:, column], response.grid)

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

    def gallery_image(self, file: str) -> Path | None:
        """The image behind GET /gallery/<file>: indexed gallery files only, by gallery-relative name."""
        return self.engine.image_path(file)

    # -- gallery ------------------------------------------------------------------------------
    def browse(
        self, page: float = 1, private: PrivateGallery | None = None, per_page: int = PER_PAGE
    ) -> tuple[list[tuple[str, str]], str]:
        """One page of the gallery, uploads first (the visitor's own, then shared ones): (image file,
        name) items and a line saying where we are."""
        mine = [private.images / f for f in private.files()] if private else []
        shared = sorted(self.engine.files(), key=lambda f: (not f.startswith(f"{self.uploads}/"), f))
        files = mine + [self.engine.gallery / f for f in shared]
        pages = max(1, math.ceil(len(files) / per_page))
        page = min(max(int(page) if isinstance(page, int | float) and math.isfinite(page) else 1, 1), pages)
        shown = files[(page - 1) * per_page : page * per_page]
        uploads = len(mine) + sum(f.startswith(f"{self.uploads}/") for f in shared)
        where = f"Page {page} of {pages}: {len(files)} images ({uploads} uploaded, listed first)."
        return [(str(f), f.name) for f in shown], where

    def upload(
        self, files: list[Any] | None, private: PrivateGallery | None = None
    ) -> tuple[str, list[tuple[str, str]], PrivateGallery | None]:
        """Add uploaded files (validated, indexed at once) to the visitor's private gallery, or to
        the shared one with `shared_uploads`; report what was refused."""
        paths = [Path(getattr(f, "name", f)) for f in (files or [])]
        if not paths:
            return "No files were given.", self.browse(1, private)[0], private
        if not self.shared_uploads and private is None:
            private = PrivateGallery.create(self.sessions)
        report = add_images(self.engine, paths, self.uploads, None if self.shared_uploads else private)
        whose = "the gallery now holds" if self.shared_uploads else "only you see them; your search covers"
        lines = [f"Added {len(report.added)} image(s); {whose} {report.gallery_size}."]
        lines += [f"- rejected `{html.escape(name)}`: {html.escape(reason)}" for name, reason in report.rejected]
        return "\n".join(lines), self.browse(1, private)[0], private

    # -- model --------------------------------------------------------------------------------
    def model_card(self) -> str:
        card = self.card
        config = card.get("config", {})
        metrics = card.get("metrics", {})
        lines = ["| | |", "| --- | --- |"]
        rows = {
            "image encoder": f"{config.get('image', {}).get('timm_name')} at {config.get('image', {}).get('img_size')}",
            "text encoder": f"{card.get('text_encoder', {}).get('name')} (frozen) + BiLSTM",
            "dictionary atoms / prototypes": f"{config.get('num_atoms')} / {config.get('num_prototypes')}",
            "embedding": f"{config.get('num_prototypes', 1) * config.get('part_dim', 0)}-d",
            "parameters (trainable / frozen)": "{trainable:,} / {frozen:,}".format(**card.get("parameters", {}))
            if card.get("parameters")
            else "",
            "training data": str(card.get("data", {}).get("path", "")),
        }
        lines += [f"| {k} | {html.escape(str(v))} |" for k, v in rows.items()]
        for split, m in metrics.items():
            lines.append(
                f"| {split} | R@1 {m.get('R@1')} · R@5 {m.get('R@5')} · R@10 {m.get('R@10')} · mAP {m.get('mAP')} |"
            )
        for style, qb in card.get("query_bench", {}).items():
            lines.append(
                f"| short queries ({style} set) | attribute precision@10 {qb['precision@10']:.1f}% · top-1 right "
                f"{qb['top1']:.1f}% · chance {qb['chance']:.1f}% ({qb['queries']} queries) |"
            )
        names = ", ".join(self.prototypes)
        lines += [f"| {k} | {v} |" for k, v in summary_rows(card.get("explanations", {}), names)]
        return "\n".join(lines)

    def atom_atlas(self, atom: float) -> tuple[list[tuple[Any, str]], str]:
        """For one atom: the gallery patches and the vocabulary words that use it most."""
        try:
            number = int(atom)
        except (TypeError, ValueError, OverflowError):
            return [], "Pick an atom by its number."
        try:
            atlas = self.engine.atom_atlas(number)
        except ValueError as error:  # no dictionary, or no such atom
            return [], html.escape(str(error))
        items = [
            (overlay(open_rgb(path), weights, self.engine.grid), f"{path.name} ({weights.max():.3f})")
            for path, weights in atlas.images
        ]
        words = ", ".join(f"{html.escape(w)} ({v:.3f})" for w, v in atlas.words)
        return items, f"**Atom {atlas.atom}**: words that use it most: {words or 'none (no gallery captions)'}"


def read_extra(name: str) -> str:
    path = ROOT / "assets" / name
    return path.read_text() if path.is_file() else ""


def build_app(explorer: Explorer) -> gr.Blocks:
    # Uploaded files in Gradio's cache are deleted an hour after they arrive.
    with gr.Blocks(title="LGUR Explorer", delete_cache=(600, SESSION_SECONDS)) as demo:
        gr.Markdown(
            "# LGUR Explorer\nDescribe a pedestrian; the model ranks the gallery and shows **why**: the PGU "
            "prototypes' attention over the image and your words, and the DGA dictionary atoms both sides were "
            "rebuilt from."
        )
        # Per visitor, kept an hour at most (and launch() caps how many sessions are kept).
        response_state = gr.State(None, time_to_live=SESSION_SECONDS)
        selected_state = gr.State(0, time_to_live=SESSION_SECONDS)
        # The visitor's own uploads: their files are deleted with the session.
        private_state = gr.State(None, time_to_live=SESSION_SECONDS, delete_callback=_remove_private)
        with gr.Tab("Search"):
            with gr.Row():
                query = gr.Textbox(label="Description", placeholder=EXAMPLES[0], scale=5, max_lines=3,
                                   elem_id="query")  # fmt: skip
                k = gr.Slider(1, MAX_RESULTS, value=10, step=1, label="results", scale=1)
                go = gr.Button("Search", variant="primary", scale=1, elem_id="search-button")
            gr.Examples(EXAMPLES, inputs=query)
            status = gr.Markdown(elem_id="status")
            results = gr.Gallery(label="Results", columns=10, height=200, object_fit="contain", allow_preview=False,
                                 elem_id="results")  # fmt: skip
            gr.Markdown("## Why this result")
            with gr.Row():
                layer = gr.Dropdown(explorer.layers, value="last", label="PGU layer")
                head = gr.Dropdown(explorer.heads, value="mean", label="attention head")
                prototype = gr.Dropdown(
                    [(name, f"P{i + 1}") for i, name in enumerate(explorer.prototypes)],  # shown: "P3 upper body"
                    value="P1",
                    label="prototype for the words",
                )
            summary = gr.Markdown(elem_id="summary")
            maps = gr.Gallery(label="Prototype attention (share of the score)",
                              columns=7, height=280, object_fit="contain", elem_id="prototype-maps",
                              format="jpeg")  # fmt: skip
            words = gr.HighlightedText(label="Query words, coloured by the selected prototype's attention",
                                       elem_id="words")  # fmt: skip
            with gr.Row():
                with gr.Column(scale=3):
                    gr.Markdown("**DGA: the dictionary atoms the query and the image were rebuilt from**")
                    chart = gr.Image(show_label=False, type="pil", elem_id="atom-chart")
                foreground = gr.Image(
                    label="DGA foreground weight m", type="pil", elem_id="foreground", scale=1, format="jpeg"
                )
            with gr.Row():
                word = gr.Dropdown([], label="Cross-modality guidance: pick a query word", scale=1)
                guidance = gr.Image(
                    label="Regions this word feeds (their attention to it x foreground weight m)",
                    type="pil",
                    scale=1,
                    elem_id="guidance",
                    format="jpeg",
                )
            with gr.Row():
                chart_atom = gr.Dropdown([], label="What is an atom of the chart? Pick one (shared ones first)",
                                         elem_id="chart-atom", scale=1)  # fmt: skip
                chart_atom_words = gr.Markdown(elem_id="chart-atom-words")
            chart_atom_patches = gr.Gallery(label="Gallery images whose patches use this atom most", columns=8,
                                            height=300, object_fit="contain", format="jpeg",
                                            elem_id="chart-atom-patches")  # fmt: skip

            explain_inputs = [response_state, selected_state, layer, head, prototype]
            explain_outputs = [maps, words, chart, foreground, summary, word, chart_atom]
            # The guidance map and the atlas (an image encoder pass over 8 images) come just after.
            details_inputs = [response_state, selected_state, word, chart_atom]
            details_outputs = [guidance, chart_atom_patches, chart_atom_words]

            def on_search(q, n, la, he, pr, private):
                items, text, response = explorer.search(q, n, private)
                fresh = gr.Gallery(value=items, selected_index=None)  # no stale highlight from the last search
                return (fresh, text, response, 0, *explorer.explain(response, 0, la, he, pr))

            search_outputs = [results, status, response_state, selected_state, *explain_outputs]
            search_inputs = [query, k, layer, head, prototype, private_state]
            # The full response (results and every panel) is callable too, for benchmarks and scripts.
            go.click(on_search, search_inputs, search_outputs, api_name="explore", api_visibility="undocumented").then(
                explorer.details, details_inputs, details_outputs, api_visibility="private"
            )
            query.submit(on_search, search_inputs, search_outputs, api_visibility="private").then(
                explorer.details, details_inputs, details_outputs, api_visibility="private"
            )

            def on_select(response, la, he, pr, evt: gr.SelectData):
                return (evt.index, *explorer.explain(response, evt.index, la, he, pr))

            results.select(on_select, [response_state, layer, head, prototype], [selected_state, *explain_outputs],
                           api_visibility="private").then(explorer.details, details_inputs, details_outputs,
                                                          api_visibility="private")  # fmt: skip
            for control in (layer, head, prototype):
                control.change(explorer.explain, explain_inputs, explain_outputs, api_visibility="private").then(
                    explorer.details, details_inputs, details_outputs, api_visibility="private"
                )
            # .input, not .change: explain() sets both dropdowns, and the chained details() draws their panels.
            word.input(explorer.guidance, [response_state, selected_state, word], guidance, api_visibility="private")

            chart_atom.input(explorer.chart_atom_atlas, chart_atom, [chart_atom_patches, chart_atom_words],
                              api_visibility="private")  # fmt: skip

        with gr.Tab("Gallery"):
            whose = ("they join the gallery for everyone" if explorer.shared_uploads else
                     "only you see them, they are searched with the gallery and deleted when you leave "
                     f"(or after {SESSION_SECONDS // 60} minutes)")  # fmt: skip
            gr.Markdown(f"Browse the gallery, or add images (JPEG/PNG/WebP/BMP/GIF, up to "
                        f"{MAX_FILE_BYTES // 2**20} MB each): they are indexed at once; {whose}.")  # fmt: skip
            uploads = gr.File(file_count="multiple", label="Add images", elem_id="upload")
            upload_report = gr.Markdown()
            first_page, where = explorer.browse(1)
            with gr.Row():
                page = gr.Number(value=1, precision=0, minimum=1, label="page", scale=1, elem_id="page")
                page_info = gr.Markdown(where, elem_id="page-info")
            browse = gr.Gallery(value=first_page, columns=10, height=520, object_fit="contain", label="Gallery",
                                elem_id="browse")  # fmt: skip

            def on_upload(files, private, progress=gr.Progress()):  # noqa: B008
                progress(0, desc="indexing")
                report, _, private = explorer.upload(files, private)
                items, text = explorer.browse(1, private)
                return report, items, text, 1, private

            uploads.upload(on_upload, [uploads, private_state], [upload_report, browse, page_info, page, private_state],
                           api_visibility="private")  # fmt: skip
            page.change(explorer.browse, [page, private_state], [browse, page_info], api_visibility="private")

        with gr.Tab("Model"):
            gr.Markdown(explorer.model_card())
            for name, title in (("ablation.md", "Ablation"), ("experiments.md", "The recipe's options, one at a time")):
                table = read_extra(name)  # each file says how it was measured
                if table:
                    gr.Markdown(f"### {title} (synthetic world)\n\n{table}")
            if (ROOT / "assets" / "cmc.png").is_file():
                gr.Image(str(ROOT / "assets" / "cmc.png"), label="CMC curve (test split)", type="filepath")
            gr.Markdown("### Atom atlas\nPick one of the dictionary's atoms: the gallery patches and the words that "
                        "use it most.")  # fmt: skip
            with gr.Row():
                atom = gr.Number(value=0, precision=0, label="atom", minimum=0,
                                 maximum=max(explorer.engine.model.config.num_atoms - 1, 0))  # fmt: skip
                show = gr.Button("Show atom")
            atlas = gr.Gallery(columns=8, height=320, object_fit="contain", label="patches", format="jpeg")
            atlas_words = gr.Markdown()
            show.click(explorer.atom_atlas, atom, [atlas, atlas_words], api_visibility="private")

        gr.api(explorer.api_search, api_name="search")
    return demo


def resolve_checkpoint(
    value: str | None, hub_repo: str | None, hub_file: str | None, hub_revision: str | None = None
) -> Path:
    """A local path, or a file fetched from a Hugging Face Hub repository (with its card), at a
    pinned revision (a commit hash) when given. Raises ValueError or OSError saying what failed."""
    if not hub_repo:
        return Path(value) if value else DEFAULT_CHECKPOINT
    from huggingface_hub import hf_hub_download

    name = hub_file or "lgur_cpu.safetensors"
    if not name.endswith(".safetensors") or name.startswith(("/", "..")) or "/../" in name:
        raise ValueError(f"the hub file must be a .safetensors path inside the repository, got {name!r}")
    if not hub_revision:
        log.warning("fetching %s from %s unpinned: pass --hub-revision COMMIT to pin it", name, hub_repo)
    try:
        path = Path(hf_hub_download(hub_repo, name, revision=hub_revision))
        hf_hub_download(hub_repo, str(Path(name).with_suffix(".json")), revision=hub_revision)
    except Exception as error:  # the hub client raises many types (HTTP, validation, offline)
        raise OSError(f"could not fetch {name} from {hub_repo}: {type(error).__name__}: {error}") from None
    return path


def create(checkpoint: Path, gallery: Path, progress: bool = True, shared_uploads: bool = False) -> Explorer:
    engine, report = SearchEngine.open(checkpoint, gallery, progress=progress)
    log.info("gallery %s: %s", gallery, report.summary())
    # The atom atlas's word table (about 3 s on 2 cores), made in the background after start.
    threading.Thread(target=engine.word_atoms, name="atlas-words", daemon=True).start()
    return Explorer(engine, shared_uploads=shared_uploads)


# Phones (390 px): image grids wrap instead of scrolling sideways, tables scroll inside their box,
# tall maps and the atom chart keep a readable size.
CSS = """
@media (max-width: 720px) {
  #results .grid-container { grid-template-columns: repeat(3, minmax(0, 1fr)) !important; }
  #prototype-maps .grid-container, #chart-atom-patches .grid-container,
  #browse .grid-container { grid-template-columns: repeat(4, minmax(0, 1fr)) !important; }
  #results, #prototype-maps, #chart-atom-patches, #results .grid-wrap, #prototype-maps .grid-wrap,
  #chart-atom-patches .grid-wrap { height: auto !important; max-height: none !important; overflow: visible !important; }
  #foreground img, #guidance img { max-height: 360px; object-fit: contain; }
  .prose table { display: block; overflow-x: auto; }
  .prose td, .prose th { white-space: nowrap; }
}
"""


def _remove_private(private: PrivateGallery | None) -> None:
    if private is not None:
        private.remove()


def launch_options(explorer: Explorer) -> dict[str, Any]:
    """How the app is served (also by the tests): image files from the gallery folder and Gradio's
    own outputs only, no error details, uploads and kept sessions capped."""
    return {
        "allowed_paths": [str(explorer.engine.gallery), str(explorer.sessions / "images")],
        "blocked_paths": [str(explorer.engine.index_dir)],  # the index may sit inside the gallery
        "show_error": False,
        "max_file_size": MAX_FILE_BYTES,
        "state_session_capacity": MAX_SESSIONS,
        "css": CSS,
        "ssr_mode": False,  # no Node.js server: faster start, one process
    }


def add_gallery_route(demo: gr.Blocks, explorer: Explorer) -> None:
    """GET /gallery/<file>: an indexed gallery image by the name /search answers with (after launch)."""
    from fastapi.responses import FileResponse, PlainTextResponse

    def gallery_file(file: str) -> Any:
        path = explorer.gallery_image(file)
        return FileResponse(path) if path else PlainTextResponse("no such gallery image", status_code=404)

    demo.app.add_api_route(GALLERY_ROUTE + "/{file:path}", gallery_file, methods=["GET"])


def server_address(host: str | None, port: int | None, environ: dict[str, str]) -> tuple[str, int]:
    """Where to listen: explicit flags, then LGUR_HOST/LGUR_PORT, then Gradio's own
    GRADIO_SERVER_NAME/GRADIO_SERVER_PORT (what Hugging Face Spaces sets), then 127.0.0.1:7860."""
    host = host or environ.get("LGUR_HOST") or environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    port_text = port or environ.get("LGUR_PORT") or environ.get("GRADIO_SERVER_PORT") or 7860
    try:
        return host, int(port_text)
    except ValueError:
        raise SystemExit(f"cannot start: the port must be a number, got {port_text!r}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", help="default: LGUR_HOST, GRADIO_SERVER_NAME or 127.0.0.1")
    parser.add_argument("--port", type=int, help="default: LGUR_PORT, GRADIO_SERVER_PORT or 7860")
    parser.add_argument("--checkpoint", default=os.environ.get("LGUR_CHECKPOINT"))
    parser.add_argument("--gallery", default=os.environ.get("LGUR_GALLERY", str(DEFAULT_GALLERY)))
    parser.add_argument("--hub-repo", default=os.environ.get("LGUR_HUB_REPO"), help="fetch the checkpoint from here")
    parser.add_argument("--hub-file", default=os.environ.get("LGUR_HUB_FILE"))
    parser.add_argument("--hub-revision", default=os.environ.get("LGUR_HUB_REVISION"), help="commit to pin")
    parser.add_argument(
        "--shared-uploads",
        action="store_true",
        default=os.environ.get("LGUR_SHARED_UPLOADS") == "1",
        help="uploads go into the gallery for every visitor (local use; default: private to each session)",
    )
    args = parser.parse_args(argv)
    host, port = server_address(args.host, args.port, dict(os.environ))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    try:
        checkpoint = resolve_checkpoint(args.checkpoint, args.hub_repo, args.hub_file, args.hub_revision)
        explorer = create(checkpoint, Path(args.gallery), shared_uploads=args.shared_uploads)
    except (CheckpointError, OSError, ValueError) as error:
        raise SystemExit(f"cannot start: {error}") from error
    demo = build_app(explorer)
    demo.queue(default_concurrency_limit=4, max_size=MAX_QUEUE)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, **launch_options(explorer))
    add_gallery_route(demo, explorer)
    demo.block_thread()


if __name__ == "__main__":
    main()
