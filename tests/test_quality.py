"""Explanation-quality measures against part labels."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from lgur.eval.pointing import patch_part_fractions, pointing_hit
from lgur.eval.quality import (
    background_floor,
    energy_inside,
    explanation_quality,
    format_quality,
    linear_probe,
    region_labels,
    roc_auc,
    summary_rows,
    top_atom_overlap,
)
from lgur.synth.world import WorldSpec, generate_world


def test_roc_auc_known_values() -> None:
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert roc_auc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([0, 1, 0, 1])) == 0.5
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75


def test_patch_part_fractions() -> None:
    labels = np.zeros((4, 4), dtype=np.uint8)
    labels[:2, :2] = 3  # top-left patch is all "upper"
    labels[2:, 2:] = 4
    labels[3, 3] = 5
    fractions = patch_part_fractions(labels, (2, 2))
    assert fractions.shape == (4, 8) and np.allclose(fractions.sum(1), 1)
    assert fractions[0, 3] == 1 and fractions[3, 4] == 0.75 and fractions[3, 5] == 0.25


def test_background_floor_of_a_part_smaller_than_a_patch() -> None:
    labels = np.zeros((4, 4), dtype=np.uint8)
    labels[:2, :2] = 3  # "upper" fills the top-left patch
    labels[3, 2:] = 5  # "shoes" fill half of the bottom-right patch
    labels[3, 0] = 5  # and a quarter of the bottom-left one
    floors = background_floor([patch_part_fractions(labels, (2, 2))])
    assert floors["upper"] == {"part_shaped": 0.0, "best_patch": 0.0, "images": 1}
    # shaped like the shoes: 2/3 of the attention on a half-background patch, 1/3 on a 3/4-background one
    assert floors["shoes"]["part_shaped"] == pytest.approx(2 / 3 * 0.5 + 1 / 3 * 0.75)
    assert floors["shoes"]["best_patch"] == pytest.approx(0.5)
    assert "lower" not in floors  # not visible in any image: no floor


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("world")
    generate_world(WorldSpec(seed=2, train_identities=1, val_identities=1, test_identities=3), root, 1, False)
    return root


def test_prototype_overlap_is_one_for_identical_prototypes(tiny_model, tiny_world) -> None:
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        model.pgu.prototypes.copy_(model.pgu.prototypes[:1].expand_as(model.pgu.prototypes))
    assert explanation_quality(model, tiny_world, "test")["prototype_overlap"] == pytest.approx(1.0, abs=1e-4)


def test_explanation_quality_on_a_tiny_world(tiny_model, tiny_world) -> None:
    tmp_path = tiny_world
    result = explanation_quality(tiny_model, tmp_path, "test")
    assert 0.1 < result["foreground_auc"] < 0.9  # an untrained model: neither perfect nor inverted
    shares = np.array(result["prototype_part_share"])
    assert shares.shape == (tiny_model.config.num_prototypes, 8)
    assert np.allclose(shares.sum(1), 1, atol=1e-3)  # each prototype's attention is spread over the parts
    assert sum(result["part_area_share"]) == pytest.approx(1, abs=1e-3)
    for floor in result["background_floor"].values():  # no map on a part reads less background than these
        assert 0 <= floor["best_patch"] <= 1 and 0 <= floor["part_shaped"] <= 1 and floor["images"] > 0
    assert result["pointing_game"]["words"] > 0  # captions name garments; their guidance maps are scored
    matching, other = result["shared_atoms"]["matching_pairs"], result["shared_atoms"]["non_matching_pairs"]
    test = [a for a in json.loads((tmp_path / "reid_raw.json").read_text()) if a["split"] == "test"]
    assert matching["pairs"] == sum(len(a["captions"]) for a in test)  # every caption with its own image
    assert 0 < other["pairs"] <= matching["pairs"]  # a random other image, kept when it is another person's
    assert 0 <= other["mean_shared"] <= result["shared_atoms"]["top"] and 0 <= other["any_shared"] <= 100
    relative = result["shared_atoms"]["relative"]  # ranked as the app ranks them
    assert relative["matching_pairs"]["pairs"] == matching["pairs"]
    assert relative["non_matching_pairs"]["pairs"] == other["pairs"]
    rows = dict(summary_rows(result, "P1 head, P2"))  # what the app's Model tab shows
    assert set(rows) == {
        "prototypes",
        "background in each part's own patches (this grid)",
        "guidance pointing game",
        "shared dictionary",
    }
    assert rows["prototypes"].startswith("P1 head, P2; overlap")
    text = format_quality(result)
    assert "prototype overlap" in text and "pointing game" in text and "shared dictionary" in text
    assert "least background a map on a part can read" in text
    assert "details" not in result  # only on request


def test_detail_probe_on_a_tiny_world(tiny_model, tiny_world) -> None:
    result = explanation_quality(tiny_model, tiny_world, "test", details=True)
    assert "top_colour" in result["details"]
    for v in result["details"].values():
        assert 0 <= v["region_features"] <= 100 and 0 <= v["embedding"] <= 100 and v["images"] > 0
    assert "details kept" in format_quality(result)


def test_linear_probe_reads_an_encoded_label_and_not_noise() -> None:
    rng = np.random.default_rng(0)
    labels = [str(c) for c in rng.integers(0, 4, 400)]
    groups = np.arange(400) // 2  # two images per identity
    noise = rng.normal(size=(400, 16))
    encoded = noise.copy()
    encoded[np.arange(400), [int(c) for c in labels]] += 3.0  # one dimension per class
    assert linear_probe(encoded, labels, groups) > 90
    assert abs(linear_probe(noise, labels, groups) - 25) < 10  # chance: 4 classes


def grid_map(grid: tuple[int, int], y: float, x: float, size: tuple[int, int] = (224, 84)) -> np.ndarray:
    """A (rows, cols) map whose one hot cell holds the pixel (y, x) of a size-(H, W) image."""
    word_map = np.zeros(grid)
    word_map[int(y * grid[0] / size[0]), int(x * grid[1] / size[1])] = 1.0
    return word_map


def test_pointing_game_counts_pixels_not_patches() -> None:
    part = np.zeros((224, 84), dtype=bool)
    part[100:130, 20:60] = True  # a part at rows 100-129 of a 224-pixel image
    tolerance = 15  # pixels at 224: Zhang et al.
    for grid in [(12, 4), (16, 6), (28, 12)]:
        assert pointing_hit(grid_map(grid, 115, 40), part)  # peak on the part
        assert not pointing_hit(grid_map(grid, 180, 40), part)  # far below it
        assert not pointing_hit(grid_map(grid, 115, 40), np.zeros_like(part))  # no part pixels
    # a peak a whole 12x4 cell (18.7 px) below the part: one patch of tolerance would count it
    # on the coarse grid; in pixels, every grid agrees it is beyond 15 pixels
    far = [pointing_hit(grid_map(grid, 130 + tolerance + 6, 40), part) for grid in [(12, 4), (16, 6), (28, 12)]]
    assert far == [False, False, False]
    # and just inside the tolerance on a fine grid, just outside with tolerance 0
    near = grid_map((56, 21), 134, 40)
    assert pointing_hit(near, part) and not pointing_hit(near, part, tolerance=0)
    mask = np.zeros((6, 4), dtype=bool)
    mask[1:3, 1:3] = True
    fractions = mask.astype(float).reshape(-1)
    spread = np.full(24, 1.0)
    assert energy_inside(spread, fractions) == pytest.approx(4 / 24)
    assert energy_inside(mask.reshape(-1) * 2.0, fractions) == pytest.approx(1.0)


def test_top_atom_overlap_against_sets() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(5, 50, generator=g), torch.rand(5, 50, generator=g)
    got = top_atom_overlap(a, b, k=10)
    for i in range(5):
        top_a, top_b = set(a[i].topk(10).indices.tolist()), set(b[i].topk(10).indices.tolist())
        assert got[i].item() == pytest.approx(len(top_a & top_b) / 10)
    assert torch.all(top_atom_overlap(a, a, k=10) == 1)


def test_region_labels_and_distinct_regions() -> None:
    area = np.array([0.6, 0.05, 0.05, 0.15, 0.1, 0.02, 0.02, 0.01])
    share = np.tile(area, (4, 1))  # uniform attention: no region
    share[0] = [0.1, 0.5, 0.05, 0.2, 0.1, 0.02, 0.02, 0.01]  # head (10x)
    share[1] = [0.1, 0.45, 0.05, 0.2, 0.1, 0.05, 0.04, 0.01]  # head too (9x): the same region
    share[2] = [0.1, 0.05, 0.05, 0.2, 0.5, 0.05, 0.04, 0.01]  # lower (5x)
    regions = region_labels(share, area)
    # P2 also exceeds 2x on the feet (2.5x): matched there, since P1 holds the head more strongly
    assert regions["labels"] == ["head", "feet", "lower body", "mixed"]
    assert regions["distinct_regions"] == 3
    assert regions["assignment"] == {"P1": "hair/head", "P2": "shoes", "P3": "lower"}
