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
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home; the Space may be offline

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from lgur import DEFAULT_CHECKPOINT, DEFAULT_GALLERY
from lgur.checkpoint import CheckpointError
from lgur.explain import atom_chart, overlay, prototype_names, prototype_overlays, word_highlights
from lgur.files import MAX_FILE_BYTES, open_rgb, remove_temporaries
from lgur.gallery import add_images
from lgur.quality import summary_rows
from lgur.search import QueryError, SearchEngine, SearchResponse

log = logging.getLogger("lgur.app")
ROOT = Path(__file__).resolve().parent
MAX_RESULTS = 50
SESSION_SECONDS = 3600
MAX_SESSIONS = 1000  # sessions whose state is kept (oldest dropped first)
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

    def __init__(self, engine: SearchEngine, uploads: str = "uploads"):
        self.engine = engine
        self.card = engine.card
        self.uploads = uploads  # gallery sub-folder that receives uploads
        model = engine.model.config
        self.layers = ["last"] + [str(i + 1) for i in range(model.pgu_layers)]
        self.heads = ["mean"] + [str(i + 1) for i in range(model.pgu_heads)]
        self.prototypes = prototype_names(self.card, model.num_prototypes if model.use_pgu else 1)
        remove_temporaries(engine.gallery / uploads)  # copies cut short by a crash: never accepted

    # -- search -------------------------------------------------------------------------------
    def search(self, query: str, k: float) -> tuple[list[tuple[str, str]], str, SearchResponse | None]:
        """-> results gallery (file, caption), a status line, the response (kept per session)."""
        try:
            response = self.engine.search(query, result_count(k))
        except QueryError as error:
            return [], f"⚠️ {html.escape(str(error))}", None
        items = [(r.path, f"#{r.rank}  score {r.score:.3f}") for r in response.results]
        note = " (the query was longer than the model reads; the end was ignored)" if response.query.truncated else ""
        status = f"{len(items)} results in {1000 * response.seconds:.0f} ms{note}. Select one to see why it matched."
        if not items:
            status = "The gallery is empty: add images in the Gallery tab."
        return items, status, response

    def explain(
        self, response: SearchResponse | None, selected: int, layer: str, head: str, prototype: str
    ) -> tuple[list[tuple[Any, str]], list[tuple[str, float]], Any, Any, str, Any]:
        """Panels for one result: prototype maps, highlighted words, atom chart, foreground map, notes."""
        if response is None or not response.results:
            return [], [], None, None, "", gr.update(choices=[], value=None)
        result = response.results[min(max(int(selected), 0), len(response.results) - 1)]
        li, hi, pi = _layer_index(layer), _head_index(head), _prototype_index(prototype)
        maps = prototype_overlays(result, response.grid, li, hi, self.prototypes)
        words = word_highlights(response.query, pi, li, hi)
        chart = atom_chart(response.query.atom_histogram, result.atom_histogram, result.shared_atoms)
        foreground = overlay(open_rgb(result.path), result.foreground, response.grid, alpha=0.55)
        best = result.strongest_part
        meta = result.metadata
        lines = [
            f"**Result #{result.rank}** `{html.escape(result.file)}`, cosine similarity **{result.score:.3f}**.",
            f"Strongest part: **{self.prototypes[best]}** ({100 * result.score_share[best]:.0f}% of the score).",
            "Atoms shared by the query's and the image's top 20: "
            f"{', '.join(map(str, result.shared_atoms)) or 'none'}.",
        ]
        if meta.get("captions"):
            lines.append(f"Gallery caption: _{html.escape(meta['captions'][0])}_")
        word_choices = [f"{i + 1}: {w}" for i, w in enumerate(response.query.words)]
        return maps, words, chart, foreground, "\n\n".join(lines), gr.update(choices=word_choices, value=None)

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
        weights = self.engine.guidance(response.query, result.row)
        return overlay(open_rgb(result.path), weights[:, column], response.grid)

    def api_search(self, query: str, k: float = 10) -> dict[str, Any]:
        """The /search endpoint: plain JSON (gallery file names, scores, per-prototype similarities).

        An error answer names the problem without echoing the input back."""
        try:
            response = self.engine.search(query, result_count(k))
        except QueryError as error:
            return {"error": str(error), "results": []}
        return response.to_json()

    # -- gallery ------------------------------------------------------------------------------
    def browse(self, limit: int = 300) -> list[tuple[str, str]]:
        """(image file, name) of the gallery, uploads first."""
        files = sorted(self.engine.files(), key=lambda f: not f.startswith(f"{self.uploads}/"))[:limit]
        return [(str(self.engine.gallery / f), f) for f in files]

    def upload(self, files: list[Any] | None) -> tuple[str, list[tuple[str, str]]]:
        """Add uploaded files to the gallery (validated, indexed at once); report what was refused."""
        paths = [Path(getattr(f, "name", f)) for f in (files or [])]
        if not paths:
            return "No files were given.", self.browse()
        report = add_images(self.engine, paths, self.uploads)
        lines = [f"Added {len(report.added)} image(s); the gallery now holds {report.gallery_size}."]
        lines += [f"- rejected `{html.escape(name)}`: {html.escape(reason)}" for name, reason in report.rejected]
        return "\n".join(lines), self.browse()

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
            maps = gr.Gallery(label="Prototype attention over the image (share of the score per prototype)",
                              columns=7, height=280, object_fit="contain", elem_id="prototype-maps",
                              format="jpeg")  # fmt: skip
            words = gr.HighlightedText(label="Query words, coloured by the selected prototype's attention",
                                       elem_id="words")  # fmt: skip
            with gr.Row():
                chart = gr.Image(label="DGA: dictionary atoms of the query vs the image", type="pil",
                                 elem_id="atom-chart", scale=3)  # fmt: skip
                foreground = gr.Image(
                    label="DGA foreground weight m", type="pil", elem_id="foreground", scale=1, format="jpeg"
                )
            with gr.Row():
                word = gr.Dropdown([], label="Cross-modality guidance: pick a query word", scale=1)
                guidance = gr.Image(
                    label="Regions that read this word", type="pil", scale=1, elem_id="guidance", format="jpeg"
                )

            explain_inputs = [response_state, selected_state, layer, head, prototype]
            explain_outputs = [maps, words, chart, foreground, summary, word]

            def on_search(q, n, la, he, pr):
                items, text, response = explorer.search(q, n)
                return (items, text, response, 0, *explorer.explain(response, 0, la, he, pr))

            search_outputs = [results, status, response_state, selected_state, *explain_outputs]
            search_inputs = [query, k, layer, head, prototype]
            # The full response (results and every panel) is callable too, for benchmarks and scripts.
            go.click(on_search, search_inputs, search_outputs, api_name="explore", api_visibility="undocumented")
            query.submit(on_search, search_inputs, search_outputs, api_visibility="private")

            def on_select(response, la, he, pr, evt: gr.SelectData):
                return (evt.index, *explorer.explain(response, evt.index, la, he, pr))

            results.select(on_select, [response_state, layer, head, prototype], [selected_state, *explain_outputs],
                           api_visibility="private")  # fmt: skip
            for control in (layer, head, prototype):
                control.change(explorer.explain, explain_inputs, explain_outputs, api_visibility="private")
            word.change(explorer.guidance, [response_state, selected_state, word], guidance, api_visibility="private")

        with gr.Tab("Gallery"):
            gr.Markdown("Browse the gallery, or add images (JPEG/PNG/WebP/BMP/GIF, up to "
                        f"{MAX_FILE_BYTES // 2**20} MB each); they are indexed at once.")  # fmt: skip
            uploads = gr.File(file_count="multiple", label="Add images", elem_id="upload")
            upload_report = gr.Markdown()
            browse = gr.Gallery(value=explorer.browse(), columns=12, height=520, object_fit="contain", label="Gallery")

            def on_upload(files, progress=gr.Progress()):  # noqa: B008
                progress(0, desc="indexing")
                return explorer.upload(files)

            uploads.upload(on_upload, uploads, [upload_report, browse], api_visibility="private")

        with gr.Tab("Model"):
            gr.Markdown(explorer.model_card())
            ablation = read_extra("ablation.md")
            if ablation:
                gr.Markdown("### Ablation on the synthetic world\n" + ablation)
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


