"""Colour grounding (not in the paper): a colour word the model never saw is read as the
nearest colour word it did see.

The frozen text encoder places rare colour words badly ("crimson" lies nearer "brown" than
"red" in MiniLM's features). The XKCD colour survey (949 names) and CSS (148 names), both in
matplotlib, give each name an sRGB value. The training vocabulary's colour words are those
that end a multi-word table name ("brick red", "sky blue"); every table name ending in one is
labelled with it, and an unknown word that is a table name takes the majority label of its
nearest labelled names in CIELAB. Known words are never rewritten; words that modify a colour
("pale", "dark": they begin names of every hue) are left alone; words that name things ("sky",
"leather") never end a name, so they are no target colour.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


def table_colours() -> dict[str, tuple[float, float, float]]:
    """Every colour name of matplotlib's XKCD and CSS tables -> sRGB in [0, 1] (XKCD wins a clash)."""
    from matplotlib.colors import CSS4_COLORS, XKCD_COLORS, to_rgb

    names = {name: to_rgb(value) for name, value in CSS4_COLORS.items()}
    names |= {name.removeprefix("xkcd:"): to_rgb(value) for name, value in XKCD_COLORS.items()}
    return names


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) sRGB in [0, 1] -> (N, 3) CIELAB (D65 white)."""
    rgb = np.asarray(rgb, dtype=np.float64)
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


def colour_label(name: str, targets: frozenset[str]) -> str | None:
    """The target colour a table name ends in: "brick red" -> red; CSS's joined "darkred" -> red."""
    words = name.split()
    if len(words) > 1:
        return words[-1] if words[-1] in targets else None
    for target in sorted(targets, key=len, reverse=True):
        if name.endswith(target) and name != target:
            return target
    return None


def colour_modifiers(table: dict[str, tuple[float, float, float]], spread: float = 30.0) -> frozenset[str]:
    """Words that modify a colour rather than name one: they begin at least three table names whose
    hues disagree ("pale blue", "pale pink": mean distance > `spread` from their mean in CIELAB's
    a*b*), unlike a hue that begins names of its own kind ("olive green", "olive drab")."""
    starts: dict[str, list[tuple[float, float, float]]] = {}
    for name, rgb in table.items():
        if " " in name:
            starts.setdefault(name.split()[0], []).append(rgb)
    found = set()
    for word, colours in starts.items():
        if len(colours) >= 3:
            ab = srgb_to_lab(np.array(colours))[:, 1:]
            if np.linalg.norm(ab - ab.mean(0), axis=1).mean() > spread:
                found.add(word)
    return frozenset(found)


@dataclass(frozen=True)
class ColourReading:
    word: str  # as typed
    colour: str  # the training colour word it is read as


class ColourGrounding:
    """Reads colour words outside `vocabulary` (the training captions' words) as training colours."""

    def __init__(self, vocabulary: Iterable[str], neighbours: int = 5) -> None:
        self.vocabulary = frozenset(w.lower() for w in vocabulary)
        table = table_colours()
        ends = Counter(name.split()[-1] for name in table if " " in name)
        self.targets = frozenset(w for w in self.vocabulary if ends[w] > 0)
        labelled = {}
        for name, rgb in table.items():
            label = name if name in self.targets else colour_label(name, self.targets)
            if label is not None:
                labelled[name] = (label, rgb)
        self._labels = [label for label, _ in labelled.values()]
        self._lab = srgb_to_lab(np.array([rgb for _, rgb in labelled.values()])) if labelled else np.zeros((0, 3))
        modifiers = colour_modifiers(table)
        self._table = {name: rgb for name, rgb in table.items() if " " not in name and name not in modifiers}
        self.neighbours = neighbours
        self._memo: dict[str, str | None] = {}

    def colour_of(self, word: str) -> str | None:
        """The training colour an unknown one-word colour name is read as; None for anything else."""
        word = word.lower()
        if word in self.vocabulary or word not in self._table or not self._labels:
            return None
        if word not in self._memo:
            distance = np.linalg.norm(self._lab - srgb_to_lab(np.array([self._table[word]])), axis=1)
            nearest = np.argsort(distance)[: self.neighbours]
            votes: dict[str, float] = {}
            for i in nearest:  # majority, ties broken by closeness
                votes[self._labels[i]] = votes.get(self._labels[i], 0.0) + 1.0 + 1e-3 / (1.0 + distance[i])
            self._memo[word] = max(votes, key=votes.get)
        return self._memo[word]

    def ground(self, text: str) -> tuple[str, list[ColourReading]]:
        """-> the text with each unknown colour word replaced, and what was read as what."""
        readings: dict[str, ColourReading] = {}

        def replace(match: re.Match[str]) -> str:
            colour = self.colour_of(match.group(0))
            if colour is None:
                return match.group(0)
            readings.setdefault(match.group(0).lower(), ColourReading(match.group(0), colour))
            return colour

        return re.sub(r"[A-Za-z]+", replace, text), list(readings.values())
