"""Explanation measures that a template must fail: varied framing, counterfactuals, their baselines."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from lgur.data.dataset import reframe
from lgur.eval import faithfulness as fa
from lgur.eval.pointing import pointing_hit, template_map, uniform_hit
from lgur.synth.attributes import COUNTERFACTUAL_KINDS, counterfactual, sample_attributes
from lgur.synth.render import (
    BACKGROUND,
    BAG,
    HAIR,
    SKIN,
    UPPER,
    Camera,
    detector_framing,
    placed,
    render,
    sample_camera,
)
from lgur.synth.world import WorldSpec, generate_world


def _person(seed: int = 1, view: str = "front"):
    rng = np.random.default_rng(seed)
    return sample_attributes(rng), sample_camera(rng, view)


def _person_rows(labels: np.ndarray) -> tuple[float, float, float]:
    """(top, bottom, centroid) of the person's pixels as fractions of the height."""
    ys = np.nonzero(labels != BACKGROUND)[0]
    h = labels.shape[0]
    return ys.min() / h, (ys.max() + 1) / h, (ys.mean() + 0.5) / h


def test_placed_person_moves_by_the_given_amount() -> None:
    attributes, camera = _person(3)
    top, bottom = (render(attributes, placed(camera, attributes.height, 0.7, c), degrade=False) for c in (0.36, 0.64))
    t, b = _person_rows(np.asarray(top.labels)), _person_rows(np.asarray(bottom.labels))
    assert b[2] - t[2] == pytest.approx(0.28, abs=0.01)  # the centroid moves with the person
    assert t[1] - t[0] == pytest.approx(0.7, abs=0.05) and b[1] - b[0] == pytest.approx(0.7, abs=0.05)


def test_detector_framing_varies_height_and_place_and_cuts_people() -> None:
    heights, centres, cut = [], [], 0
    for seed in range(40):
        attributes, camera = _person(seed)
        framed = detector_framing(camera, attributes.height, np.random.default_rng(100 + seed))
        assert (framed.view, framed.phase, framed.scene_seed) == (camera.view, camera.phase, camera.scene_seed)
        top, bottom, centre = _person_rows(np.asarray(render(attributes, framed, degrade=False).labels))
        heights.append(bottom - top)
        centres.append(centre)
        cut += top <= 0.0 or bottom >= 1.0
    assert min(heights) < 0.65 and max(heights) > 0.9  # 0.55-1.0 of the height
    assert np.ptp(centres) > 0.2  # moved up and down, not at one height
    assert cut >= 3  # some crops cut the head or the feet


def test_world_camera_is_unchanged_by_the_framing_field() -> None:
    attributes, camera = _person(4)
    assert camera.shift_y == 0.0
    same = Camera.from_dict(camera.to_dict())
    assert np.array_equal(np.asarray(render(attributes, same).image), np.asarray(render(attributes, camera).image))


@pytest.mark.parametrize("kind", COUNTERFACTUAL_KINDS)
def test_counterfactual_changes_one_attribute_and_only_its_pixels(kind: str) -> None:
    parts = {
        "bag_colour": {BAG},
        "bag_type": {BAG},
        "top_colour": {UPPER},
        "glasses": {HAIR, SKIN, 7},
        "headwear": {HAIR, SKIN, 7},
    }[kind]
    for seed in range(30):
        attributes, camera = _person(seed, "front")
        changed = counterfactual(attributes, kind, np.random.default_rng(seed))
        if changed is None:
            continue
        differ = {
            f.name for f in dataclasses.fields(attributes) if getattr(attributes, f.name) != getattr(changed, f.name)
        }
        assert differ and differ <= {kind, "bag_colour", "headwear_colour", "headwear"}
        before, after = render(attributes, camera, degrade=False), render(changed, camera, degrade=False)
        pixels = np.abs(np.asarray(before.image, np.int16) - np.asarray(after.image, np.int16)).max(-1) > 0
        if not pixels.any():  # hidden in this view (a backpack from the front)
            continue
        labels = np.isin(np.asarray(before.labels), list(parts)) | np.isin(np.asarray(after.labels), list(parts))
        # outlines and supersampling spread a change a pixel or two beyond its part
        near = torch.nn.functional.max_pool2d(torch.from_numpy(labels)[None, None].float(), 5, 1, 2)[0, 0].bool()
        assert (pixels & ~near.numpy()).sum() <= 0.02 * pixels.sum()
        return
    pytest.fail(f"no person the {kind} change applies to")


def test_reframe_moves_and_scales_the_picture() -> None:
    images = torch.zeros(64, 3, 64, 32, dtype=torch.uint8)
    images[:, :, 20:50, 12:20] = 255  # a bright "person"
    moved = reframe(images, torch.Generator().manual_seed(0), share=1.0)
    rows = [(m[0] > 128).nonzero()[:, 0].float().mean() for m in moved if (m[0] > 128).any()]
    assert torch.stack(rows).std() > 3  # placed at different heights
    assert torch.equal(reframe(images, torch.Generator().manual_seed(0), share=0.0), images)


def test_centroid_moves_template_zero_follower_one() -> None:
    maps = torch.zeros(1, 2, 24, 8)
    maps[0, :, 4:8] = 1.0
    moved = torch.zeros_like(maps)
    moved[0, :, 11:15] = 1.0  # 7 rows of 24 down
    assert torch.allclose(fa.centroid_rows(moved) - fa.centroid_rows(maps), torch.full((1, 2), 7 / 24))
    assert torch.allclose(fa.centroid_rows(maps) - fa.centroid_rows(maps), torch.zeros(1, 2))


