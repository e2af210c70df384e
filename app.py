"""LGUR Explorer: search pedestrians by description and see why each result matched.

`python app.py` serves the shipped model and gallery on http://127.0.0.1:7860.
The page is laid out here and wired to `lgur.app.explorer.Explorer`, whose methods are plain
functions of their inputs that tests call directly; all model work happens in the `lgur` package.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from lgur.search.gallery import private_sessions_root  # noqa: E402

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home; the Space may be offline
SESSIONS = private_sessions_root()
if __name__ == "__main__":  # Gradio's cache inside this process's folder: a restart after a crash removes it
    os.environ.setdefault("GRADIO_TEMP_DIR", str(SESSIONS / "cache"))

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from lgur import DEFAULT_GALLERY  # noqa: E402
from lgur.app.explorer import EXAMPLES, GALLERY_ROUTE, INTRO, Choices, Explorer, create, server_address  # noqa: E402
from lgur.app.uploads import SESSION_SECONDS, UploadLimits, meter_uploads  # noqa: E402
from lgur.app.visitors import limit_per_visitor, visitor_limits  # noqa: E402
from lgur.files import MAX_FILE_BYTES  # noqa: E402
from lgur.model.checkpoint import CheckpointError, resolve_checkpoint  # noqa: E402
from lgur.search.explain import EFFECTS_LEGEND, FOREGROUND_LEGEND, MAP_LEGEND, WORDS_LEGEND  # noqa: E402
from lgur.search.query import MAX_RESULTS  # noqa: E402

ROOT = Path(__file__).resolve().parent
MAX_SESSIONS = int(os.environ.get("LGUR_MAX_SESSIONS", 200))  # sessions whose page state is kept: bounds memory
MAX_QUEUE = 64  # waiting requests; more are refused at once instead of piling up


def panels(explained: tuple) -> tuple:
    """Explorer.explain's values for Gradio: the two pickers' Choices become dropdown updates."""
    return tuple(gr.update(choices=v.choices, value=v.value) if isinstance(v, Choices) else v for v in explained)


def picker(choices: list[Any], **options: Any) -> gr.Dropdown:
    """A dropdown that hands any value to its handler, which reads one outside the choices as its default
    or refuses it in words: Gradio's own refusal echoes the value and every choice (all gallery names)."""
    return gr.Dropdown(choices, allow_custom_value=True, **options)


