"""The docs say what is: every figure README and MODEL_CARD quote is the shipped card's, and the
documented API is what the app answers with."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_explorer

CARD = json.loads((REPO / "assets" / "lgur_cpu.json").read_text())
README = (REPO / "README.md").read_text()
MODEL_CARD = (REPO / "docs" / "MODEL_CARD.md").read_text()


def _metric(split: str, key: str) -> str:
    return f"{CARD['metrics'][split][key]:.2f}"


def _percent(value: float) -> str:
    return f"{value:.1f}"


def quoted_figures() -> dict[str, list[str]]:
    """What each doc must say, as the card has it (2 decimals for retrieval, 1 for percentages)."""
    faith, bench = CARD["faithfulness"], CARD["query_bench"]
    pointing, words, details = faith["pointing"], faith["word_maps"], faith["detail_maps"]
    kinds = bench["default"]["by_kind"]
    deletion, counter, dictionary = faith["deletion"], faith["counterfactuals"], faith["dictionary"]
    return {
        "README.md": [
            f"R@1 {_metric('test+details', 'R@1')}, mAP {_metric('test+details', 'mAP')}",
            f"{_metric('test', 'R@1')} / {_metric('test', 'mAP')}",
            f"{_metric('test-framed', 'R@1')} on crops framed",
            f"**{_percent(bench['default']['precision@10'])}%** of the top 10",
            f"{_percent(bench['check']['precision@10'])}% on the second phrasing set",
            f"glasses ({_percent(kinds['glasses']['precision'])}% of the top 10, chance "
            f"{_percent(kinds['glasses']['chance'])}%)",
            f"bag colour {_percent(kinds['bag_colour']['precision'])}%",
            f"{_percent(pointing['model'])}% of the time (a fixed point per part: "
            f"{_percent(pointing['fixed_point'])}%)",
            f"the detail maps {_percent(details['accuracy'])}% ({_percent(details['fixed_point'])}%)",
            f"word maps {_percent(words['accuracy'])}%, *below* the fixed point's {_percent(words['fixed_point'])}%",
            f"only {deletion['ratio']:.2f}x",
        ],
        "docs/MODEL_CARD.md": [
            f"| {_metric('test+details', 'R@1')} / {_metric('test+details', 'mAP')} |",
            f"| {_metric('test', 'R@1')} / {_metric('test', 'mAP')} |",
            f"| {_metric('test-framed', 'R@1')} / {_metric('test-framed', 'mAP')} |",
            f"| {_metric('test-paraphrase+read-as-app+details', 'R@1')} / "
            f"{_metric('test-paraphrase+colour-grounding', 'R@1')} / {_metric('test-paraphrase', 'R@1')} |",
            f"| {_percent(bench['default']['precision@10'])}% / {_percent(bench['check']['precision@10'])}% |",
            f"| {_percent(bench['default']['top1'])}% |",
            f"| {_percent(pointing['model'])} | {_percent(pointing['fixed_point'])} | {_percent(pointing['centre'])} "
            f"| {_percent(pointing['uniform'])} |",
            f"| {_percent(words['accuracy'])} | {_percent(words['fixed_point'])} | {_percent(words['centre'])} "
            f"| {_percent(words['uniform'])} |",
            f"| {_percent(details['accuracy'])} | {_percent(details['fixed_point'])} | {_percent(details['centre'])} "
            f"| {_percent(details['uniform'])} |",
            "| " + ", ".join(f"{v:.2f}" for v in faith["equivariance"]["drawn_layer"]) + " |",
            f"| {deletion['model_drop']:.3f} / {deletion['template_drop']:.3f} = {deletion['ratio']:.2f}x |",
            f"({counter['pairs']} pairs)",
            f"| {_percent(counter['phrase_old_loses_new_gains'])}% |",
            f"| {_percent(counter['largest_drop_reads_change'])}% |",
            f"mean map {_percent(counter['template_largest_drop'])}%; chance {_percent(counter['chance'])}%",
            f"| {_percent(dictionary['per_patch'])} / {_percent(dictionary['per_person_patch'])} / "
            f"{_percent(dictionary['per_word'])} |",
            f"{dictionary['specificity']['share_at_least_3x']:.0f}% of {dictionary['specificity']['atoms_shown']} "
            f"(median {_percent(dictionary['specificity']['median_ratio'])}x)",
            f"`detail_weight` {CARD['config']['detail_weight']} was chosen on val",
            f'glasses" finds people with glasses in {_percent(kinds["glasses"]["precision"])}%',
            f"sha256 `{CARD['weights_sha256'][:8]}...`",
        ],
    }


@pytest.mark.parametrize("doc", ["README.md", "docs/MODEL_CARD.md"])
def test_every_quoted_figure_is_the_shipped_cards(doc: str) -> None:
    text = " ".join((REPO / doc).read_text().split())  # one line: a figure may wrap
    missing = [quote for quote in quoted_figures()[doc] if " ".join(quote.split()) not in text]
    assert not missing, f"{doc} does not say, as the card has it: {missing}"


def test_the_checks_catch_a_figure_that_drifted() -> None:
    drifted = MODEL_CARD.replace(_metric("test", "R@1"), "79.99")
    text = " ".join(drifted.split())
    assert any(" ".join(q.split()) not in text for q in quoted_figures()["docs/MODEL_CARD.md"])


def documented_api() -> tuple[dict[str, set[str]], set[str]]:
    """README's endpoint table (endpoint -> the keys its answer may hold) and a result's keys."""
    endpoints = {}
    for name, answers in re.findall(r"^\| `(/\w+)` \| [^|]+ \| ([^|]+) \|$", README, re.MULTILINE):
        endpoints[name] = set(re.findall(r"`(\w+)`", answers))
    line = re.search(r"A result: (.+?)\.\s*`/search` reads", README, re.DOTALL).group(1)
    return endpoints, set(re.findall(r"`(\w+)`", line))


def test_the_documented_api_is_what_the_app_answers(tmp_path: Path) -> None:
    endpoints, result_keys = documented_api()
    served = set(re.findall(r'gr\.api\([^)]*api_name="(\w+)"', (REPO / "app.py").read_text()))
    assert {f"/{name}" for name in served} <= set(endpoints)  # all of them: test_app checks /gradio_api/info
    card = {"vocabulary": ["a", "man", "in", "red", "jacket", "boots"]}
    phrases = ("jacket", "man", "red", "red jacket")
    explorer = tiny_explorer(tmp_path, images=6, card=card, detail_terms=phrases, detail_weight=0.5)
    files = explorer.engine.files()
    answers = {
        "/search": [
            explorer.api_search("a man in a Redjacket and crimson boot", 3),
            explorer.api_search("a man with a zorblax", 3),
        ],
        "/why_not": [explorer.api_why_not("a man in a red coat", files[-1])],
        "/search_by_photo": [explorer.photos.api_search(files[0], 3)],
    }
    for name, bodies in answers.items():
        for body in bodies:
            assert "error" not in body, (name, body)
            assert set(body) <= endpoints[name] and "results" in body or "image" in body, (name, set(body))
    search = answers["/search"]
    required = {"query", "results"}
    assert all(required <= set(body) for body in search)
    assert {"colours_read_as", "words_read_as"} <= set(search[0])  # "crimson", "Redjacket": read as others
    assert "warning" in search[1]  # "zorblax": an unknown word
    results = [r for body in search + answers["/search_by_photo"] for r in body["results"]]
    results += [answers["/why_not"][0]["image"], answers["/why_not"][0]["top"]]
    assert all(set(r) <= result_keys for r in results)
    assert {"rank", "file", "score", "part_similarity", "part_contribution"} <= set.intersection(
        *(set(r) for r in results)
    )
    assert any("details" in r and "cosine" in r for r in results)
    assert endpoints["/why_not"] == set(answers["/why_not"][0])


def test_the_readme_layout_names_every_module() -> None:
    """Each module of a package folder is named in that folder's row of README's layout table."""
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `lgur/(\w+)/` \| (.*) \|$", README, re.M)}
    missing = [
        f"lgur/{folder.name}/{module.name}"
        for folder in sorted((REPO / "lgur").iterdir())
        if folder.is_dir() and not folder.name.startswith("__")
        for module in sorted(folder.glob("*.py"))
        if module.name != "__init__.py" and f"`{module.name}`" not in rows.get(folder.name, "")
    ]
    assert not missing, missing
