"""LGUR Explorer: search pedestrians by description and see why each result matched.

`python app.py` serves the shipped model and gallery on http://127.0.0.1:7860.
The page is laid out here and wired to `lgur.app.explorer.Explorer`, whose methods are plain
functions of their inputs that tests call directly; all model work happens in the `lgur` package.
"""

from __future__ import annotations

import os

from lgur.search.gallery import private_sessions_root  # noqa: E402

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home; the Space may be offline
SESSIONS = private_sessions_root()
if __name__ == "__main__":  # Gradio's cache inside this process's folder: a restart after a crash removes it
    os.environ.setdefault("GRADIO_TEMP_DIR", str(SESSIONS / "cache"))

import gradio as gr  # noqa: E402

from lgur.app.components import after_deleting, image_strip, page_root, panels, picker, result_strip  # noqa: E402
from lgur.app.explorer import EXAMPLES, INTRO, Explorer  # noqa: E402
from lgur.app.server import STYLE, parse_arguments, photo_endpoint, serve  # noqa: E402
from lgur.app.uploads import SESSION_SECONDS  # noqa: E402
from lgur.search.explain import EFFECTS_LEGEND, FOREGROUND_LEGEND, MAP_LEGEND, WORDS_LEGEND  # noqa: E402
from lgur.search.query import MAX_RESULTS  # noqa: E402

ASSETS = STYLE.parent / "assets"


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
            # A dataset with a queued click, not gr.Examples (its click runs outside the queue and only fills the box)
            examples = gr.Dataset(
                components=[query], samples=[[e] for e in EXAMPLES], type="index", label="Examples", elem_id="examples"
            )
            status = gr.Markdown(elem_id="status")
            results = result_strip(elem_id="results")
            gr.Markdown("## Why this result")
            with gr.Row():
                layer = picker(explorer.layers, value="last", label="PGU layer")
                head = picker(explorer.heads, value="mean", label="attention head")
                prototype = picker(explorer.prototypes, value="P1", label="prototype for the words")
            summary = gr.Markdown(elem_id="summary")
            maps = image_strip(
                "Prototype attention (share of the similarity, what it reads here); then where each detail was seen",
                7,
                "auto",
                elem_id="prototype-maps",
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
            chart_atom_patches = image_strip(
                "Gallery images whose patches use this atom most", 8, elem_id="chart-atom-patches"
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
            why_maps = image_strip(
                "Prototype maps: this image and the top result, side by side", 6, elem_id="why-not-maps"
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
                items, text, response = explorer.search(q, n, request.session_hash, page_root(request))
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
            photo_results = result_strip(elem_id="photo-results")
            with gr.Row():
                photo_maps = image_strip("The photo's prototype maps", 6, 280, elem_id="photo-maps")
                result_maps = image_strip(
                    "The selected result's, with each part's share of the score", 7, 280, elem_id="photo-result-maps"
                )

            def on_photo(file, upload, request: gr.Request):
                address = explorer.gallery.store.address_of(request)
                items, text, response, maps = explorer.photos.search(
                    file, upload, address=address, root=page_root(request)
                )
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
            with gr.Row(visible=not explorer.gallery.shared_uploads):
                mine = picker([], multiselect=True, label="your uploads", scale=3, elem_id="mine")
                delete = gr.Button("Delete selected", scale=1)
                delete_all = gr.Button("Delete all my uploads", scale=1, variant="stop")
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
                items, text = explorer.gallery.browse(1, request.session_hash, root=page_root(request))
                return report, items, text, 1, gr.Dropdown(choices=explorer.gallery.own_files(request.session_hash))

            uploads.upload(
                on_upload,
                uploads,
                [upload_report, browse, page_info, page, mine],
                api_name="upload_files",
                api_visibility="private",
            )

            def delete_uploads(names: list[str], request: gr.Request):
                return after_deleting(explorer.gallery, names, request)

            def delete_everything(request: gr.Request):
                return after_deleting(explorer.gallery, [], request, everything=True)

            deleted = [upload_report, browse, page_info, page, mine]
            delete.click(delete_uploads, mine, deleted, api_name="delete_uploads")
            delete_all.click(delete_everything, None, deleted, api_name="delete_all_uploads", api_visibility="private")

            def on_page(number, request: gr.Request):
                return explorer.gallery.browse(number, request.session_hash, root=page_root(request))

            page.change(on_page, page, [browse, page_info], api_name="browse", api_visibility="private")

        with gr.Tab("Model"):
            gr.Markdown(explorer.model.card_table())
            for table in explorer.model.measured_tables(ASSETS):
                gr.Markdown(table)
            if (ASSETS / "cmc.png").is_file():
                gr.Image(str(ASSETS / "cmc.png"), label="CMC curve (test split)", type="filepath")
            gr.Markdown(
                "### Atom atlas\nPick one of the dictionary's atoms: the gallery patches and the words that "
                "use it most."
            )
            with gr.Row():
                atom = gr.Number(value=0, precision=0, label=explorer.model.atom_label)  # no bounds: atom_atlas says
                show = gr.Button("Show atom")
            atlas = image_strip("patches", 8, 320)
            atlas_words = gr.Markdown()
            show.click(
                explorer.model.atom_atlas, atom, [atlas, atlas_words], api_name="atom_atlas", api_visibility="private"
            )

        gr.api(explorer.api_search, api_name="search")
        gr.api(explorer.api_why_not, api_name="why_not")

        gr.api(photo_endpoint(explorer), api_name="search_by_photo")
    return demo


def main(argv: list[str] | None = None) -> None:
    serve(build_app, parse_arguments(argv, __doc__.splitlines()[0]), SESSIONS / "uploads")


if __name__ == "__main__":
    main()
