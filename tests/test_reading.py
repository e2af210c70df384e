"""How a query is read: unknown words in their training form, known words never rewritten."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lgur.search.engine import SearchEngine
from lgur.search.query import QueryReader
from lgur.search.reading import WordForms, WordReading, british_terms
from tests.conftest import tiny_engine

VOCABULARY = (
    "a man woman in with and the some one red black white t shirt coat jeans backpack handbag hand "
    "bag back shoes sneakers glasses boots".split()
)
PHRASES = ["t shirt", "black backpack", "hand bag", "red coat", "white sneakers"]


def test_a_caption_phrase_written_as_one_word_is_split() -> None:
    forms = WordForms(VOCABULARY, PHRASES)
    assert forms.read("a man in a red Tshirt") == ("a man in a red t shirt", [WordReading("Tshirt", "t shirt")])
    assert forms.read("redcoat, whitesneakers")[0] == "red coat, white sneakers"
    # two known words that the captions never use as a phrase are no split: "someone" stays
    assert forms.read("someone in a coat") == ("someone in a coat", [])


def test_two_words_of_one_training_word_are_joined_unless_the_captions_use_them_as_a_phrase() -> None:
    forms = WordForms(VOCABULARY, PHRASES)
    assert forms.read("woman with a back  pack") == ("woman with a backpack", [WordReading("back  pack", "backpack")])
    assert forms.read("woman with a hand bag") == ("woman with a hand bag", [])  # "hand bag" is a caption phrase
    assert forms.read("with a black bag")[1] == []  # "blackbag" is no word


def test_singular_and_plural_forms() -> None:
    forms = WordForms(VOCABULARY, PHRASES)
    assert forms.read("white sneaker, black boot") == (
        "white sneakers, black boots",
        [WordReading("sneaker", "sneakers"), WordReading("boot", "boots")],
    )
    assert forms.read("a glass")[0] == "a glasses"  # the only known form
    assert forms.read("two coatss")[1] == []  # no single known form


def test_known_words_and_words_with_no_form_are_never_rewritten() -> None:
    forms = WordForms(VOCABULARY, PHRASES)
    text = "A man in white sneakers, a tee and jeans with a backpack"
    assert forms.read(text) == (text, [])


def test_british_words_are_read_as_the_captions_american_ones() -> None:
    table = british_terms(frozenset([*VOCABULARY, "person"]))
    # breame: "trainers": "training shoes, athletic shoes. (US: sneakers)."; "rucksack": "a backpack."
    assert table["trainers"] == "sneakers" and table["rucksack"] == "backpack"
    assert "pillock" not in table  # "(slang, derogatory) foolish person": "foolish" is no training word
    assert all(word not in VOCABULARY and word != "person" for word in table)  # a known word is never rewritten
    forms = WordForms(VOCABULARY, PHRASES)
    assert forms.read("a man in white Trainers with a rucksack") == (
        "a man in white sneakers with a backpack",
        [WordReading("Trainers", "sneakers"), WordReading("rucksack", "backpack")],
    )
    assert forms.read("a black trainer")[0] == "a black sneakers"  # its plural is the British word
    assert WordForms([*VOCABULARY, "trainers"]).read("white trainers")[1] == []  # a training word stays


def test_each_rewrite_is_reported_once() -> None:
    forms = WordForms(VOCABULARY, PHRASES)
    text, readings = forms.read("tshirt, Tshirt and a back pack")
    assert text == "t shirt, t shirt and a backpack"
    assert readings == [WordReading("tshirt", "t shirt"), WordReading("back pack", "backpack")]


def test_the_reader_grounds_colours_then_reads_word_forms() -> None:
    reading = QueryReader(VOCABULARY, PHRASES).read("a man in a crimson tshirt")
    assert reading.text == "a man in a red t shirt"
    assert [(r.word, r.colour) for r in reading.colours] == [("crimson", "red")]
    assert reading.words == [WordReading("tshirt", "t shirt")]
    assert QueryReader(VOCABULARY, PHRASES, colours=False, forms=False).read("crimson tshirt").text == "crimson tshirt"
    assert QueryReader([], PHRASES).read("crimson tshirt").text == "crimson tshirt"  # no vocabulary: as typed


def test_search_reads_and_reports_word_forms(tmp_path: Path) -> None:
    engine = tiny_engine(tmp_path, {"vocabulary": VOCABULARY})
    response = engine.search("a woman with a back pack and white sneaker", k=3)
    assert response.query.text == "a woman with a backpack and white sneakers"
    assert response.word_note == "back pack -> backpack, sneaker -> sneakers" and response.warning is None
    assert response.to_json()["words_read_as"] == {"back pack": "backpack", "sneaker": "sneakers"}
    same = engine.search("a woman with a backpack and white sneakers", k=3)
    assert [r.file for r in same.results] == [r.file for r in response.results]
    np.testing.assert_allclose([r.score for r in same.results], [r.score for r in response.results], rtol=1e-5)
    assert same.word_note is None and "words_read_as" not in same.to_json()
    plain = SearchEngine(engine.model, engine.index, engine.card, word_forms=False)
    assert plain.search("a woman with white sneaker", k=3).unknown_words == ["sneaker"]


def test_garments_and_people_are_read_through_wordnet_only_when_their_first_senses_agree() -> None:
    forms = WordForms([*VOCABULARY, "sweater", "trousers", "person"], PHRASES)
    # the same sense: "knapsack, backpack, back pack, ..."; a kind of it: raincoat < coat, cardigan < sweater
    assert forms.read("a man with a knapsack in a Raincoat") == (
        "a man with a backpack in a coat",
        [WordReading("knapsack", "backpack"), WordReading("Raincoat", "coat")],
    )
    assert forms.form_of("cardigans") == "sweater" and forms.form_of("gentlemen") == "man"
    assert forms.form_of("sweatshirt") == "sweater"  # a pullover, which is a sweater
    assert forms.form_of("slacks") == "trousers"  # WordNet's lemma is "trouser"; the captions' plural is taken
    assert forms.form_of("spectacles") == "glasses"  # marked "plural" by WordNet: only slurs and the like are refused
    assert forms.form_of("women") == "woman"  # an inflection of a training word
    assert forms.form_of("plating") is None  # a kind of "coating", which is not what "coat" first means
    assert forms.form_of("tee") is None  # first a golf tee
    assert forms.form_of("prostitute") is None and forms.form_of("whore") is None  # never read into "woman"
    assert forms.form_of("kitten") is None  # an animal: neither a garment, a thing carried nor a person
