"""A visitor's query, read once before the model sees it: cleaned, its colour words grounded
(colours.py, "crimson" -> "red"), its unknown words read as the captions' words (reading.py,
"tshirt" -> "t shirt"), and the detail detector's phrases found in it (model.details)."""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..model.config import LGURConfig
from ..model.details import known_phrases
from .colours import ColourGrounding, ColourReading
from .reading import WordForms, WordReading

MAX_QUERY_CHARS = 2000
MAX_RESULTS = 50  # the most results one search returns (app, API and command line)


class QueryError(ValueError):
    """A query that cannot be searched; the message is meant for the user."""


def clean_query(text: str) -> str:
    """Normalise a user's query: NFKC, control characters out, whitespace collapsed, length capped."""
    if not isinstance(text, str):
        raise QueryError("The query must be text.")
    # Cut before normalising too: NFKC can turn one character into 18.
    text = unicodedata.normalize("NFKC", text[: 2 * MAX_QUERY_CHARS])
    text = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in text)
    text = re.sub(r"\s+", " ", text).strip()[:MAX_QUERY_CHARS]
    if not text:
        raise QueryError("Type a description of the person, e.g. 'a woman in a red coat with a black backpack'.")
    return text


def result_count(k: Any) -> int:
    """The number of results asked for, as a whole number from 1 to MAX_RESULTS (else QueryError,
    whose message never repeats the input)."""
    if isinstance(k, bool) or not isinstance(k, int | float) or not math.isfinite(k) or k != int(k):
        raise QueryError(f"The number of results must be a whole number from 1 to {MAX_RESULTS}.")
    if not 1 <= k <= MAX_RESULTS:
        raise QueryError(f"The number of results must be from 1 to {MAX_RESULTS}.")
    return int(k)


def query_details(config: LGURConfig, text: str) -> tuple[list[int], np.ndarray | None]:
    """A query's phrases that a model's detail detector knows (their rows), and the query's detail
    vector (K,): detail_weight x phrase_weights at those rows. (rows, None) when there is nothing to add."""
    if not config.detail_terms:
        return [], None
    rows, weight = known_phrases(text, config.detail_terms)
    if not rows or not config.detail_weight:
        return rows, None
    vector = np.zeros(len(config.detail_terms), np.float32)
    vector[rows] = config.detail_weight * weight
    return rows, vector


@dataclass
class QueryReading:
    text: str  # what the model reads
    colours: list[ColourReading]  # "crimson" read as "red", ...
    words: list[WordReading]  # "tshirt" read as "t shirt", ...


@dataclass
class Query:
    typed: str  # the cleaned query, as typed (what caches are keyed by)
    reading: QueryReading  # what the model reads, and which words were read as which
    phrase_rows: list[int]  # the detail detector's phrases in it (their rows)
    details: np.ndarray | None  # (K,) their weights in the score (None: no detail score)

    @property
    def text(self) -> str:
        return self.reading.text


class QueryReader:
    """A query as the app reads it: colour grounding of words outside `vocabulary`, then word forms
    (WordForms); `phrases`: the captions' two-word phrases (the detail detector's, lgur.model.details)."""

    def __init__(
        self, vocabulary: Iterable[str], phrases: Iterable[str] = (), colours: bool = True, forms: bool = True
    ) -> None:
        vocabulary = list(vocabulary)
        self.grounding = ColourGrounding(vocabulary) if colours and vocabulary else None
        self.forms = WordForms(vocabulary, phrases) if forms and vocabulary else None

    def read(self, text: str) -> QueryReading:
        """How the model reads `text` (already clean): colour words grounded, then word forms."""
        text, colours = self.grounding.ground(text) if self.grounding else (text, [])
        text, words = self.forms.read(text) if self.forms else (text, [])
        return QueryReading(text, colours, words)

    def parse(self, text: str, config: LGURConfig) -> Query:
        """A visitor's query, read once: cleaned (QueryError if there is nothing to search), read, and
        the phrases of `config`'s detail detector found in what the model reads."""
        typed = clean_query(text)
        reading = self.read(typed)
        rows, details = query_details(config, reading.text)
        return Query(typed, reading, rows, details)
