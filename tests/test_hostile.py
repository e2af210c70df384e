"""Hostile visitors, part three: images checked from their header before anything decodes them, a
decode cache bounded in bytes, uploads held per address, and nothing a visitor names deleted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app as explorer_app
from lgur.app.server import launch_options
from lgur.files import MAX_DECODED_BYTES, DecodedImages, check_image, open_rgb, read_checked_image

EXPLORER = {"images": 6}  # the conftest fixture `explorer`


def _animated_gif(path: Path, colours: list[tuple[int, int, int]], size: tuple[int, int] = (64, 160)) -> Path:
    frames = [Image.new("RGB", size, c) for c in colours]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return path


def test_the_photo_box_hands_the_file_over_undecoded(explorer, tmp_path: Path) -> None:
    """The photo input passes the visitor's file to the app as sent: no decode or re-encode of its frames
    before the app's header checks (an Image input re-encodes every frame of a GIF)."""
    from gradio.data_classes import FileData

    demo = explorer_app.build_app(explorer)
    (box,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "photo-upload"]
    gif = _animated_gif(tmp_path / "animated.gif", [(200, 0, 0), (0, 200, 0), (0, 0, 200)])
    handed = box.preprocess(FileData(path=str(gif), orig_name="animated.gif"))
    assert Path(handed).read_bytes() == gif.read_bytes()


def test_an_animated_image_is_read_as_its_first_frame(tmp_path: Path) -> None:
    gif = _animated_gif(tmp_path / "animated.gif", [(200, 0, 0), (0, 200, 0), (0, 0, 200)])
    pixels, problem = read_checked_image(gif, (32, 16))
    assert problem is None
    mean = pixels.reshape(3, -1).mean(1)
    assert mean[0] > 150 and mean[1] < 50 and mean[2] < 50  # the first frame's red


@pytest.mark.parametrize(
    ("size", "mode", "fmt", "expected"),
    [
        ((1024, 9000), "RGB", "JPEG", "shape of a person photo"),  # too narrow to decode reduced
        ((4000, 2500), "RGBA", "PNG", "too large to decode"),  # 10 MP: under the pixel cap, 70 MB decoded
    ],
)
def test_a_costly_decode_is_refused_from_the_header(
    tmp_path: Path, size: tuple[int, int], mode: str, fmt: str, expected: str
) -> None:
    path = tmp_path / f"costly.{fmt.lower()}"
    Image.new(mode, size, (10, 20, 30, 255)[: len(mode)]).save(path, fmt)
    assert expected in (check_image(path) or "")
    with pytest.raises(ValueError, match=expected):
        open_rgb(path)


def test_the_decode_allowance_admits_a_person_photo(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    Image.new("RGBA", (1200, 2400), (10, 20, 30, 255)).save(path)  # 2.9 MP RGBA: about 20 MB decoded
    assert 1200 * 2400 * 7 < MAX_DECODED_BYTES and check_image(path) is None


def test_decoded_images_are_bounded_in_bytes(tmp_path: Path) -> None:
    paths = []
    for i in range(6):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((100, 100, 3), 20 * i, np.uint8)).save(path)
        paths.append(path)
    cache = DecodedImages(max_bytes=4 * 100 * 100 * 3)  # room for four of them
    for path in paths:
        cache.get(path)
    assert cache.bytes <= cache.max_bytes and len(cache._images) == 4
    assert cache.get(paths[-1]) is cache.get(paths[-1])  # the most recent stays
    big = tmp_path / "big.png"
    Image.new("RGB", (200, 200)).save(big)  # over a quarter of the bound: decoded, never kept
    cache.get(big)
    assert all(key[0] != str(big) for key in cache._images)


def test_every_event_runs_in_the_queue(explorer) -> None:
    """An event outside the queue escapes the per-visitor limit: none costs the server CPU that way."""
    demo = explorer_app.build_app(explorer)
    outside = [f.name for f in demo.fns.values() if f.fn is not None and not f.queue]
    assert not outside, outside


def test_clicking_an_example_searches_for_it(explorer) -> None:
    from types import SimpleNamespace

    demo = explorer_app.build_app(explorer)
    (click,) = [f for f in demo.fns.values() if f.name == "on_example"]
    visitor = SimpleNamespace(session_hash="s", headers={}, client=None)
    text, items, status, *_ = click.fn(2, 5, "last", "mean", "P1", visitor)
    assert text == explorer_app.EXAMPLES[2] and len(items.value) == 5 and "5 results" in status
    assert click.fn("<script>", 5, "last", "mean", "P1", visitor)[0] == explorer_app.EXAMPLES[0]  # not echoed


def test_a_value_outside_a_dropdowns_choices_is_neither_echoed_nor_an_error(explorer) -> None:
    import gradio as gr

    demo = explorer_app.build_app(explorer)
    hostile = "<img src=x onerror=alert(1)>"
    dropdowns = [b for b in demo.blocks.values() if isinstance(b, gr.Dropdown)]
    assert len(dropdowns) == 8
    for dropdown in dropdowns:  # Gradio's refusal would echo it with every choice
        value = [hostile] if dropdown.multiselect else hostile
        assert dropdown.preprocess(value) == value
    _, _, response = explorer.search("a person in a red coat", 5)
    assert explorer.picked(hostile, hostile, hostile) == explorer.picked("last", "mean", "P1") == (-1, None, 0)
    maps, *_ = explorer.explain(response, 0, hostile, "99", "P99 x")
    assert [caption for _, caption in maps] == [
        caption for _, caption in explorer.explain(response, 0, "last", "mean", "P1")[0]
    ]


def test_no_monitoring_pages(explorer) -> None:
    import urllib.error
    import urllib.request

    from tests.conftest import free_port

    demo = explorer_app.build_app(explorer)
    port = free_port()
    demo.queue().launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        **launch_options(explorer),
    )
    try:
        for path in ("monitoring", "monitoring/summary"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/{path}", timeout=10)
            assert refused.value.code in (403, 404), path
    finally:
        demo.close()
