"""A contact sheet: a grid of generated people, each with one of its captions."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..files import open_rgb


def contact_sheet(
    data: str | Path, out: str | Path, split: str = "test", count: int = 16, columns: int = 8, caption_lines: int = 9
) -> Path:
    data = Path(data)
    annotations = [a for a in json.loads((data / "reid_raw.json").read_text()) if a["split"] == split]
    step = max(1, len(annotations) // count)
    chosen = annotations[::step][:count]
    tile_w, tile_h, text_h = 192, 512, 16 * caption_lines + 8
    rows = (len(chosen) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * tile_w, rows * (tile_h + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=13)
    for i, entry in enumerate(chosen):
        x, y = (i % columns) * tile_w, (i // columns) * (tile_h + text_h)
        image = open_rgb(data / "imgs" / entry["file_path"])  # read and closed
        sheet.paste(image.resize((tile_w - 8, tile_h - 8), Image.Resampling.LANCZOS), (x + 4, y + 4))
        lines = textwrap.wrap(entry["captions"][0], width=27)[:caption_lines]
        for j, line in enumerate(lines):
            draw.text((x + 6, y + tile_h + 2 + 16 * j), line, fill=(20, 20, 20), font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, quality=88)
    return out
