"""The synthetic pedestrian world: determinism, drawing vs labels, captions, splits."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from lgur.data.readers import read_cuhk_pedes
from lgur.synth.attributes import CAPTIONED_KINDS, COLOURS, sample_attributes
from lgur.synth.captions import HELD_OUT_PHRASINGS, CaptionWriter, held_out_words, words
from lgur.synth.render import ACCESSORY, BAG, LOWER, SHOES, UPPER, render, sample_camera
from lgur.synth.world import PARAPHRASE, WorldSpec, ambiguity_report, generate_world, write_gallery
from tests.conftest import REPO

SMALL = WorldSpec(seed=3, train_identities=6, val_identities=2, test_identities=4)


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_any_worker_count(tmp_path: Path) -> None:
    generate_world(SMALL, tmp_path / "a", workers=1, progress=False)
    generate_world(SMALL, tmp_path / "b", workers=2, progress=False)
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert a == b and len(a) > 20
    generate_world(dataclasses.replace(SMALL, seed=4), tmp_path / "c", workers=1, progress=False)
    assert _digest(tmp_path / "c") != a


def test_export_is_cuhk_layout_with_disjoint_splits(tmp_path: Path) -> None:
    summary = generate_world(SMALL, tmp_path, workers=1, progress=False)
    records, report = read_cuhk_pedes(tmp_path)
    assert report.skipped_total == 0
    ids = {split: {r.identity for r in records if r.split == split} for split in ("train", "val", "test")}
    assert len(ids["train"]) == 6 and len(ids["val"]) == 2 and len(ids["test"]) == 4
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    paraphrase = [r for r in records if r.split == PARAPHRASE]
    test = [r for r in records if r.split == "test"]
    assert [r.file_path for r in paraphrase] == [r.file_path for r in test]
    assert all(len(r.captions) == 2 for r in records)
    side = json.loads((tmp_path / "synthetic_attributes.json").read_text())
    for r in records:
        info = side[r.file_path]
        assert info["view"] in ("front", "back", "side")
        assert (tmp_path / info["parts"]).is_file()
        assert set(CAPTIONED_KINDS) <= set(info["attributes"])
    assert summary["splits"]["train"]["images"] == sum(1 for r in records if r.split == "train")


def test_captions_state_every_kind_and_many_colours(captions) -> None:
    mentions = [m for c in captions["mentions"] for m in c]
    assert {kind for kind, _ in mentions} == set(CAPTIONED_KINDS)  # every kind is described somewhere
    stated = {value for kind, value in mentions if kind.endswith("_colour") and kind != "hair_colour"}
    assert stated == set(COLOURS)  # ...and every garment colour of the palette


def _changed_pixels(kind: str, value: str, seed: int, view: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    attributes = sample_attributes(rng)
    camera = sample_camera(rng, view)
    camera = dataclasses.replace(camera, occluder="none")
    if kind == "bag_colour" and attributes.bag_type == "none":
        attributes = dataclasses.replace(attributes, bag_type="backpack", bag_colour="red")
    before = render(attributes, camera, degrade=False)
    after = render(dataclasses.replace(attributes, **{kind: value}), camera, degrade=False)
    assert np.array_equal(np.asarray(before.labels), np.asarray(after.labels))  # geometry untouched
    diff = np.abs(np.asarray(before.image, dtype=int) - np.asarray(after.image, dtype=int)).sum(-1) > 0
    fine = np.asarray(before.fine_labels)
    h, w = diff.shape
    blocks = fine.reshape(h, fine.shape[0] // h, w, fine.shape[1] // w).transpose(0, 2, 1, 3).reshape(h, w, -1)
    return diff, np.asarray(before.labels), blocks


@pytest.mark.parametrize(
    "kind,value,part",
    [
        ("top_colour", "green", UPPER),
        ("bottom_colour", "pink", LOWER),
        ("shoe_colour", "red", SHOES),
        ("bag_colour", "yellow", BAG),
    ],
)
@pytest.mark.parametrize("seed,view", [(1, "front"), (2, "back"), (5, "side")])
def test_changing_a_colour_changes_only_that_part(kind: str, value: str, part: int, seed: int, view: str) -> None:
    diff, labels, blocks = _changed_pixels(kind, value, seed, view)
    if not diff.any():
        pytest.skip("the part is not visible in this view")
    mask = labels == part
    # Each pixel is the mean of a 3x3 block of drawn samples: it may change only if one of its
    # samples belongs to the part.
    touched = (blocks == part).any(-1)
    assert not (diff & ~touched).any(), f"{int((diff & ~touched).sum())} pixels changed without any {kind} sample"
    assert (diff & mask).sum() >= 0.75 * diff.sum()  # thin straps have a relatively wide border


def test_view_consistent_visibility() -> None:
    rng = np.random.default_rng(0)
    base = dataclasses.replace(
        sample_attributes(rng),
        top_type="t-shirt",
        top_pattern="logo",
        bag_type="backpack",
        bag_colour="red",
        glasses="glasses",
        carried_object="none",
    )
    cams = {v: dataclasses.replace(sample_camera(rng, v), occluder="none") for v in ("front", "back", "side")}
    plain = dataclasses.replace(base, top_pattern="plain")
    for view, cam in cams.items():
        same = np.array_equal(np.asarray(render(base, cam).image), np.asarray(render(plain, cam).image))
        assert same == (view != "front"), f"chest logo visibility wrong in {view} view"
    bag = {v: (np.asarray(render(base, c).labels) == BAG).sum() for v, c in cams.items()}
    assert bag["back"] > 3 * bag["front"] > 0  # the backpack is mostly seen from behind
    glasses = {v: (np.asarray(render(base, c).labels) == ACCESSORY).sum() for v, c in cams.items()}
    assert glasses["back"] == 0 and glasses["front"] > 0


@pytest.fixture(scope="module")
def captions() -> dict[str, list]:
    """4,000 people, each described once in training words and once in held-out words."""
    rng = np.random.default_rng(11)
    out: dict[str, list] = {"train": [], "held": [], "mentions": []}
    for _ in range(4000):
        attributes, camera = sample_attributes(rng), sample_camera(rng)
        caption = CaptionWriter(rng).write(attributes, camera)
        out["train"].append(caption.text)
        out["mentions"].append(caption.mentions)
        out["held"].append(CaptionWriter(rng, held_out=True).write(attributes, camera).text)
    return out


def test_caption_statistics(captions) -> None:
    train, held = captions["train"], captions["held"]
    vocabulary = {w for c in train + held for w in words(c)}
    assert len(vocabulary) >= 300
    mean_words = np.mean([len(words(c)) for c in train])
    assert 20 <= mean_words <= 30
    assert len(set(train)) > 0.95 * len(train)  # varied, not templated copies


def test_held_out_words_and_phrasings_never_in_training(captions) -> None:
    train, held = captions["train"], captions["held"]
    forbidden = held_out_words()
    assert len(forbidden) > 50
    train_words = {w for c in train for w in words(c)}
    assert not (train_words & forbidden), sorted(train_words & forbidden)
    lowered = [c.lower() for c in train]
    for phrase in HELD_OUT_PHRASINGS:
        assert not any(phrase in c for c in lowered), phrase
    # ...and the paraphrase split really uses them.
    held_words = {w for c in held for w in words(c)}
    assert len(held_words & forbidden) > 0.6 * len(forbidden)
    assert sum(any(p in c.lower() for p in HELD_OUT_PHRASINGS) for c in held) > 0.5 * len(held)


def test_ambiguity_report(tmp_path: Path) -> None:
    generate_world(SMALL, tmp_path, workers=1, progress=False)
    report = ambiguity_report(tmp_path, "test")
    assert report["captions"] == 2 * sum(
        1 for _ in json.loads((tmp_path / "reid_raw.json").read_text()) if _["split"] == "test"
    )
    assert 1 <= report["consistent_identities_mean"] <= 4
    ceiling = report["perfect_reader"]
    assert 0 < ceiling["R@1"] <= ceiling["R@5"] <= ceiling["R@10"] <= 100
    assert ambiguity_report(tmp_path, PARAPHRASE)["captions"] == report["captions"]


def test_gallery_regenerates_bit_identically(tmp_path: Path) -> None:
    spec = WorldSpec(seed=0, test_identities=3)
    write_gallery(tmp_path / "a", spec, workers=1)
    write_gallery(tmp_path / "b", spec, workers=2)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    # The committed gallery is the default world's test split: its first identities match.
    shipped = REPO / "gallery" / "manifest.json"
    if not shipped.is_file():
        pytest.fail("gallery/manifest.json is missing: run `python -m lgur gallery`")
    manifest = json.loads(shipped.read_text())
    fresh = json.loads((tmp_path / "a" / "manifest.json").read_text())["images"]
    for entry in fresh:
        committed = REPO / "gallery" / entry["file"]
        assert committed.read_bytes() == (tmp_path / "a" / entry["file"]).read_bytes(), entry["file"]
    assert manifest["images"][: len(fresh)] == fresh


def test_concept_similarity_takes_the_best_form_of_each_concept() -> None:
    import torch

    from lgur.eval.lexical_probe import concept_similarity

    forms = torch.eye(4)  # four forms: concept 0 owns forms 0-1, concept 1 owns forms 2-3
    owner = torch.tensor([0, 0, 1, 1])
    queries = torch.tensor([[0.0, 0.9, 0.1, 0.0], [0.2, 0.0, 0.0, 0.7]])
    sims = concept_similarity(queries, forms, owner, 2)
    assert torch.allclose(sims, torch.tensor([[0.9, 0.1], [0.2, 0.7]]))
    forms = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
    own = concept_similarity(forms, forms, owner, 2, exclude_self=True)  # a form never matches itself
    assert torch.allclose(own, torch.tensor([[0.8, 0.6], [0.8, 0.96], [0.6, 0.8], [0.96, 0.8]]))


def test_lexical_probe_on_the_frozen_encoder(tiny_model) -> None:
    from lgur.eval.lexical_probe import concepts, lexical_probe
    from lgur.synth.captions import COLOUR_WORDS

    report = lexical_probe(tiny_model.text_encoder)
    assert report["held_out_forms"] == sum(len(c.held_out) for c in concepts())
    assert report["kinds"]["colour"]["concepts"] == len(COLOUR_WORDS)
    assert {e["held_out"] for e in report["examples"]} >= {"crimson", "rucksack"}
    # The real MiniLM separates the training words' concepts far above chance.
    assert report["train_accuracy"] > 2 * report["chance"]
    assert 0 <= report["held_out_accuracy"] <= 100
