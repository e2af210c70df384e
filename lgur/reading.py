"""How a query is read before the model sees it (not in the paper): words the model never saw
are read as training words where that is unambiguous. Colour names go through colour grounding
(lgur.colours, "crimson" -> "red"); other words through their written form, below.

Word forms: a query word the model never saw is read in the form the training captions use.

People type "tshirt" for "t-shirt", "pony tail" for "ponytail", "sneaker" for "sneakers",
"trainers" for "sneakers". The frozen text encoder splits such words into pieces it places badly,
and the detail detector (lgur.details) matches phrases by their words, so it finds nothing in
them. Four readings, each to words inside the training vocabulary:

- split: one unknown word that is a two-word caption phrase written as one ("tshirt" -> "t shirt",
  "shoulderbag" -> "shoulder bag"); the phrase must be one the captions use, so "someone" is
  not read as "some one";
- join: two adjacent content words whose concatenation is a training word, and which the
  captions do not use as a phrase of their own ("pony tail" -> "ponytail"; the
  default world's captions say "back pack" too, so that stays);
- number: an unknown word whose singular or plural is a training word ("sneaker" -> "sneakers");
- British English: an unknown word that the `breame` package (Wikipedia's list of British-only
  terms, Apache-2.0) lists, read as the American term its entry gives ("trainers": "... (US:
  sneakers)") or else as its definition ("rucksack": "a backpack"), only when every word of that
  is a training word, so "a stupid person" is never read as "person" (british_terms).

No synonym is guessed beyond that table: a word with none of these ("tee") stays as typed and is
flagged as unknown, as before.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .colours import ColourGrounding, ColourReading
from .data.dataset import content_word

ARTICLES = frozenset({"a", "an", "the"})


def british_terms(vocabulary: frozenset[str]) -> dict[str, str]:
    """British-only words (breame's table) outside `vocabulary` -> the captions' words for the same
    thing: the American term the entry gives, else the first clause of its definition, each taken
    only when all its words are training words and the last is a content word."""
    from breame.data.british_terms_constants import BRITISH_ENGLISH_ONLY_TERMS

    table = {}
    for term, definition in BRITISH_ENGLISH_ONLY_TERMS.items():
        term = term.lower()
        if not term.isalpha() or term in vocabulary:
            continue
        american = re.search(r"\(US:?\s*([^)]*)\)", definition)  # "(US: sneakers)"
        readings = [american.group(1)] if american else []
        readings.append(re.sub(r"\([^)]*\)", "", definition))  # "(informal) man, fellow" -> " man, fellow"
        for reading in readings:
            first = re.split(r"[.;,:]| or ", reading)[0].lower()
            words = [w for w in re.findall(r"[a-z]+", first) if w not in ARTICLES]
            if 0 < len(words) <= 3 and all(w in vocabulary for w in words) and content_word(words[-1]):
                table[term] = " ".join(words)
                break
    return table


@dataclass(frozen=True)
class WordReading:
    typed: str  # as typed: "tshirt", "pony tail"
    read_as: str  # the training form: "t shirt", "ponytail"


class WordForms:
    """Reads unknown words in their training form, given the training vocabulary (its words) and
    the two-word phrases its captions use (e.g. the detail detector's phrases)."""

    def __init__(self, vocabulary: Iterable[str], phrases: Iterable[str] = ()) -> None:
        self.vocabulary = frozenset(w.lower() for w in vocabulary)
        self.phrases = frozenset(p.lower() for p in phrases if len(p.split()) == 2)
        self.british = british_terms(self.vocabulary)  # "trainers" -> "sneakers"
        # "tshirt" -> "t shirt": each two-word phrase of known words, by its joined spelling
        self.joined_phrases = {
            a + b: f"{a} {b}"
            for a, b in (p.split() for p in self.phrases)
            if a in self.vocabulary and b in self.vocabulary and a + b not in self.vocabulary
        }

    def form_of(self, word: str) -> str | None:
        """The training form of one unknown word (split, singular/plural, British term); None if it has none."""
        word = word.lower()
        if word in self.vocabulary or not content_word(word):
            return None
        if word in self.joined_phrases:
            return self.joined_phrases[word]
        numbers = [word + "s", word + "es"]
        if word.endswith("es"):
            numbers.append(word[:-2])
        if word.endswith("s"):
            numbers.append(word[:-1])
        known = [w for w in numbers if w in self.vocabulary and content_word(w)]
        if len(known) == 1:
            return known[0]
        british = {self.british[w] for w in [word, *numbers] if w in self.british}  # "trainer" too
        return british.pop() if len(british) == 1 else None

    def read(self, text: str) -> tuple[str, list[WordReading]]:
        """-> the text with each unknown word in its training form, and what was read as what."""
        readings: dict[str, WordReading] = {}
        pieces = re.split(r"([A-Za-z]+)", text)  # [gap, word, gap, word, ..., gap]
        out = [pieces[0]]
        i = 1
        while i < len(pieces):
            word = pieces[i]
            if i + 2 < len(pieces) and pieces[i + 1].isspace() and self._joins(word, pieces[i + 2]):
                typed, form = f"{word}{pieces[i + 1]}{pieces[i + 2]}", (word + pieces[i + 2]).lower()
                out += [form, pieces[i + 3]]
                readings.setdefault(typed.lower(), WordReading(typed, form))
                i += 4
                continue
            form = self.form_of(word)
            if form is not None:
                readings.setdefault(word.lower(), WordReading(word, form))
            out += [form or word, pieces[i + 1]]
            i += 2
        return "".join(out), list(readings.values())

    def _joins(self, first: str, second: str) -> bool:
        """Read two words as one: their concatenation is a training word, and the captions do not
        use them as a phrase of their own ("hand bag" -> "handbag"; "black bag" stays)."""
        a, b = first.lower(), second.lower()
        return content_word(a) and content_word(b) and a + b in self.vocabulary and f"{a} {b}" not in self.phrases


@dataclass
class QueryReading:
    text: str  # what the model reads
    colours: list[ColourReading]  # "crimson" read as "red", ...
    words: list[WordReading]  # "tshirt" read as "t shirt", ...


class QueryReader:
    """A query as the app reads it: colour grounding of words outside `vocabulary`, then word forms
    (WordForms); `phrases`: the captions' two-word phrases (the detail detector's, lgur.details)."""

    def __init__(
        self, vocabulary: Iterable[str], phrases: Iterable[str] = (), colours: bool = True, forms: bool = True
    ) -> None:
        vocabulary = list(vocabulary)
        self.grounding = ColourGrounding(vocabulary) if colours and vocabulary else None
        self.forms = WordForms(vocabulary, phrases) if forms and vocabulary else None

    def read(self, text: str) -> QueryReading:
        text, colours = self.grounding.ground(text) if self.grounding else (text, [])
        text, words = self.forms.read(text) if self.forms else (text, [])
        return QueryReading(text, colours, words)
