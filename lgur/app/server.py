"""Serving the page: the command line of `python app.py`, Gradio's launch settings, the queue's
per-visitor limit, the gallery route and the metered upload route."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastapi
import gradio as gr
import torch

from ..files import DEFAULT_GALLERY, MAX_FILE_BYTES
from ..model.checkpoint import CheckpointError, resolve_checkpoint
from .explorer import GALLERY_ROUTE, Explorer, create, server_address
from .uploads import UPLOAD_ROUTE, UploadLimits, meter_uploads
from .visitors import limit_per_visitor, visitor_limits

STYLE = Path(__file__).resolve().parents[2] / "style.css"  # beside app.py, in the repository and in a Space
MAX_SESSIONS = int(os.environ.get("LGUR_MAX_SESSIONS", 200))  # sessions whose page state is kept: bounds memory
MAX_QUEUE = 64  # waiting requests; more are refused at once instead of piling up


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
        "css": STYLE.read_text() if STYLE.is_file() else None,
        "ssr_mode": False,  # no Node.js server: faster start, one process
    }


def add_gallery_route(demo: gr.Blocks, explorer: Explorer) -> None:
    """GET /gallery/<file>: an indexed gallery image by the name /search answers with (after launch)."""
    from fastapi.responses import FileResponse, PlainTextResponse

    def gallery_file(file: str) -> Any:
        path = explorer.gallery_image(file)
        return FileResponse(path) if path else PlainTextResponse("no such gallery image", status_code=404)

    demo.app.add_api_route(GALLERY_ROUTE + "/{file:path}", gallery_file, methods=["GET"])


def add_upload_route(demo: gr.Blocks, explorer: Explorer) -> None:
    """GET /uploads/<token>/<file>: a visitor's upload, to the address that sent it (after launch)."""
    import mimetypes

    from fastapi.responses import PlainTextResponse, Response

    store = explorer.gallery.store

    def upload_file(token: str, name: str, request: fastapi.Request) -> Any:
        path = store.served(token, name, store.address_of(request))
        try:  # read whole: the visitor may leave (their folder deleted) while it is sent
            body = path.read_bytes() if path else None
        except OSError:
            body = None
        if body is None:
            return PlainTextResponse("no such upload", status_code=404)
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return Response(body, media_type=kind, headers={"Cache-Control": "private, no-store"})

    demo.app.add_api_route(UPLOAD_ROUTE + "/{token}/{name}", upload_file, methods=["GET"])


def photo_endpoint(explorer: Explorer) -> Callable[..., dict]:
    """The /search_by_photo endpoint, as gr.api takes it: the calling address decides whose uploads count."""

    def search_by_photo(photo: str | dict, k: float = 10, request: gr.Request = None) -> dict:  # noqa: RUF013
        """A gallery image by name, or an uploaded photo (handle_file), as the query."""
        return explorer.photos.api_search(photo, k, explorer.gallery.store.address_of(request))

    return search_by_photo


def parse_arguments(argv: list[str] | None, description: str) -> argparse.Namespace:
    """`python app.py`'s options; each defaults to its LGUR_* environment variable."""
    parser = argparse.ArgumentParser(description=description)
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
    return parser.parse_args(argv)


def serve(build_app: Callable[[Explorer], gr.Blocks], args: argparse.Namespace, sessions: Path) -> None:
    """Open the model and gallery, build the page and serve it until the process ends; visitors'
    uploads go under `sessions`."""
    host, port = server_address(args.host, args.port, dict(os.environ))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    per_visitor, proxy_hops = visitor_limits(dict(os.environ))
    try:
        checkpoint = resolve_checkpoint(args.checkpoint, args.hub_repo, args.hub_file, args.hub_revision)
        explorer = create(
            checkpoint,
            Path(args.gallery),
            shared_uploads=args.shared_uploads,
            sessions=sessions,
            limits=UploadLimits.from_environ(dict(os.environ)),
            cache=Path(gr.utils.get_upload_folder()),
        )
    except (CheckpointError, OSError, ValueError) as error:
        raise SystemExit(f"cannot start: {error}") from error
    explorer.gallery.store.proxy_hops = proxy_hops  # whose uploads are whose: by address, as the queue counts
    demo = build_app(explorer)
    # api_open=False: no REST route skips the queue, so the per-visitor limit sees every request.
    demo.queue(default_concurrency_limit=4, max_size=MAX_QUEUE, api_open=False)
    limit_per_visitor(demo._queue, per_visitor, proxy_hops)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, **launch_options(explorer))
    add_gallery_route(demo, explorer)
    add_upload_route(demo, explorer)
    meter_uploads(demo.app, explorer.gallery.store)
    demo.block_thread()
