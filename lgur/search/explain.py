"""Pictures of the explanations: attention maps over images, word highlights, atom charts.

Everything here turns the numbers the search engine computed into images and plain
data; nothing here runs the model or computes an explanation.
"""

from __future__ import annotations

import functools
import html
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..files import open_rgb_cached
from .atoms import describing
from .engine import ImageQuery, QueryEncoding, SearchResult

DISPLAY_SIZE = (192, 512)  # (width, height) of an overlay, twice the stored images
PROTOTYPE_COLOURS = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
]


def _palette() -> list[int]:
    """'inferno' as a PIL palette (256 RGB triples, flat), made once: PIL applies it ~9x faster than a
    numpy lookup."""
    import matplotlib

    return (matplotlib.colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8).flatten().tolist()


_PALETTE = _palette()


def display_rgb(path: str | Path) -> Image.Image:
    """An image at DISPLAY_SIZE, the base of its overlays: resized once per file (a result's seven
    maps, its foreground and guidance maps share it). Callers must not modify it in place."""
    stat = os.stat(path)
    return _display(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _display(path: str, modified: int, size: int) -> Image.Image:
    return open_rgb_cached(path).resize(DISPLAY_SIZE, Image.Resampling.BICUBIC)


def _base(image: Image.Image) -> Image.Image:
    return (
        image
        if image.size == DISPLAY_SIZE and image.mode == "RGB"
        else image.convert("RGB").resize(DISPLAY_SIZE, Image.Resampling.BICUBIC)
    )


def _css(rgb: tuple[int, int, int] | np.ndarray) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in rgb)


def legend(low: str, high: str, colours: list[str]) -> str:
    """An HTML colour bar from `low` to `high` over the given CSS colours."""
    bar = f"background: linear-gradient(to right, {', '.join(colours)})"
    return (
        f'<div class="legend"><span>{html.escape(low)}</span><span class="legend-bar" style="{bar}"></span>'
        f"<span>{html.escape(high)}</span></div>"
    )


HEAT_COLOURS = [_css(np.array(_PALETTE[3 * i : 3 * i + 3])) for i in (0, 64, 128, 192, 255)]
# What the page's colour scales mean (Gradio colours a HighlightedText score s > 0 red, s < 0 purple,
# with opacity |s|)
MAP_LEGEND = legend("least of this map", "most of this map (each map scaled to its own range)", HEAT_COLOURS)
FOREGROUND_LEGEND = legend("least foreground (m) on this image", "most (scaled to this image's range)", HEAT_COLOURS)
WORDS_LEGEND = legend(
    "not read by the prototype",
    "read most (its strongest word = full red)",
    ["rgba(239,68,60,0.05)", "rgba(239,68,60,1)"],
)
EFFECTS_LEGEND = legend(
    "hurt the score most (full purple)",
    "helped most (full red); uncoloured: not scored",
    ["rgba(128,90,213,1)", "rgba(128,90,213,0.05)", "rgba(239,68,60,0.05)", "rgba(239,68,60,1)"],
)


def select_map(attention: np.ndarray, prototype: int, layer: int = -1, head: int | None = None) -> np.ndarray:
    """attention (L, H, P, N) -> (N,): one prototype's map for a layer, one head or the mean of heads."""
    per_layer = attention[layer]
    return (per_layer.mean(0) if head is None else per_layer[head])[prototype]


def overlay(image: Image.Image, values: np.ndarray, grid: tuple[int, int], alpha: float = 0.6) -> Image.Image:
    """Blend a patch-grid heatmap (N,) over the image (bilinear upsampling, min-max normalised)."""
    v = values.reshape(grid).astype(np.float32)
    v = (v - v.min()) / (v.max() - v.min() + 1e-8)
    heat = Image.fromarray((v * 255).astype(np.uint8)).resize(DISPLAY_SIZE, Image.Resampling.BILINEAR)
    heat.putpalette(_PALETTE)  # "L" -> "P": each grey level becomes its colour of the table
    return Image.blend(_base(image), heat.convert("RGB"), alpha)


def reading_name(prototype: int, reading: tuple[str, float] | None) -> str:
    """'P3 black backpack', or 'P3' where the prototype reads nothing in particular on this image."""
    return f"P{prototype + 1} {reading[0]}" if reading else f"P{prototype + 1}"


