"""The built-in examples (and the README's headline query) find people the shipped gallery has."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lgur.app.explorer import EXAMPLE_QUERIES
from lgur.search.engine import SearchEngine
from tests.conftest import REPO

MANIFEST = {m["file"]: m["attributes"] for m in json.loads((REPO / "gallery" / "manifest.json").read_text())["images"]}


def fits(attributes: dict, wants: tuple[tuple[str, str], ...]) -> bool:
    return all(attributes.get(kind) == value for kind, value in wants)


@pytest.mark.parametrize("example", EXAMPLE_QUERIES, ids=lambda e: e.text[:30])
def test_the_gallery_holds_at_least_five_people_each_example_describes(example) -> None:
    assert sum(fits(a, example.wants) for a in MANIFEST.values()) >= 5


def test_the_readme_headline_query_is_a_built_in_example() -> None:
    readme = (REPO / "README.md").read_text()
    headline = readme.split("```python", 1)[1].split("engine.search(", 1)[1].split('"')[1]
    assert headline in [e.text for e in EXAMPLE_QUERIES]
    assert f'("{EXAMPLE_QUERIES[0].text}")' in readme.split("## Quick start")[0]  # the opening sentence's query


@pytest.mark.slow
def test_the_shipped_model_finds_at_least_five_of_ten_for_each_example(tmp_path: Path) -> None:
    engine, _ = SearchEngine.open(REPO / "assets" / "lgur_cpu.safetensors", REPO / "gallery", tmp_path / "index")
    for example in EXAMPLE_QUERIES:
        top = engine.search(example.text, k=10).results
        right = sum(fits(MANIFEST[r.file], example.wants) for r in top)
        assert right >= 5, f"{example.text!r}: {right} of 10"
