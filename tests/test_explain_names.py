"""What the page names: each prototype by what it reads on this image, each atom by its most specific word."""

from __future__ import annotations

import numpy as np

from lgur.model.details import pool_to_grid, prototype_readings
from lgur.search.explain import (
    EFFECTS_LEGEND,
    FOREGROUND_LEGEND,
    MAP_LEGEND,
    WORDS_LEGEND,
    atom_names,
    reading_name,
)

TERMS = ("black", "black backpack", "red shirt", "glasses")
GRID = (4, 2)  # the detector's grid; the prototype maps' is twice as fine


def _where(cells: dict[int, list[int]]) -> np.ndarray:
    """(N, K): each phrase seen on the given cells of GRID."""
    where = np.zeros((8, len(TERMS)), np.float32)
    for k, seen in cells.items():
        where[seen, k] = 1.0 / len(seen)
    return where


def _fine(coarse: np.ndarray) -> np.ndarray:
    """(P, 8) maps on GRID -> (P, 32) on the 8x4 grid, each coarse cell spread over its four."""
    return np.repeat(np.repeat(coarse.reshape(-1, 4, 2), 2, 1), 2, 2).reshape(len(coarse), 32) / 4


def test_pool_to_grid_sums_the_fine_cells() -> None:
    coarse = np.arange(16, dtype=np.float32).reshape(2, 8)
    assert np.allclose(pool_to_grid(_fine(coarse), (8, 4), GRID), coarse)


def test_each_prototype_named_by_what_it_reads_here() -> None:
    where = _where({0: [4], 1: [4], 2: [2], 3: [0]})
    probabilities = np.array([0.9, 0.8, 0.7, 0.2])  # glasses not seen on this image
    coarse = np.full((3, 8), 0.1, np.float32)
    coarse[0, 4] = 30.0  # on the backpack
    coarse[1, 2] = 30.0  # on the shirt
    coarse[2, 0] = 30.0  # where glasses would be, but none are seen: nothing in particular
    readings = prototype_readings(_fine(coarse), (8, 4), where, probabilities, TERMS, GRID)
    assert readings[0][0] == "black backpack"  # the two-word phrase over the bare colour
    assert readings[1][0] == "red shirt" and readings[1][1] > 2
    assert readings[2] is None
    assert [reading_name(p, r) for p, r in enumerate(readings)] == ["P1 black backpack", "P2 red shirt", "P3"]


def test_the_same_prototype_is_named_differently_on_another_person() -> None:
    coarse = np.full((1, 8), 0.1, np.float32)
    coarse[0, 4] = 30.0
    carrying = prototype_readings(_fine(coarse), (8, 4), _where({1: [4]}), np.array([0, 0.9, 0, 0]), TERMS, GRID)
    without = prototype_readings(_fine(coarse), (8, 4), _where({2: [2]}), np.array([0, 0, 0.9, 0]), TERMS, GRID)
    assert carrying == [("black backpack", carrying[0][1])] and without == [None]


def test_a_flat_map_reads_nothing() -> None:
    flat = np.full((2, 32), 1 / 32, np.float32)
    where = _where({0: [4, 5], 1: [4, 5], 2: [2, 3], 3: [0]})
    assert prototype_readings(flat, (8, 4), where, np.ones(4), TERMS, GRID) == [None, None]


def test_atoms_named_by_their_most_specific_word() -> None:
    words = ["a", "backpack", "red", "in", "with", "the"]
    table = np.tile(np.array([0.45, 0.05, 0.45, 0.05], np.float32), (6, 1))
    table[1] = [0.05, 0.85, 0.05, 0.05]  # "backpack" uses atom 1 far more than the average word
    named = atom_names(words, table, [0, 1])
    assert named[0] is None  # every word uses atom 0 about alike
    assert named[1][0] == "backpack" and named[1][1] == np.float32(0.85) / table[:, 1].mean()


def test_every_colour_scale_has_a_legend() -> None:
    for legend in (MAP_LEGEND, FOREGROUND_LEGEND, WORDS_LEGEND, EFFECTS_LEGEND):
        assert 'class="legend-bar"' in legend and "linear-gradient" in legend
    app = (__import__("pathlib").Path(__file__).resolve().parents[1] / "app.py").read_text()
    for name in ("MAP_LEGEND", "FOREGROUND_LEGEND", "WORDS_LEGEND", "EFFECTS_LEGEND"):
        assert f"gr.HTML({name}" in app


def test_an_atom_is_never_named_by_a_function_word() -> None:
    words = ["off", "backpack", "red", "with", "a", "the", "in", "of"]
    table = np.tile(np.array([0.5, 0.0, 0.5], np.float32), (8, 1))
    table[0] = [0.0, 1.0, 0.0]  # "off" uses atom 1 most ...
    table[1] = [0.1, 0.8, 0.1]  # ... "backpack" second, 3.6x the average word
    assert atom_names(words, table, [1])[1][0] == "backpack"
    # with a detector, only the words of its phrases name atoms: none of these uses atom 1
    assert atom_names(words, table, [1], terms=("red coat",))[1] is None


def test_the_atlas_reads_the_same_atom_weights_as_the_explanations(tmp_path) -> None:
    import torch

    from tests.conftest import tiny_explorer

    engine = tiny_explorer(tmp_path, images=4).engine
    rows = [0, 2]
    images = engine._images([engine.gallery / engine.index.entries[r].path for r in rows])
    with torch.inference_mode():
        expected = engine.model.explain_images(images).dictionary_weights.mean(1).numpy()
    assert np.allclose(engine.atlas.patch_atoms(rows), expected, atol=1e-6)
