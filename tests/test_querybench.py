"""The short-query benchmark: query generation and scoring against gallery attributes."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lgur.eval.querybench import (
    ANY,
    Query,
    binding_probe,
    colour_sensitivity,
    embedding_probe,
    make_queries,
    matches,
    score,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def people() -> list[dict]:
    return [m["attributes"] for m in json.loads((ROOT / "gallery" / "manifest.json").read_text())["images"]]


def test_matches_needs_every_named_attribute() -> None:
    person = {"gender": "male", "top_type": "jacket", "top_colour": "red", "bag_type": "none"}
    assert matches(person, {"top_type": "jacket", "top_colour": "red"})
    assert not matches(person, {"top_type": "jacket", "top_colour": "blue"})
    assert not matches(person, {"top_colour": "red", "gender": "female"})
    assert not matches(person, {"bag_type": ANY})  # "with a bag": having none is a miss
    assert matches({"bag_type": "handbag"}, {"bag_type": ANY})


def test_score_on_a_hand_made_ranking() -> None:
    people = [{"top_colour": "red"}, {"top_colour": "red"}, {"top_colour": "blue"}, {"top_colour": "green"}]
    queries = [Query("red top", {"top_colour": "red"}), Query("blue top", {"top_colour": "blue"})]
    rankings = np.array([[0, 2, 1, 3], [0, 1, 3, 2]])
    result = score(rankings, people, queries, k=2)
    # query 1: top-2 = red, blue -> 1/2, top-1 right; query 2: red, red -> 0/2, top-1 wrong
    assert result["precision@2"] == pytest.approx(25.0)
    assert result["top1"] == pytest.approx(50.0)
    assert result["chance"] == pytest.approx(100 * (2 / 4 + 1 / 4) / 2)
    assert [r["precision"] for r in result["rows"]] == [0.5, 0.0]
    assert result["ceiling"] == pytest.approx(75.0)  # only one blue top: a perfect top 2 holds 1 of 2
    assert result["by_kind"]["top_colour"] == {"precision": 25.0, "chance": 100 * (2 / 4 + 1 / 4) / 2, "queries": 2}


def test_score_by_kind_credits_each_named_attribute_on_its_own() -> None:
    people = [{"top_colour": "red", "shoe_colour": "black"}, {"top_colour": "red", "shoe_colour": "white"}]
    queries = [Query("red top, white shoes", {"top_colour": "red", "shoe_colour": "white"})]
    result = score(np.array([[0, 1]]), people, queries, k=1)
    assert result["precision@1"] == 0.0  # the first result has a red top but black shoes
    assert result["by_kind"]["top_colour"]["precision"] == 100.0
    assert result["by_kind"]["shoe_colour"] == {"precision": 0.0, "chance": 50.0, "queries": 1}


def test_embedding_probe_finds_what_the_embeddings_carry() -> None:
    rng = np.random.default_rng(0)
    n = 300
    identities = list(range(n))
    people = [
        {"top_colour": str(rng.choice(["red", "blue", "green"])), "glasses": str(rng.choice(["none", "glasses"]))}
        for _ in range(n)
    ]
    colour = np.array([["red", "blue", "green"].index(p["top_colour"]) for p in people])
    embeddings = torch.from_numpy(np.eye(3)[colour] * 2 + rng.normal(0, 0.3, (n, 3))).float()
    embeddings = torch.cat([embeddings, torch.randn(n, 13)], dim=1)  # glasses are not in there
    probe = embedding_probe(embeddings, people, identities, ["top_colour", "glasses"])
    assert probe["top_colour"]["balanced_accuracy"] > 95
    assert probe["top_colour"]["values"] == 3 and probe["glasses"]["values"] == 2
    assert probe["glasses"]["chance"] == 50.0
    assert abs(probe["glasses"]["balanced_accuracy"] - 50.0) < 15  # no better than guessing


@pytest.mark.parametrize("style", ["default", "check"])
def test_queries_are_short_grounded_and_distinct(people: list[dict], style: str) -> None:
    queries = make_queries(people, 200, seed=0, style=style)
    assert len(queries) == 200 and len({q.text for q in queries}) == 200
    for q in queries:
        assert 1 <= len(q.attributes) <= 4, q
        assert len(q.text.split()) <= 12, q.text  # search-box length, not a caption
        assert any(matches(p, q.attributes) for p in people), q  # someone in the gallery fits
    assert make_queries(people, 50, seed=0, style=style) == queries[:50]  # seeded


def test_the_two_sets_are_phrased_differently(people: list[dict]) -> None:
    default = {q.text for q in make_queries(people, 200, style="default")}
    check = {q.text for q in make_queries(people, 200, style="check")}
    assert len(default & check) < 20  # a few one-word queries ("jeans") may coincide
    assert any("looking for" in t or "+" in t for t in check) and not any("looking for" in t for t in default)


class _WordsModel:
    """A text model that embeds a query as its (hashed) words, or also its word pairs."""

    def __init__(self, pairs: bool) -> None:
        self.pairs = pairs

    def tokenize(self, texts: list[str]) -> tuple[list[str], None]:
        return texts, None

    def embed_texts(self, texts: list[str], mask: None) -> torch.Tensor:
        rows = []
        for text in texts:
            words = text.lower().replace(",", " ").split()
            units = words + ([" ".join(p) for p in zip(words, words[1:])] if self.pairs else [])
            v = torch.zeros(512)
            for u in units:
                v[int(hashlib.md5(u.encode()).hexdigest(), 16) % 512] += 1.0
            rows.append(torch.nn.functional.normalize(v, dim=0))
        return torch.stack(rows)


def test_binding_probe_sees_word_order_only_in_a_model_that_reads_it() -> None:
    texts = [
        "man in a red jacket and blue jeans",
        "woman with black boots and a white backpack",
        "guy in a grey hoodie",
        "lady in green shorts and yellow top",
    ]
    bag = binding_probe(_WordsModel(pairs=False), texts)
    ordered = binding_probe(_WordsModel(pairs=True), texts)
    assert bag["trade"]["queries"] == 3  # the queries with two different colours
    assert bag["trade"]["sensitivity"] == pytest.approx(0.0, abs=1e-6)  # a bag of words cannot see a trade
    assert ordered["trade"]["sensitivity"] > 0.2
    for kind in ("colour", "garment"):
        assert bag[kind]["queries"] == 4 and bag[kind]["sensitivity"] > 0.1


class _ShoeBlindModel(_WordsModel):
    """Reads every word except the colour of shoes."""

    def embed_texts(self, texts: list[str], mask: None) -> torch.Tensor:
        return super().embed_texts([re.sub(r"\w+ (sneakers|boots)", r"\1", t) for t in texts], mask)


def test_colour_sensitivity_finds_the_thing_whose_colour_is_ignored() -> None:
    seeing = colour_sensitivity(_WordsModel(pairs=True), count=20)
    blind = colour_sensitivity(_ShoeBlindModel(pairs=True), count=20)
    assert set(seeing) == {"top", "bottom", "shoes", "bag"}
    assert min(seeing.values()) > 0.1
    assert blind["shoes"] == pytest.approx(0.0, abs=1e-6)
    assert min(blind[t] for t in ("top", "bottom", "bag")) > 0.1


def test_the_bench_reads_queries_as_the_app_does(tmp_path: Path) -> None:
    from lgur.eval.querybench import run_query_bench
    from lgur.model.checkpoint import save_checkpoint
    from lgur.model.lgur import LGUR
    from tests.conftest import tiny_config

    manifest = json.loads((ROOT / "gallery" / "manifest.json").read_text())
    manifest["images"] = [m for m in manifest["images"] if m["attributes"].get("shoe_type") == "sneakers"][:24]
    gallery = tmp_path / "gallery"
    for m in manifest["images"]:
        (gallery / m["file"]).parent.mkdir(parents=True, exist_ok=True)
        (gallery / m["file"]).write_bytes((ROOT / "gallery" / m["file"]).read_bytes())
    (gallery / "manifest.json").write_text(json.dumps(manifest))
    queries = make_queries([m["attributes"] for m in manifest["images"]], 40)
    words = {w for q in queries for w in re.findall(r"[a-z]+", q.text)}
    assert "sneakers" in words
    vocabulary = sorted(words - {"sneakers"} | {"sneaker"})  # the model learned the singular only
    torch.manual_seed(0)
    checkpoint = save_checkpoint(LGUR(tiny_config()).eval(), tmp_path / "tiny.safetensors", {"vocabulary": vocabulary})

    read = run_query_bench(checkpoint, gallery, count=40)
    typed = run_query_bench(checkpoint, gallery, count=40, reading=False)
    assert read["read_as_the_app_does"] and not typed["read_as_the_app_does"]
    rewritten = [row for row in read["rows"] if "read_as" in row]
    assert rewritten and all(re.search(r"\bsneakers\b", row["query"]) for row in rewritten)
    assert all(row["read_as"] == re.sub(r"\bsneakers\b", "sneaker", row["query"]) for row in rewritten)
    assert not any("read_as" in row for row in typed["rows"])
