"""Identity attributes of the synthetic pedestrian world.

Each identity draws a fixed set of attributes once; every image of it shows them
(as far as the view allows). Priors are skewed the way street clothing is: dark
and neutral colours dominate, so many people look alike, as in real data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import numpy as np

# Named colours: RGB used for drawing; the caption words live in captions.py.
COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (32, 32, 36),
    "white": (236, 236, 232),
    "grey": (128, 130, 134),
    "red": (196, 36, 40),
    "blue": (44, 86, 190),
    "navy": (30, 40, 88),
    "green": (46, 140, 64),
    "yellow": (236, 200, 40),
    "pink": (236, 140, 176),
    "purple": (120, 60, 150),
    "orange": (236, 124, 32),
    "brown": (120, 76, 40),
    "beige": (214, 196, 156),
}
HAIR_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (24, 20, 20),
    "brown": (96, 60, 32),
    "blonde": (222, 190, 110),
    "grey": (160, 160, 160),
    "red": (150, 60, 30),
}
SKIN_TONES: dict[str, tuple[int, int, int]] = {
    "light": (246, 214, 190),
    "medium": (222, 178, 140),
    "tan": (184, 132, 92),
    "dark": (112, 74, 50),
}

# Priors: (value, weight). Weights need not sum to one.
CLOTHING_COLOUR_PRIOR = [
    ("black", 22), ("white", 14), ("grey", 10), ("blue", 10), ("navy", 6), ("red", 8), ("green", 5),
    ("yellow", 4), ("pink", 5), ("purple", 3), ("orange", 3), ("brown", 5), ("beige", 5),
]  # fmt: skip
BOTTOM_COLOUR_PRIOR = [
    ("black", 30), ("blue", 18), ("navy", 8), ("grey", 12), ("white", 6), ("brown", 6), ("beige", 8),
    ("red", 3), ("green", 3), ("pink", 2), ("purple", 1), ("yellow", 1), ("orange", 1),
]  # fmt: skip
SHOE_COLOUR_PRIOR = [("black", 35), ("white", 30), ("grey", 8), ("brown", 12), ("red", 5), ("blue", 5), ("pink", 3),
                     ("beige", 2)]  # fmt: skip


@dataclass(frozen=True)
class Attributes:
    gender: str  # presentation: "male" | "female"
    age: str  # "young" | "adult" | "elderly"
    skin_tone: str
    hair_style: str  # "short" | "long" | "ponytail" | "bun" | "bald"
    hair_colour: str
    headwear: str  # "none" | "cap" | "beanie" | "hat"
    headwear_colour: str
    glasses: str  # "none" | "glasses" | "sunglasses"
    top_type: str  # "t-shirt" | "shirt" | "sweater" | "jacket" | "coat" | "hoodie"
    sleeves: str  # "short" | "long"
    top_colour: str
    top_pattern: str  # "plain" | "striped" | "checked" | "logo"
    bottom_type: str  # "trousers" | "jeans" | "shorts" | "skirt"
    bottom_colour: str
    shoe_type: str  # "sneakers" | "boots" | "sandals"
    shoe_colour: str
    bag_type: str  # "none" | "backpack" | "shoulder bag" | "handbag"
    bag_colour: str
    carried_object: str  # "none" | "umbrella" | "phone" | "bottle"
    # Body proportions (identity-level, not captioned)
    height: float
    build: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Attributes:
        return cls(**{f.name: data[f.name] for f in fields(cls)})


# Attribute kinds that captions mention and the ambiguity report checks.
CAPTIONED_KINDS = [
    "gender", "age", "hair_style", "hair_colour", "headwear", "glasses", "top_type", "sleeves", "top_colour",
    "top_pattern", "bottom_type", "bottom_colour", "shoe_type", "shoe_colour", "bag_type", "bag_colour",
    "carried_object", "skin_tone", "headwear_colour",
]  # fmt: skip


def _pick(rng: np.random.Generator, prior: list[tuple[str, float]]) -> str:
    values, weights = zip(*prior)
    p = np.asarray(weights, dtype=float)
    return values[int(rng.choice(len(values), p=p / p.sum()))]


def sample_attributes(rng: np.random.Generator) -> Attributes:
    gender = _pick(rng, [("male", 1), ("female", 1)])
    female = gender == "female"
    age = _pick(rng, [("young", 4), ("adult", 5), ("elderly", 1)])
    hair_style = _pick(
        rng,
        [("long", 5), ("ponytail", 3), ("bun", 2), ("short", 2)]
        if female
        else [("short", 8), ("bald", 1 if age != "young" else 0.2), ("long", 0.6), ("ponytail", 0.3)],
    )
    hair_colour = _pick(
        rng, [("grey", 1)] if age == "elderly" else [("black", 6), ("brown", 4), ("blonde", 1.5), ("red", 0.5)]
    )
    headwear = _pick(rng, [("none", 16), ("cap", 3), ("beanie", 1.5), ("hat", 1.5)])
    glasses = _pick(rng, [("none", 12), ("glasses", 3 if age != "young" else 2), ("sunglasses", 1.5)])
    top_type = _pick(rng, [("t-shirt", 6), ("shirt", 3), ("sweater", 2), ("jacket", 3), ("coat", 2), ("hoodie", 2)])
    sleeves = "long" if top_type in ("sweater", "jacket", "coat", "hoodie") else _pick(rng, [("short", 3), ("long", 1)])
    top_pattern = _pick(rng, [("plain", 10), ("striped", 2), ("checked", 1.5 if top_type == "shirt" else 0.3),
                              ("logo", 2 if top_type in ("t-shirt", "hoodie") else 0)])  # fmt: skip
    bottom_type = _pick(rng, [("trousers", 4), ("jeans", 4), ("shorts", 1.5), ("skirt", 3 if female else 0)])
    bottom_colour = "blue" if bottom_type == "jeans" and rng.random() < 0.7 else _pick(rng, BOTTOM_COLOUR_PRIOR)
    shoe_type = _pick(
        rng, [("sneakers", 6), ("boots", 2), ("sandals", 1 if bottom_type in ("shorts", "skirt") else 0.2)]
    )
    bag_type = _pick(rng, [("none", 5), ("backpack", 4), ("shoulder bag", 2.5), ("handbag", 2 if female else 0.3)])
    carried = _pick(rng, [("none", 10), ("umbrella", 1), ("phone", 1.5), ("bottle", 1)])
    return Attributes(
        gender=gender,
        age=age,
        skin_tone=_pick(rng, [("light", 4), ("medium", 3), ("tan", 2), ("dark", 2)]),
        hair_style=hair_style,
        hair_colour=hair_colour if hair_style != "bald" else "none",
        headwear=headwear,
        headwear_colour=_pick(rng, CLOTHING_COLOUR_PRIOR) if headwear != "none" else "none",
        glasses=glasses,
        top_type=top_type,
        sleeves=sleeves,
        top_colour=_pick(rng, CLOTHING_COLOUR_PRIOR),
        top_pattern=top_pattern,
        bottom_type=bottom_type,
        bottom_colour=bottom_colour,
        shoe_type=shoe_type,
        shoe_colour=_pick(rng, SHOE_COLOUR_PRIOR),
        bag_type=bag_type,
        bag_colour=_pick(rng, CLOTHING_COLOUR_PRIOR) if bag_type != "none" else "none",
        carried_object=carried,
        height=float(rng.uniform(0.9, 1.0) if age != "young" or rng.random() < 0.8 else rng.uniform(0.82, 0.9)),
        build=float(rng.uniform(0.85, 1.2) + (0.08 if not female else 0.0)),
    )


# -- counterfactuals: the same person with one attribute changed ------------------------------------

COUNTERFACTUAL_KINDS = ("bag_colour", "top_colour", "glasses", "headwear", "bag_type")
# Colours far enough apart that a viewer names them differently (no navy for black, no beige for white).
DISTINCT_COLOURS = ("black", "white", "red", "blue", "green", "yellow", "pink", "purple", "orange")


def counterfactual(a: Attributes, kind: str, rng: np.random.Generator) -> Attributes | None:
    """The same identity with `kind` changed and everything else kept; None where the change does
    not apply (a bag colour for someone who carries no bag)."""
    if kind in ("bag_colour", "top_colour"):
        if kind == "bag_colour" and a.bag_type == "none":
            return None
        current = getattr(a, kind)
        return replace(a, **{kind: str(rng.choice([c for c in DISTINCT_COLOURS if c != current]))})
    if kind == "glasses":
        return replace(a, glasses=str(rng.choice(["glasses", "sunglasses"])) if a.glasses == "none" else "none")
    if kind == "headwear":
        if a.headwear != "none":
            return replace(a, headwear="none", headwear_colour="none")
        return replace(a, headwear=str(rng.choice(["cap", "beanie", "hat"])),
                       headwear_colour=str(rng.choice(DISTINCT_COLOURS)))  # fmt: skip
    if kind == "bag_type":
        if a.bag_type == "none":
            return replace(a, bag_type="backpack", bag_colour=str(rng.choice(DISTINCT_COLOURS)))
        others = [t for t in ("backpack", "shoulder bag", "handbag") if t != a.bag_type]
        return replace(a, bag_type=str(rng.choice(others)))
    raise ValueError(f"counterfactual kinds are {COUNTERFACTUAL_KINDS}, not {kind!r}")