def build_app(explorer: Explorer) -> gr.Blocks:
    gr.set_static_paths([explorer.engine.gallery])  # results are served from the gallery, not copied per answer
    with gr.Blocks(title="LGUR Explorer", delete_cache=(600, SESSION_SECONDS)) as demo:
        gr.Markdown(INTRO)
        response_state = gr.State(None, time_to_live=SESSION_SECONDS)  # per visitor, an hour (launch() caps visitors)
        selected_state = gr.State(0, time_to_live=SESSION_SECONDS)

        def leave(request: gr.Request) -> None:  # the page closed: the visitor's uploads go (explorer.gallery.store)
            explorer.gallery.leave(request.session_hash)

        demo.unload(leave)
        with gr.Tab("Search"):
            with gr.Row():
                query = gr.Textbox(label="Description", placeholder=EXAMPLES[0], scale=5, max_lines=3, elem_id="query")
                k = gr.Slider(1, MAX_RESULTS, value=10, step=1, label="results", scale=1)
                go = gr.Button("Search", variant="primary", scale=1, elem_id="search-button")
            # A dataset with a queued click, not gr.Examples: its click runs outside the queue, and only fills
            # the box. Clicking an example searches for it.
            examples = gr.Dataset(
                components=[query], samples=[[e] for e in EXAMPLES], type="index", label="Examples", elem_id="examples"
            )
            status = gr.Markdown(elem_id="status")
            results = gr.Gallery(
                label="Results", columns=10, height=200, object_fit="contain", allow_preview=False, elem_id="results"
            )
            gr.Markdown("## Why this result")
            with gr.Row():
                layer = picker(explorer.layers, value="last", label="PGU layer")
                head = picker(explorer.heads, value="mean", label="attention head")
                prototype = picker(explorer.prototypes, value="P1", label="prototype for the words")
            summary = gr.Markdown(elem_id="summary")
            maps = gr.Gallery(
                label="Prototype attention (share of the similarity, what it reads here); then where "
                "each detail was seen",
                columns=7,
                height="auto",
                object_fit="contain",
                elem_id="prototype-maps",
                format="jpeg",
            )
            gr.HTML(MAP_LEGEND, elem_id="maps-legend")
            words = gr.HighlightedText(
                label="Query words, coloured by the selected prototype's attention", elem_id="words"
            )
            gr.HTML(WORDS_LEGEND, elem_id="words-legend")
            mattered = gr.HighlightedText(
                label="Which words mattered for this result: the score without each word (+ helped, - hurt)",
                elem_id="word-effects",
            )
            gr.HTML(EFFECTS_LEGEND, elem_id="effects-legend")
            with gr.Row():
                with gr.Column(scale=3):
                    gr.Markdown("**DGA: the dictionary atoms the query and the image were rebuilt from**")
                    chart = gr.Image(show_label=False, type="pil", elem_id="atom-chart", format="png")
                with gr.Column(scale=1):
                    foreground = gr.Image(
                        label=explorer.foreground_label, type="pil", elem_id="foreground", format="jpeg"
                    )
                    gr.HTML(FOREGROUND_LEGEND, elem_id="foreground-legend")
            with gr.Row():
                word = picker([], label="Cross-modality guidance: pick a query word", scale=1)
                with gr.Column(scale=1):
                    guidance = gr.Image(label=explorer.guidance_label, type="pil", elem_id="guidance", format="jpeg")
                    gr.HTML(MAP_LEGEND, elem_id="guidance-legend")
            with gr.Row():
                chart_atom = picker(
                    [],
                    label="What is an atom of the chart? Pick one (shared ones first)",
                    elem_id="chart-atom",
                    scale=1,
                )
                chart_atom_words = gr.Markdown(elem_id="chart-atom-words")
            chart_atom_patches = gr.Gallery(
                label="Gallery images whose patches use this atom most",
                columns=8,
                height=300,
                object_fit="contain",
                format="jpeg",
                elem_id="chart-atom-patches",
            )
            gr.Markdown("## Why not this one?")
            with gr.Row():
                expected = picker(
                    explorer.engine.files(),
                    value=None,
                    filterable=True,
                    scale=3,
                    label="The image you expected (type to filter the gallery's names)",
                    elem_id="why-not-file",
                )
                why = gr.Button("Why not this one?", scale=1, elem_id="why-not-button")
            why_summary = gr.Markdown(elem_id="why-not")
            why_maps = gr.Gallery(
                label="Prototype maps: this image and the top result, side by side",
                columns=6,
                height=300,
                object_fit="contain",
                format="jpeg",
                elem_id="why-not-maps",
            )
            why.click(
                explorer.why_not,
                [response_state, expected],
                [why_summary, why_maps],
                api_name="why_not_panels",
                api_visibility="private",
            )  # the name /why_not is the JSON endpoint's

            explain_inputs = [response_state, selected_state, layer, head, prototype]
            explain_outputs = [maps, words, chart, foreground, summary, chart_atom]
            # Which words mattered (the query re-read without each word), the guidance map of the word that
            # mattered most and the atlas (an image encoder pass over 8 images) come just after.
            details_inputs = [response_state, selected_state, layer, head, prototype, chart_atom]
            details_outputs = [word, guidance, chart_atom_patches, chart_atom_words, mattered]

            def on_search(q, n, la, he, pr, request: gr.Request):
                items, text, response = explorer.search(q, n, request.session_hash)
                fresh = gr.Gallery(value=items, selected_index=None)  # no stale highlight from the last search
                return (fresh, text, response, 0, *panels(explorer.explain(response, 0, la, he, pr)))

            search_outputs = [results, status, response_state, selected_state, *explain_outputs]
            search_inputs = [query, k, layer, head, prototype]
            # The first panels (/explore) and the rest (/explore_details) are callable too, for benchmarks.
            on_details = lambda *v: panels(explorer.details(*v))  # noqa: E731
            on_control = lambda *v: panels(explorer.explain(*v))  # noqa: E731
            go.click(on_search, search_inputs, search_outputs, api_name="explore", api_visibility="undocumented").then(
                on_details, details_inputs, details_outputs, api_name="explore_details", api_visibility="undocumented"
            )
            query.submit(on_search, search_inputs, search_outputs, api_visibility="private").then(
                on_details, details_inputs, details_outputs, api_visibility="private"
            )

            def on_example(index, n, la, he, pr, request: gr.Request):
                text = EXAMPLES[index] if isinstance(index, int) and 0 <= index < len(EXAMPLES) else EXAMPLES[0]
                return (text, *on_search(text, n, la, he, pr, request))

            examples.click(
                on_example, [examples, *search_inputs[1:]], [query, *search_outputs], api_visibility="private"
            ).then(on_details, details_inputs, details_outputs, api_visibility="private")

            def on_select(response, la, he, pr, evt: gr.SelectData):
                return (evt.index, *panels(explorer.explain(response, evt.index, la, he, pr)))

            results.select(
                on_select,
                [response_state, layer, head, prototype],
                [selected_state, *explain_outputs],
                api_visibility="private",
            ).then(on_details, details_inputs, details_outputs, api_visibility="private")

            for control in (layer, head, prototype):
                control.change(on_control, explain_inputs, explain_outputs, api_visibility="private").then(
                    on_details, details_inputs, details_outputs, api_visibility="private"
                )
            # .input, not .change: explain() and details() set these dropdowns and draw their panels.
            word.input(explorer.guidance, [response_state, selected_state, word], guidance, api_visibility="private")

            chart_atom.input(
                explorer.chart_atom_atlas, chart_atom, [chart_atom_patches, chart_atom_words], api_visibility="private"
            )

        with gr.Tab("Search by photo"):
            photo_state = gr.State(None, time_to_live=SESSION_SECONDS)
            with gr.Row():
                photo_file = picker(
                    explorer.engine.files(),
                    value=None,
                    filterable=True,
                    label="A gallery image",
                    elem_id="photo-file",
                )
                # A file box, not gr.Image: an Image input decodes and re-encodes every frame of what a
                # visitor sends before the app can check it; the app checks the header first (files.py).
                photo_upload = gr.File(
                    file_types=["image"],
                    type="filepath",
                    label="or a photo of your own (not kept)",
                    height=160,
                    elem_id="photo-upload",
                )
                photo_go = gr.Button("Find people who look alike", variant="primary", elem_id="photo-button")
            photo_status = gr.Markdown(elem_id="photo-status")
            photo_results = gr.Gallery(
                label="Results",
                columns=10,
                height=200,
                object_fit="contain",
                allow_preview=False,
                elem_id="photo-results",
            )
            with gr.Row():
                photo_maps = gr.Gallery(
                    label="The photo's prototype maps",
                    columns=6,
                    height=280,
                    object_fit="contain",
                    format="jpeg",
                    elem_id="photo-maps",
                )
                result_maps = gr.Gallery(
                    label="The selected result's, with each part's share of the score",
                    columns=7,
                    height=280,
                    object_fit="contain",
                    format="jpeg",
                    elem_id="photo-result-maps",
                )

            def on_photo(file, upload, request: gr.Request):
                address = explorer.gallery.store.address_of(request)
                items, text, response, maps = explorer.photos.search(file, upload, address=address)
                return items, text, response, maps, explorer.photos.result_maps(response, 0)

            photo_go.click(
                on_photo,
                [photo_file, photo_upload],
                [photo_results, photo_status, photo_state, photo_maps, result_maps],
                api_visibility="private",
            )

            def on_photo_select(response, evt: gr.SelectData):
                return explorer.photos.result_maps(response, evt.index)

            photo_results.select(on_photo_select, photo_state, result_maps, api_visibility="private")

        with gr.Tab("Gallery"):
            gr.Markdown(explorer.gallery.upload_help())
            uploads = gr.File(file_count="multiple", label="Add images", elem_id="upload")
            upload_report = gr.Markdown()
            first_page, where = explorer.gallery.browse(1)
            with gr.Row():
                page = gr.Number(value=1, precision=0, minimum=1, label="page", scale=1, elem_id="page")
                page_info = gr.Markdown(where, elem_id="page-info")
            browse = gr.Gallery(
                value=first_page, columns=10, height=520, object_fit="contain", label="Gallery", elem_id="browse"
            )

            def on_upload(files, request: gr.Request, progress=gr.Progress()):  # noqa: B008
                progress(0, desc="indexing")
                address = explorer.gallery.store.address_of(request)
                report, _ = explorer.gallery.upload(files, request.session_hash, address)
                items, text = explorer.gallery.browse(1, request.session_hash)
                return report, items, text, 1

            uploads.upload(
                on_upload,
                uploads,
                [upload_report, browse, page_info, page],
                api_name="upload_files",
                api_visibility="private",
            )

            def on_page(number, request: gr.Request):
                return explorer.gallery.browse(number, request.session_hash)

            page.change(on_page, page, [browse, page_info], api_name="browse", api_visibility="private")

        with gr.Tab("Model"):
            gr.Markdown(explorer.model.card_table())
            for table in explorer.model.measured_tables(ROOT / "assets"):
                gr.Markdown(table)
            if (ROOT / "assets" / "cmc.png").is_file():
                gr.Image(str(ROOT / "assets" / "cmc.png"), label="CMC curve (test split)", type="filepath")
            gr.Markdown(
                "### Atom atlas\nPick one of the dictionary's atoms: the gallery patches and the words that "
                "use it most."
            )
            with gr.Row():
                atom = gr.Number(
                    value=0,
                    precision=0,
                    label="atom",
                    minimum=0,
                    maximum=max(explorer.engine.model.config.num_atoms - 1, 0),
                )
                show = gr.Button("Show atom")
            atlas = gr.Gallery(columns=8, height=320, object_fit="contain", label="patches", format="jpeg")
            atlas_words = gr.Markdown()
            show.click(explorer.model.atom_atlas, atom, [atlas, atlas_words], api_visibility="private")

        gr.api(explorer.api_search, api_name="search")
        gr.api(explorer.api_why_not, api_name="why_not")
        gr.api(explorer.photos.api_search, api_name="search_by_photo")
    return demo