def atom_names(
    words: list[str], table: np.ndarray, atoms: list[int], min_ratio: float = 3.0, terms: tuple[str, ...] = ()
) -> dict[int, tuple[str, float] | None]:
    """Each atom's most specific describing word (describing(words, terms)): its weight on the atom over
    the atom's average weight over all the words (table (W, atoms), from the atlas), as (word, ratio);
    None below min_ratio (no word stands out)."""
    if not len(words):
        return {a: None for a in atoms}
    average = np.maximum(table.mean(0), 1e-12)
    usable = describing(words, terms)
    named: dict[int, tuple[str, float] | None] = {}
    for atom in atoms:
        ratios = np.where(usable, table[:, atom] / average[atom], 0.0)
        best = int(np.argmax(ratios))
        named[atom] = (words[best], float(ratios[best])) if ratios[best] >= min_ratio else None
    return named


def prototype_names(card: dict, count: int) -> list[str]:
    """'P3 upper body': each prototype with the body region it attends to most, as measured on the
    world's part labels when the checkpoint was exported (just 'P3' when not measured)."""
    labels = card.get("explanations", {}).get("prototype_regions", {}).get("labels", [])
    return [f"P{p + 1} {labels[p]}" if p < len(labels) else f"P{p + 1}" for p in range(count)]


def prototype_overlays(
    result: SearchResult,
    grid: tuple[int, int],
    layer: int = -1,
    head: int | None = None,
    names: list[str] | None = None,
) -> list[tuple[Image.Image, str]]:
    """One overlay per prototype, captioned with its share of the score and its name (what it reads on
    this image: prototype_readings), plus a combined view."""
    image = display_rgb(result.path)
    items = []
    for p, share in enumerate(result.score_share):
        name = names[p] if names else f"P{p + 1}"
        caption = f"{100 * share:.0f}% {name}"  # the share first: a phone's viewer cuts long captions short
        items.append((overlay(image, select_map(result.prototype_attention, p, layer, head), grid), caption))
    items.append((combined_overlay(image, result, grid, layer, head), "all: colour = strongest"))
    return items


def photo_maps(
    query: ImageQuery, grid: tuple[int, int], names: list[str], layer: int = -1
) -> list[tuple[Image.Image, str]]:
    """A query photo's own prototype maps (search by photo), captioned with the prototypes' names."""
    image = display_rgb(query.path)
    attention = query.prototype_attention
    return [(overlay(image, select_map(attention, p, layer), grid), name) for p, name in enumerate(names)]


def combined_overlay(
    image: Image.Image, result: SearchResult, grid: tuple[int, int], layer: int = -1, head: int | None = None
) -> Image.Image:
    """Each patch takes the colour of the prototype that attends to it most (relative to its peak)."""
    maps = np.stack(
        [select_map(result.prototype_attention, p, layer, head) for p in range(result.prototype_attention.shape[2])]
    )
    maps = maps / (maps.max(axis=1, keepdims=True) + 1e-8)  # (P, N)
    winner, strength = maps.argmax(0), maps.max(0)
    colours = np.array(PROTOTYPE_COLOURS[: maps.shape[0]], dtype=np.float32)[winner]  # (N, 3)
    h, w = grid
    layer_rgb = Image.fromarray(colours.reshape(h, w, 3).astype(np.uint8)).resize(
        DISPLAY_SIZE, Image.Resampling.NEAREST
    )
    mask = Image.fromarray((strength.reshape(h, w) * 200).astype(np.uint8)).resize(
        DISPLAY_SIZE, Image.Resampling.BILINEAR
    )
    return with_legend(Image.composite(layer_rgb, _base(image), mask), maps.shape[0])