def create(checkpoint: Path, gallery: Path, progress: bool = True) -> Explorer:
    engine, report = SearchEngine.open(checkpoint, gallery, progress=progress)
    log.info("gallery %s: %s", gallery, report.summary())
    return Explorer(engine)


def launch_options(explorer: Explorer) -> dict[str, Any]:
    """How the app is served (also by the tests): image files from the gallery folder and Gradio's
    own outputs only, no error details, uploads and kept sessions capped."""
    return {
        "allowed_paths": [str(explorer.engine.gallery)],
        "blocked_paths": [str(explorer.engine.index_dir)],  # the index may sit inside the gallery
        "show_error": False,
        "max_file_size": MAX_FILE_BYTES,
        "state_session_capacity": MAX_SESSIONS,
        "ssr_mode": False,  # no Node.js server: faster start, one process
    }


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
    args = parser.parse_args(argv)
    host, port = server_address(args.host, args.port, dict(os.environ))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    try:
        checkpoint = resolve_checkpoint(args.checkpoint, args.hub_repo, args.hub_file, args.hub_revision)
        explorer = create(checkpoint, Path(args.gallery))
    except (CheckpointError, OSError, ValueError) as error:
        raise SystemExit(f"cannot start: {error}") from error
    demo = build_app(explorer)
    demo.queue(default_concurrency_limit=4, max_size=MAX_QUEUE)
    demo.launch(server_name=host, server_port=port, **launch_options(explorer))


if __name__ == "__main__":
    main()