def launch_options(explorer: Explorer) -> dict[str, Any]:
    """How the app is served (also by the tests): image files from the gallery folder and Gradio's
    own outputs only, no error details, uploads and kept sessions capped."""
    return {
        "allowed_paths": [str(explorer.engine.gallery), str(explorer.gallery.store.root / "images")],
        "blocked_paths": [str(explorer.engine.index_dir)],  # the index may sit inside the gallery
        "show_error": False,
        "enable_monitoring": False,  # no /monitoring pages: request counts are nobody's business
        "max_file_size": MAX_FILE_BYTES,
        "state_session_capacity": MAX_SESSIONS,
        "css": (ROOT / "style.css").read_text(),
        "ssr_mode": False,  # no Node.js server: faster start, one process
    }


def add_gallery_route(demo: gr.Blocks, explorer: Explorer) -> None:
    """GET /gallery/<file>: an indexed gallery image by the name /search answers with (after launch)."""
    from fastapi.responses import FileResponse, PlainTextResponse

    def gallery_file(file: str) -> Any:
        path = explorer.gallery_image(file)
        return FileResponse(path) if path else PlainTextResponse("no such gallery image", status_code=404)

    demo.app.add_api_route(GALLERY_ROUTE + "/{file:path}", gallery_file, methods=["GET"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", help="default: LGUR_HOST, GRADIO_SERVER_NAME or 127.0.0.1")
    parser.add_argument("--port", type=int, help="default: LGUR_PORT, GRADIO_SERVER_PORT or 7860")
    parser.add_argument("--checkpoint", default=os.environ.get("LGUR_CHECKPOINT"))
    parser.add_argument("--gallery", default=os.environ.get("LGUR_GALLERY", str(DEFAULT_GALLERY)))
    for name in ("repo", "file", "revision"):  # the checkpoint from a Hub repository, at a pinned commit
        parser.add_argument(f"--hub-{name}", default=os.environ.get(f"LGUR_HUB_{name.upper()}"))
    parser.add_argument(
        "--shared-uploads",
        action="store_true",
        default=os.environ.get("LGUR_SHARED_UPLOADS") == "1",
        help="uploads join the gallery for every visitor (local use; default: private)",
    )
    args = parser.parse_args(argv)
    host, port = server_address(args.host, args.port, dict(os.environ))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    fairness = visitor_limits(dict(os.environ))  # (requests per visitor, trusted proxies in front)
    try:
        checkpoint = resolve_checkpoint(args.checkpoint, args.hub_repo, args.hub_file, args.hub_revision)
        explorer = create(
            checkpoint,
            Path(args.gallery),
            shared_uploads=args.shared_uploads,
            sessions=SESSIONS / "uploads",
            limits=UploadLimits.from_environ(dict(os.environ)),
            cache=Path(gr.utils.get_upload_folder()),
        )
    except (CheckpointError, OSError, ValueError) as error:
        raise SystemExit(f"cannot start: {error}") from error
    explorer.gallery.store.proxy_hops = fairness[1]  # whose uploads are whose: by address, as the queue counts
    demo = build_app(explorer)
    # api_open=False: no REST route skips the queue, so the per-visitor limit sees every request.
    demo.queue(default_concurrency_limit=4, max_size=MAX_QUEUE, api_open=False)
    limit_per_visitor(demo._queue, *fairness)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, **launch_options(explorer))
    add_gallery_route(demo, explorer)
    meter_uploads(demo.app, explorer.gallery.store)
    demo.block_thread()


if __name__ == "__main__":
    main()