def test_point_and_uniform_templates() -> None:
    mask = np.zeros((96, 32), dtype=bool)
    mask[10:20, 10:30] = True
    assert template_map((0.15, 0.5), (24, 8))[3, 4] == 1.0
    assert pointing_hit(template_map((0.15, 0.5), (24, 8)), mask)
    assert not pointing_hit(template_map((0.9, 0.5), (24, 8)), mask)
    chance = uniform_hit(mask)
    assert mask.mean() < chance < 0.5  # the part plus its tolerance band


def test_top_cells_and_blank() -> None:
    maps = torch.arange(24 * 8, dtype=torch.float32).view(1, 24, 8)
    cells = fa.top_cells(maps, 0.1)
    assert cells.sum() == round(0.1 * 192) and cells[0, -1].all()  # the largest values: the last rows
    images = torch.ones(1, 3, 48, 16)
    blanked = fa.blank(images, cells)
    assert blanked[0, :, -2:].abs().sum() == 0 and blanked[0, :, :2].sum() > 0


def test_effective_atoms_uniform_and_one_hot() -> None:
    uniform = torch.full((1, 2, 3, 40), 1 / 40)
    one_hot = torch.zeros(1, 2, 3, 40)
    one_hot[..., 5] = 1.0
    assert torch.allclose(fa.effective_atoms(uniform), torch.full((1, 3), 40.0))
    assert torch.allclose(fa.effective_atoms(one_hot), torch.ones(1, 3))


def test_phrases_for_a_changed_value() -> None:
    terms = ("red backpack", "red", "blue backpack", "red shirt", "glasses", "black cap", "backpack")
    assert [terms[i] for i in fa.phrase_rows_for(terms, "bag_colour", "red")] == ["red backpack"]
    assert [terms[i] for i in fa.phrase_rows_for(terms, "top_colour", "red")] == ["red shirt"]
    assert [terms[i] for i in fa.phrase_rows_for(terms, "glasses", "glasses")] == ["glasses"]
    assert [terms[i] for i in fa.phrase_rows_for(terms, "headwear", "cap")] == ["black cap"]
    assert fa.phrase_rows_for(terms, "glasses", "none") == []


@pytest.fixture(scope="module")
def framed_world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("worlds")
    generate_world(WorldSpec(seed=2, train_identities=2, val_identities=3, test_identities=1), root / "w", 1, False)
    spec = WorldSpec(seed=2, train_identities=2, val_identities=3, test_identities=1, framing="detector")
    generate_world(spec, root / "framed", 1, False, splits=("val",))
    return root


def test_a_template_scores_its_baseline_and_fails_equivariance(tiny_model, framed_world, monkeypatch) -> None:
    """Maps that ignore the image (each prototype on one part's mean training position) must tie the
    fixed-point baseline in the pointing game and score 0 in equivariance."""
    points = fa.part_points(framed_world / "w")

    parts = [1, 2, 3, 4, 5, 6]  # prototype p on parts[p]'s mean position

    def template_maps(model, images, layer=-1):
        maps = [template_map(points[part], (24, 8)) for part in parts]
        return torch.from_numpy(np.stack(maps))[None].expand(len(images), -1, -1, -1).float()

    monkeypatch.setattr(fa, "drawn_maps", template_maps)
    assignment = {f"P{p + 1}": fa.PARTS[part] for p, part in enumerate(parts)}
    result = fa.pointing(tiny_model, framed_world / "framed", "val", points, assignment=assignment)
    assert result["pairs"] > 0
    assert result["model"] == pytest.approx(result["fixed_point"])
    moves = fa.equivariance(tiny_model, framed_world / "framed", "val", 3)
    assert max(abs(m) for m in moves["drawn_layer"]) < 1e-6


def test_a_map_that_follows_the_person_passes_equivariance(tiny_model, framed_world, monkeypatch) -> None:
    """On a black background, a map of where the pixels are not black follows the person: ratio 1."""
    import lgur.synth.render as render_module
    from lgur.data.dataset import normalize

    monkeypatch.setattr(render_module, "_draw_scene", lambda *args: None)  # the canvas starts black
    black = normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8))

    def person_maps(model, images, layer=-1):
        person = ((images - black).abs().sum(1) > 0.05).float()  # (B, H, W)
        cells = torch.nn.functional.adaptive_avg_pool2d(person[:, None], (24, 8))  # (B, 1, 24, 8)
        return cells.expand(-1, 2, -1, -1)

    monkeypatch.setattr(fa, "drawn_maps", person_maps)
    moves = fa.equivariance(tiny_model, framed_world / "framed", "val", 3)
    assert min(moves["drawn_layer"]) == pytest.approx(1.0, abs=0.1)


def test_faithfulness_on_a_tiny_world(tiny_model, framed_world) -> None:
    result = fa.faithfulness(tiny_model, framed_world / "w", framed_world / "framed", "val", limit=6)
    assert result["pointing"]["images"] == 6
    words = result["word_maps"]  # the guidance maps' pointing game, beside the templates on the same words
    assert words["words"] > 0 and 0 <= words["fixed_point"] <= 100 and 0 <= words["uniform"] <= 100
    assert len(result["equivariance"]["drawn_layer"]) == tiny_model.config.num_prototypes
    assert result["deletion"]["template_drop"] >= 0 and result["deletion"]["ratio"] > 0
    assert result["counterfactuals"]["pairs"] > 0
    dictionary = result["dictionary"]
    assert 1 <= dictionary["per_patch"] <= tiny_model.config.num_atoms
    assert 1 <= dictionary["per_word"] <= tiny_model.config.num_atoms
