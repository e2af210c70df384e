"""What the model is weak at, said where it matters.

A checkpoint's card holds its query-bench figures per attribute kind (the share of the top 10
that has an attribute when a short query names it, and the share by chance). When a visitor's
query names a kind the model rarely gets right (glasses, headwear, shoe or bag colour for the
CPU models), the page says so beside the results, with the measured figure.
"""

from __future__ import annotations

import re
from typing import Any

# Words that name a kind in a query; a colour word just before a shoe or bag word names its colour.
KIND_WORDS = {
    "glasses": {"glasses", "sunglasses", "eyeglasses", "spectacles", "shades"},
    "headwear": {"hat", "hats", "cap", "caps", "beanie", "beanies", "beret"},
    "shoe": {"shoe", "shoes", "sneakers", "sneaker", "boots", "boot", "sandals", "trainers", "heels"},
    "bag": {"bag", "bags", "backpack", "handbag", "purse", "rucksack", "satchel", "tote", "knapsack"},
    "carried_object": {"umbrella", "phone", "cellphone", "bottle"},
}
KIND_NAMES = {
    "glasses": "glasses",
    "headwear": "headwear",
    "shoe_colour": "shoe colour",
    "shoe_type": "shoe type",
    "bag_colour": "bag colour",
    "bag_type": "bag type",
    "carried_object": "carried objects",
}
WEAK_BELOW = 40.0  # % of the top 10 with the attribute: below this, the model "rarely" gets it right


def named_kinds(text: str, colours: frozenset[str]) -> list[str]:
    """The attribute kinds (of KIND_NAMES) a query names, in order."""
    words = re.findall(r"[a-z]+", text.lower())
    kinds = []
    for i, word in enumerate(words):
        coloured = i > 0 and words[i - 1] in colours
        if word in KIND_WORDS["glasses"]:
            kinds.append("glasses")
        elif word in KIND_WORDS["headwear"]:
            kinds.append("headwear")
        elif word in KIND_WORDS["shoe"]:
            kinds.append("shoe_colour" if coloured else "shoe_type")
        elif word in KIND_WORDS["bag"]:
            kinds.append("bag_colour" if coloured else "bag_type")
        elif word in KIND_WORDS["carried_object"]:
            kinds.append("carried_object")
    return list(dict.fromkeys(kinds))


def weak_spots(text: str, by_kind: dict[str, Any], colours: frozenset[str]) -> list[str]:
    """One line per kind the query names that the model rarely gets right (by_kind: the card's
    query_bench figures per kind), with the measured figure."""
    notes = []
    for kind in named_kinds(text, colours):
        figure = by_kind.get(kind)
        if figure and figure["precision"] < WEAK_BELOW:
            notes.append(
                f"This model is weak at {KIND_NAMES[kind]}: for short queries naming it, {figure['precision']:.0f}% "
                f"of its top 10 had it ({figure['chance']:.0f}% by chance)."
            )
    return notes
