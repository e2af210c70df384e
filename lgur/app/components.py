"""The page's recurring Gradio pieces, so that app.py lays the page out and wires it, nothing more."""

from __future__ import annotations

from typing import Any

import gradio as gr

from .explorer import Choices
from .tabs import GalleryTab


def panels(explained: tuple) -> tuple:
    """Explorer.explain's values for Gradio: the two pickers' Choices become dropdown updates."""
    return tuple(gr.update(choices=v.choices, value=v.value) if isinstance(v, Choices) else v for v in explained)


def picker(choices: list[Any], **options: Any) -> gr.Dropdown:
    """A dropdown that hands any value to its handler, which reads one outside the choices as its default
    or refuses it in words: Gradio's own refusal echoes the value and every choice (all gallery names)."""
    return gr.Dropdown(choices, allow_custom_value=True, **options)


def image_strip(label: str, columns: int, height: int | str = 300, **options: Any) -> gr.Gallery:
    """A row of drawn maps (JPEG, whole images shown)."""
    return gr.Gallery(label=label, columns=columns, height=height, object_fit="contain", format="jpeg", **options)


def result_strip(**options: Any) -> gr.Gallery:
    """Search results: ten a row, picked by a click (no preview)."""
    return gr.Gallery(label="Results", columns=10, height=200, object_fit="contain", allow_preview=False, **options)


def page_root(request: Any) -> str:
    """The page's public root URL, as Gradio builds its own file URLs (behind a proxy too); '' without
    a request."""
    from gradio import route_utils

    raw = getattr(request, "request", None)
    if raw is None:
        return ""
    try:
        return route_utils.get_root_url(raw, route_utils.get_api_call_path(raw), getattr(raw.app, "root_path", None))
    except (ValueError, AttributeError):  # not a page event (a direct call): no URL to build on
        return ""


def after_deleting(
    gallery: GalleryTab, names: list[str], request: Any, everything: bool = False
) -> tuple[str, list[tuple[str, str]], str, int, gr.Dropdown]:
    """The Gallery tab once the visitor's uploads `names` (or all of them) are deleted: the report, the
    first page, where it is, its number, and the picker of what is left."""
    report, items, where, own = gallery.remove(names, request.session_hash, page_root(request), everything)
    return report, items, where, 1, gr.Dropdown(choices=own, value=[])
