"""What the model is weak at: named in a query, said beside the results with the measured figure."""

from __future__ import annotations

from pathlib import Path

from lgur.search.weaknesses import named_kinds, weak_spots
from tests.conftest import tiny_engine

COLOURS = frozenset({"white", "black", "red", "blue"})
BY_KIND = {
    "glasses": {"precision": 13.8, "chance": 14.4, "queries": 20},
    "shoe_colour": {"precision": 21.5, "chance": 21.7, "queries": 30},
    "bag_type": {"precision": 58.2, "chance": 32.3, "queries": 40},
    "bag_colour": {"precision": 20.0, "chance": 7.2, "queries": 25},
}


def test_the_kinds_a_query_names() -> None:
    text = "A man with white sneakers and a black backpack, wearing glasses and a cap, holding a phone"
    assert named_kinds(text, COLOURS) == ["shoe_colour", "bag_colour", "glasses", "headwear", "carried_object"]
    assert named_kinds("woman with a backpack in boots", COLOURS) == ["bag_type", "shoe_type"]
    assert named_kinds("a woman in a red coat", COLOURS) == []


def test_weak_kinds_get_a_note_with_the_measured_figure_strong_ones_none() -> None:
    notes = weak_spots("man in glasses with a backpack and white shoes", BY_KIND, COLOURS)
    assert notes == [
        "This model is weak at glasses: for short queries naming it, 14% of its top 10 had it (14% by chance).",
        "This model is weak at shoe colour: for short queries naming it, 22% of its top 10 had it (22% by chance).",
    ]  # the bag type (58%) is not weak; a kind without figures says nothing
    assert weak_spots("a man in a hat", BY_KIND, COLOURS) == []


def test_search_reports_weak_spots_from_the_card(tmp_path: Path) -> None:
    card = {
        "vocabulary": sorted(COLOURS | {"a", "man", "with", "shoes", "glasses"}),
        "query_bench": {"default": {"by_kind": BY_KIND}},
    }
    engine = tiny_engine(tmp_path, card)
    response = engine.search("a man with white shoes", k=2)
    assert len(response.weak_spots) == 1 and "shoe colour" in response.weak_spots[0]
    assert response.to_json()["weak_spots"] == response.weak_spots
    assert "weak_spots" not in engine.search("a man", k=2).to_json()