def with_legend(image: Image.Image, count: int) -> Image.Image:
    """The combined map with a strip below it: each prototype's colour and number."""
    from PIL import ImageDraw

    rows, per_row, cell = 2, (count + 1) // 2, 16
    strip = Image.new("RGB", (image.width, rows * cell + 4), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    width = image.width // max(per_row, 1)
    for p in range(count):
        x, y = (p % per_row) * width + 3, (p // per_row) * cell + 3
        draw.rectangle([x, y, x + 10, y + 10], fill=tuple(PROTOTYPE_COLOURS[p]))
        draw.text((x + 13, y - 1), f"P{p + 1}", fill=(0, 0, 0))
    out = Image.new("RGB", (image.width, image.height + strip.height), (255, 255, 255))
    out.paste(image, (0, 0))
    out.paste(strip, (0, image.height))
    return out


def word_highlights(
    query: QueryEncoding, prototype: int, layer: int = -1, head: int | None = None
) -> list[tuple[str, float]]:
    """(word, weight in [0, 1]) for the selected prototype, normalised by its largest weight."""
    if not query.words:
        return []
    weights = select_map(query.word_attention, prototype, layer, head)
    weights = weights / (weights.max() + 1e-8)
    return [(word, round(float(w), 3)) for word, w in zip(query.words, weights)]


def nice_step(peak: float, ticks: int = 4) -> float:
    """A round tick step (1, 2, 2.5 or 5 times a power of ten) that covers `peak` in about `ticks` steps."""
    raw = max(peak, 1e-12) / ticks
    power = 10 ** np.floor(np.log10(raw))
    return float(next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw))


def atom_chart(
    query_histogram: np.ndarray,
    image_histogram: np.ndarray,
    atoms: list[int],
    shared: list[int],
    title: str = "mean atom weight",
    reference: float | None = None,
    image_label: str = "image",
) -> Image.Image:
    """Grouped bars of the query's and the image's weight on `atoms`; `shared` ones (in both top-20s)
    are starred; `reference`: a dashed line at that value (1.0 for weights relative to the average);
    `image_label`: the legend's name for the image's bars.

    Drawn directly with PIL (a few milliseconds, against ~80 ms for a plotting library).
    """
    q, i = query_histogram[atoms].astype(np.float32), image_histogram[atoms].astype(np.float32)
    width, height, left, bottom, top = 520, 300, 74, 48, 40  # large type: still legible at phone width
    chart = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(chart)
    font = ImageFont.load_default(size=15)
    step = nice_step(float(max(q.max(), i.max(), 1e-8)))
    ticks = int(np.ceil(float(max(q.max(), i.max(), 1e-8)) / step))
    peak = step * ticks
    decimals = max(0, int(-np.floor(np.log10(step))) + (1 if step / 10 ** np.floor(np.log10(step)) == 2.5 else 0))
    plot_h, slot = height - bottom - top, (width - left - 10) / max(len(atoms), 1)
    blue, orange = (59, 117, 175), (239, 134, 54)
    for tick in range(ticks + 1):  # y grid at round values
        y = top + plot_h * (1 - tick / ticks)
        draw.line([(left, y), (width - 10, y)], fill=(230, 230, 230))
        label = f"{step * tick:.{decimals}f}"
        draw.text((left - 6 - draw.textlength(label, font=font), y - 8), label, fill=(90, 90, 90), font=font)
    axis = Image.new("RGB", (plot_h, 18), (255, 255, 255))
    ImageDraw.Draw(axis).text(
        ((plot_h - draw.textlength(title, font=font)) / 2, 1), title, fill=(60, 60, 60), font=font
    )
    chart.paste(axis.rotate(90, expand=True), (2, top))
    if reference is not None and reference <= peak:
        y = top + plot_h * (1 - reference / peak)
        for x0 in np.arange(left, width - 10, 12):
            draw.line([(x0, y), (min(x0 + 6, width - 10), y)], fill=(120, 120, 120), width=2)
    for n, atom in enumerate(atoms):
        x = left + n * slot
        for value, colour, offset in ((q[n], blue, 0.12), (i[n], orange, 0.5)):
            h = plot_h * float(value) / peak
            draw.rectangle([x + offset * slot, top + plot_h - h, x + (offset + 0.38) * slot, top + plot_h], fill=colour)
        label = f"{atom}*" if atom in shared else str(atom)
        draw.text(
            (x + (slot - draw.textlength(label, font=font)) / 2, top + plot_h + 4), label, fill=(0, 0, 0), font=font
        )
    draw.text((left, height - 20), "dictionary atom (* = in both top-20s)", fill=(60, 60, 60), font=font)
    x = left
    for name, colour in (("query", blue), (image_label, orange)):
        draw.rectangle([x, 12, x + 14, 26], fill=colour)
        draw.text((x + 20, 10), name, fill=(0, 0, 0), font=font)
        x += 40 + draw.textlength(name, font=font)
    return chart
