"""Colour grounding: unknown colour words read as the training colours, known words untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lgur.search.colours import ColourGrounding, colour_modifiers, srgb_to_lab, table_colours
from lgur.search.engine import SearchEngine
from tests.conftest import tiny_engine

VOCABULARY = (
    "a man woman in with and the red blue navy green yellow pink purple orange brown beige grey black white "
    "coat jeans backpack shoes sky leather dark light".split()
)


def test_the_training_colours_are_the_vocabulary_words_that_end_colour_names() -> None:
    grounding = ColourGrounding(VOCABULARY)
    assert {"red", "blue", "navy", "green", "grey", "black", "white", "beige"} <= grounding.targets
    assert not {"sky", "leather", "dark", "light", "coat", "man"} & grounding.targets


def test_colour_table_words_map_to_their_colour() -> None:
    grounding = ColourGrounding(VOCABULARY)
    expected = {
        "crimson": "red",
        "scarlet": "red",
        "maroon": "red",
        "cobalt": "blue",
        "azure": "blue",
        "emerald": "green",
        "mustard": "yellow",
        "charcoal": "grey",
        "lavender": "purple",
        "fuchsia": "pink",
        "tangerine": "orange",
        "chocolate": "brown",
    }
    assert {w: grounding.colour_of(w) for w in expected} == expected
    assert grounding.colour_of("Crimson") == "red"  # case does not matter


def test_known_words_modifiers_and_other_words_are_never_rewritten() -> None:
    grounding = ColourGrounding([*VOCABULARY, "olive"])
    text = "A man in a dark olive coat, pale jeans and sky leather shoes with a xyzzy backpack"
    assert grounding.ground(text) == (text, [])  # olive is known here; pale modifies; xyzzy is no colour
    assert "pale" in colour_modifiers(table_colours()) and "olive" not in colour_modifiers(table_colours())


def test_the_rewrite_is_reported_once_per_word() -> None:
    grounding = ColourGrounding(VOCABULARY)
    text, readings = grounding.ground("a Crimson coat, crimson shoes and a cobalt backpack")
    assert text == "a red coat, red shoes and a blue backpack"
    assert [(r.word, r.colour) for r in readings] == [("Crimson", "red"), ("cobalt", "blue")]


def test_cielab_of_known_colours() -> None:
    lab = srgb_to_lab(np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    np.testing.assert_allclose(lab[0], [100, 0, 0], atol=0.1)
    np.testing.assert_allclose(lab[1], [0, 0, 0], atol=0.1)
    np.testing.assert_allclose(lab[2], [53.24, 80.09, 67.20], atol=0.1)  # sRGB red, D65


def test_search_reads_and_reports_grounded_colours(tmp_path: Path) -> None:
    engine = tiny_engine(tmp_path, {"vocabulary": VOCABULARY})
    assert engine.card["vocabulary"] == VOCABULARY
    response = engine.search("a woman in a crimson coat", k=3)
    assert response.query.text == "a woman in a red coat"
    assert response.colour_note == "crimson -> red" and response.warning is None  # grounded, so not unknown
    body = response.to_json()
    assert body["colours_read_as"] == {"crimson": "red"} and body["query"] == "a woman in a red coat"
    same = engine.search("a woman in a red coat", k=3)
    assert [r.file for r in same.results] == [r.file for r in response.results]
    np.testing.assert_allclose([r.score for r in same.results], [r.score for r in response.results], rtol=1e-5)
    assert same.colour_note is None and "colours_read_as" not in same.to_json()
    assert engine.search_ids("a woman in a crimson coat", 3) == engine.search_ids("a woman in a red coat", 3)
    plain = SearchEngine(engine.model, engine.index, engine.card, colour_grounding=False)
    assert plain.search("a woman in a crimson coat", k=3).unknown_words == ["crimson"]
