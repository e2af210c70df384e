"""The page's recurring Gradio pieces, so that app.py lays the page out and wires it, nothing more."""

from __future__ import annotations

from typing import Any

import gradio as gr

from .explorer import Choices


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
