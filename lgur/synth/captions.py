"""Captions in the manner of CUHK-PEDES annotators.

Each caption mentions a random subset of what the view shows, in one of several
styles, with synonyms and varying order. A second lexicon (held-out words) and a
second set of styles (held-out phrasings) are used only for the test-paraphrase
split: no training caption ever contains them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .attributes import Attributes
from .render import Camera

# concept -> (training forms, held-out forms)
COLOUR_WORDS = {
    "black": (["black"], ["jet-black", "ebony"]),
    "white": (["white", "off white", "bright white"], ["ivory", "snow-white"]),
    "grey": (["grey", "gray"], ["charcoal", "ash-grey"]),
    "red": (["red", "bright red", "dark red"], ["crimson", "scarlet"]),
    "blue": (["blue", "light blue", "sky blue", "royal blue"], ["azure", "cobalt"]),
    "navy": (["navy", "dark blue", "navy blue"], ["indigo"]),
    "green": (["green", "dark green", "light green"], ["emerald", "olive-green"]),
    "yellow": (["yellow", "bright yellow"], ["mustard", "lemon-coloured"]),
    "pink": (["pink", "light pink", "hot pink"], ["fuchsia", "rose-coloured"]),
    "purple": (["purple", "dark purple"], ["violet", "lilac"]),
    "orange": (["orange", "bright orange"], ["tangerine"]),
    "brown": (["brown", "dark brown", "light brown"], ["chocolate", "chestnut"]),
    "beige": (["beige", "khaki", "cream"], ["camel", "sand-coloured"]),
}
HAIR_COLOUR_WORDS = {
    "black": (["black", "dark"], ["jet-black", "ebony"]),
    "brown": (["brown"], ["chestnut", "chocolate"]),
    "blonde": (["blonde", "blond", "yellow"], ["golden", "flaxen"]),
    "grey": (["grey", "gray", "white"], ["silver", "silvery"]),
    "red": (["red"], ["ginger", "auburn"]),
}
NOUNS = {
    ("top_type", "t-shirt"): (["t-shirt", "t shirt", "crew neck t-shirt", "casual t-shirt"], ["tee"]),
    ("top_type", "shirt"): (["shirt", "button shirt", "collared shirt", "button-down shirt"], ["blouse"]),
    ("top_type", "sweater"): (["sweater", "jumper", "wool sweater", "warm sweater"], ["pullover"]),
    ("top_type", "jacket"): (["jacket", "zip-up jacket", "light jacket", "casual jacket"], ["windbreaker", "anorak"]),
    ("top_type", "coat"): (["coat", "long coat", "winter coat", "knee length coat"], ["overcoat", "trenchcoat"]),
    ("top_type", "hoodie"): (["hoodie", "zip hoodie"], ["hooded sweatshirt"]),
    ("bottom_type", "trousers"): (
        ["trousers", "pants", "long pants", "casual pants", "full length trousers"],
        ["slacks"],
    ),
    ("bottom_type", "jeans"): (["jeans", "jean pants", "denim jeans"], ["denims"]),
    ("bottom_type", "shorts"): (["shorts", "short pants", "knee length shorts"], ["bermudas"]),
    ("bottom_type", "skirt"): (["skirt", "knee length skirt", "flared skirt"], ["miniskirt"]),
    ("shoe_type", "sneakers"): (
        ["sneakers", "shoes", "running shoes", "tennis shoes", "athletic shoes", "sport shoes"],
        ["trainers"],
    ),
    ("shoe_type", "boots"): (["boots", "ankle high boots", "leather boots", "work boots"], ["booties"]),
    ("shoe_type", "sandals"): (["sandals", "open toe sandals", "summer sandals"], ["flip-flops"]),
    ("bag_type", "backpack"): (["backpack", "school bag", "back pack", "bookbag"], ["rucksack", "knapsack"]),
    ("bag_type", "shoulder bag"): (
        ["shoulder bag", "bag over one shoulder", "side bag", "cross body bag", "sling bag"],
        ["satchel", "messenger bag"],
    ),
    ("bag_type", "handbag"): (["handbag", "purse", "hand bag"], ["clutch", "tote"]),
    ("carried_object", "umbrella"): (["umbrella", "closed umbrella", "long umbrella"], ["parasol"]),
    ("carried_object", "phone"): (["phone", "cell phone", "mobile phone", "cellphone"], ["smartphone"]),
    ("carried_object", "bottle"): (["bottle", "water bottle", "drink bottle", "plastic bottle"], ["flask"]),
    ("headwear", "cap"): (["cap", "baseball cap", "peaked cap"], ["visor"]),
    ("headwear", "beanie"): (["beanie", "knit hat", "wool hat", "woolly hat"], ["toque"]),
    ("headwear", "hat"): (["hat", "sun hat", "wide brim hat", "brimmed hat"], ["fedora"]),
    ("glasses", "glasses"): (["glasses", "eyeglasses", "a pair of glasses", "reading glasses"], ["spectacles"]),
    ("glasses", "sunglasses"): (["sunglasses", "dark glasses", "sun glasses"], ["shades"]),
    ("hair_style", "short"): (["short hair", "short cut hair", "a short haircut"], ["cropped hair"]),
    ("hair_style", "long"): (["long hair", "long straight hair", "shoulder length hair"], ["flowing hair"]),
    ("hair_style", "ponytail"): (["a ponytail", "hair in a ponytail"], ["a pigtail"]),
    ("hair_style", "bun"): (["a bun", "hair in a bun"], ["a topknot"]),
    ("hair_style", "bald"): (["a bald head"], ["a shaved head"]),
    ("sleeves", "short"): (["short-sleeved", "short sleeve"], ["half-sleeved"]),
    ("sleeves", "long"): (["long-sleeved", "long sleeve"], ["full-sleeved"]),
    ("top_pattern", "striped"): (["striped"], ["banded"]),
    ("top_pattern", "checked"): (["plaid", "checked"], ["tartan"]),
    ("top_pattern", "logo"): (["with a logo on the front"], ["with an emblem on the chest"]),
    ("skin_tone", "light"): (["fair skin", "light skin"], ["pale complexion"]),
    ("skin_tone", "medium"): (["medium skin"], ["olive complexion"]),
    ("skin_tone", "tan"): (["tanned skin"], ["bronzed complexion"]),
    ("skin_tone", "dark"): (["dark skin"], ["deep complexion"]),
}
PERSON_WORDS = {
    # (gender, age) -> (training forms, held-out forms)
    ("male", "young"): (["young man", "boy", "young guy", "teenage boy", "teenager"], ["youthful fellow", "lad"]),
    ("male", "adult"): (["man", "guy", "male", "dude", "pedestrian man"], ["fellow", "gent"]),
    ("male", "elderly"): (["old man", "elderly man", "grandpa", "older man"], ["senior gentleman", "aged gent"]),
    ("female", "young"): (["young woman", "girl", "young lady", "teenage girl", "teen girl"], ["youthful gal", "lass"]),
    ("female", "adult"): (["woman", "lady", "female", "pedestrian woman"], ["gal", "madam"]),
    ("female", "elderly"): (
        ["old woman", "elderly woman", "old lady", "grandma", "older woman"],
        ["senior madam", "aged lass"],
    ),
}
# Words of the held-out styles; never used by a training style.
HELD_OUT_PHRASINGS = ["is dressed in", "can be seen", "individual", "sporting", "outfit consists of", "paired with"]
_WALKS = {
    "front": [
        "walking towards the camera",
        "coming towards us",
        "walking forward",
        "facing the camera",
        "heading towards the camera",
    ],
    "back": [
        "walking away from the camera",
        "walking away",
        "seen from behind",
        "turned away from the camera",
        "going away",
    ],
    "side": [
        "walking to the side",
        "crossing the street",
        "walking past",
        "shown from the side",
        "walking sideways",
        "in profile",
    ],
}
_HELD_OUT_WALKS = {"front": ["approaching"], "back": ["departing"], "side": ["strolling by"]}
# What the camera shows beside the person: (training forms, held-out forms).
SCENE_WORDS = {
    "street": (["on the street", "on a city street", "on the sidewalk", "near some buildings"], ["along the avenue"]),
    "park": (["in a park", "on a path in the park", "near some trees", "on the grass"], ["through the gardens"]),
    "indoor": (["inside a building", "in a shopping mall", "indoors", "in a hallway"], ["within an arcade"]),
    "plaza": (["in a square", "on a paved plaza", "next to some pillars"], ["across the piazza"]),
}
BUILD_WORDS = {
    "slim": (["slim", "thin", "slender", "skinny"], ["lanky", "willowy"]),
    "heavy": (["stocky", "heavy set", "broad shouldered", "chubby"], ["burly", "portly"]),
}
PHOTO_REMARKS = {
    "blurry": (
        ["The image is blurry.", "The photo is a bit blurry.", "The picture is not very clear."],
        ["The shot is out of focus."],
    ),
    "dark": (["The picture is quite dark.", "The lighting is dim."], ["The scene is murky."]),
    "bright": (["The picture is very bright.", "It is a sunny day."], ["The frame is sunlit."]),
    "pole": (
        ["A pole blocks part of the view.", "Part of the body is hidden behind a pole."],
        ["A lamppost obscures part of the figure."],
    ),
    "low wall": (
        ["The legs are partly hidden by a low wall.", "A low wall covers the lower legs."],
        ["A barrier obscures the shins."],
    ),
}


@dataclass
class Caption:
    text: str
    mentions: list[tuple[str, str]]  # canonical (attribute kind, value) pairs the caption states


def visible_kinds(a: Attributes, view: str) -> set[str]:
    """Attribute kinds a viewer can state from this view."""
    kinds = {
        "gender",
        "age",
        "hair_style",
        "hair_colour",
        "headwear",
        "headwear_colour",
        "top_type",
        "sleeves",
        "top_colour",
        "top_pattern",
        "bottom_type",
        "bottom_colour",
        "shoe_type",
        "shoe_colour",
        "bag_type",
        "bag_colour",
        "carried_object",
        "skin_tone",
    }
    if view == "back":
        kinds -= {"glasses", "skin_tone"}
        if a.top_pattern == "logo":
            kinds.discard("top_pattern")
    else:
        kinds.add("glasses")
        if view == "side" and a.top_pattern == "logo":
            kinds.discard("top_pattern")
    if view == "front" and a.hair_style in ("ponytail", "bun"):
        kinds.discard("hair_style")
    return kinds


def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


class CaptionWriter:
    def __init__(self, rng: np.random.Generator, held_out: bool = False) -> None:
        self.rng = rng
        self.form = 1 if held_out else 0
        self.held_out = held_out

    def _choose(self, options: list[str]) -> str:
        return options[int(self.rng.integers(len(options)))]

    def word(self, table: dict, key) -> str:
        return self._choose(table[key][self.form])

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def write(self, a: Attributes, camera: Camera) -> Caption:
        rng = self.rng
        view = camera.view
        visible = visible_kinds(a, view)
        mentions: list[tuple[str, str]] = []

        def mention(kind: str, p: float) -> bool:
            ok = kind in visible and self.chance(p)
            if ok:
                mentions.append((kind, getattr(a, kind)))
            return ok

        he = "he" if a.gender == "male" else "she"
        his = "his" if a.gender == "male" else "her"
        person = self.word(PERSON_WORDS, (a.gender, a.age)) if mention("gender", 0.9) else "person"
        if person != "person" and a.age != "adult":
            mentions.append(("age", a.age))
        build = "slim" if a.build < 0.93 else "heavy" if a.build > 1.16 else None
        if build and self.chance(0.3):
            person = f"{self.word(BUILD_WORDS, build)} {person}"

        def colour(kind: str, p: float) -> str:
            value = getattr(a, kind)
            return self.word(COLOUR_WORDS, value) + " " if value in COLOUR_WORDS and mention(kind, p) else ""

        # Upper body
        sleeve = self.word(NOUNS, ("sleeves", a.sleeves)) + " " if mention("sleeves", 0.35) else ""
        pattern = ""
        if a.top_pattern != "plain" and mention("top_pattern", 0.7):
            pattern = self.word(NOUNS, ("top_pattern", a.top_pattern))
        top_noun = self.word(NOUNS, ("top_type", a.top_type))
        mention("top_type", 1.0)
        top_col = colour("top_colour", 0.9)
        if pattern.startswith(("with", "with an")):
            top = article(f"{top_col}{sleeve}{top_noun}") + " " + pattern
        else:
            top = article(f"{top_col}{(pattern + ' ') if pattern else ''}{sleeve}{top_noun}")
        # Lower body
        bottom = ""
        if mention("bottom_type", 0.8):
            noun = self.word(NOUNS, ("bottom_type", a.bottom_type))
            col = colour("bottom_colour", 0.85)
            bottom = f"{col}{noun}" if noun.endswith("s") else article(f"{col}{noun}")
        shoes = ""
        if mention("shoe_type", 0.45):
            shoes = colour("shoe_colour", 0.8) + self.word(NOUNS, ("shoe_type", a.shoe_type))
        # Head
        head = []
        if a.hair_style != "bald" and mention("hair_style", 0.5):
            hair = self.word(NOUNS, ("hair_style", a.hair_style))
            if "hair_colour" in visible and a.hair_colour in HAIR_COLOUR_WORDS and self.chance(0.6):
                mentions.append(("hair_colour", a.hair_colour))
                hc = self.word(HAIR_COLOUR_WORDS, a.hair_colour)
                hair = hair.replace(" hair", f" {hc} hair") if " hair" in hair else f"{hc} hair in {hair.split()[-1]}"
            head.append(hair)
        elif a.hair_style == "bald" and mention("hair_style", 0.5):
            head.append(self.word(NOUNS, ("hair_style", "bald")))
        if a.headwear != "none" and mention("headwear", 0.85):
            head.append(article(colour("headwear_colour", 0.7) + self.word(NOUNS, ("headwear", a.headwear))))
        if a.glasses != "none" and mention("glasses", 0.85):
            head.append(self.word(NOUNS, ("glasses", a.glasses)))
        if mention("skin_tone", 0.12):
            head.append(self.word(NOUNS, ("skin_tone", a.skin_tone)))
        # Carried
        carried = []
        if a.bag_type != "none" and mention("bag_type", 0.8 if view != "front" or a.bag_type != "backpack" else 0.5):
            carried.append(article(colour("bag_colour", 0.75) + self.word(NOUNS, ("bag_type", a.bag_type))))
        if a.carried_object != "none" and mention("carried_object", 0.7):
            carried.append(article(self.word(NOUNS, ("carried_object", a.carried_object))))

        walk = self._choose((_HELD_OUT_WALKS if self.held_out else _WALKS)[view])
        if self.chance(0.3):
            walk += " " + self.word(SCENE_WORDS, camera.scene)
        clothes = [top] + [c for c in (bottom, shoes) if c]
        style = int(rng.integers(3)) if self.held_out else int(rng.integers(7))
        text = (self._held_out_style if self.held_out else self._style)(
            style, person, he, his, head, clothes, carried, walk
        )
        remarks = []
        if camera.blur > 0.9:
            remarks.append("blurry")
        if camera.brightness < 0.75:
            remarks.append("dark")
        elif camera.brightness > 1.12:
            remarks.append("bright")
        if camera.occluder != "none":
            remarks.append(camera.occluder)
        for remark in remarks:
            if self.chance(0.25):
                text += " " + self.word(PHOTO_REMARKS, remark)
        text = re.sub(r"\s+", " ", text).strip()
        if ("gender", a.gender) not in mentions and re.search(r"\b(he|she|his|her)\b", text.lower()):
            mentions.append(("gender", a.gender))  # a pronoun states it too
        return Caption(text[0].upper() + text[1:], mentions)

    def _join(self, items: list[str]) -> str:
        if len(items) <= 1:
            return "".join(items)
        return ", ".join(items[:-1]) + " and " + items[-1]

    def _style(self, style, person, he, his, head, clothes, carried, walk) -> str:
        rng = self.rng
        if self.chance(0.4):
            rng.shuffle(clothes)
        clothes_text = self._join(clothes)
        head_text = self._join(head)
        carry_verb = self._choose(["carries", "is carrying", "holds", "has", "is holding", "brings"])
        carry = f" {he.capitalize()} {carry_verb} {self._join(carried)}." if carried else ""
        wear = self._choose(["is wearing", "wears", "has on", "is clad in", "is wearing what looks like"])
        if style == 0:
            lead = article(person) + (f" with {head_text}" if head else "")
            return f"{lead} {wear} {clothes_text}.{carry} {he.capitalize()} is {walk}."
        if style == 1:
            has = f" and has {head_text}" if head else ""
            return f"The {person} is {walk}{has}. {he.capitalize()} {wear} {clothes_text}.{carry}"
        if style == 2:
            parts = [f"{person} {walk}"] + [f"wearing {c}" for c in clothes[:1]] + clothes[1:] + head
            parts += [f"carrying {c}" for c in carried]
            return ", ".join(parts) + "."
        if style == 3:
            head_part = f" {his.capitalize()} look includes {head_text}." if head else ""
            return f"This {person} {wear} {clothes_text}.{head_part}{carry} {he.capitalize()} is {walk}."
        if style == 5:
            head_part = f" {he.capitalize()} has {head_text}." if head else ""
            lead = f"In this image we see {article(person)} {walk}."
            return f"{lead} {he.capitalize()} is in {clothes_text}.{head_part}{carry}"
        if style == 6:
            head_part = f", with {head_text}," if head else ""
            return f"{he.capitalize()} is {article(person)} in {clothes_text}{head_part} {walk}.{carry}"
        lead = f"{article(person)} {walk}, {wear.replace('has on', 'wearing').replace('is wearing', 'wearing')}"
        lead = lead.replace(", wears", ", wearing")
        tail = f" {he.capitalize()} also has {head_text}." if head else ""
        return f"{lead} {clothes_text}.{tail}{carry}"

    def _held_out_style(self, style, person, he, his, head, clothes, carried, walk) -> str:
        clothes_text = self._join(clothes)
        head_text = self._join(head)
        if style == 0:
            extra = f" This individual also has {head_text}." if head else ""
            carry = f" {he.capitalize()} can be seen with {self._join(carried)}." if carried else ""
            return (
                f"The {person} {walk} is dressed in {clothes[0]}"
                + (f" paired with {self._join(clothes[1:])}." if len(clothes) > 1 else ".")
                + extra
                + carry
            )
        if style == 1:
            head_part = f", {head_text}" if head else ""
            carry = f" while toting {self._join(carried)}" if carried else ""
            return f"Sporting {clothes_text}{head_part}, the {person} can be seen {walk}{carry}."
        carry = f"; {he} is toting {self._join(carried)}" if carried else ""
        head_part = f" The individual has {head_text}." if head else ""
        return f"{article(person).capitalize()} {walk}. The outfit consists of {clothes_text}{carry}.{head_part}"


def held_out_words() -> set[str]:
    """Every word the paraphrase lexicon and styles introduce; absent from all training captions."""
    train, held = set(), set()
    for table in (COLOUR_WORDS, HAIR_COLOUR_WORDS, NOUNS, PERSON_WORDS, SCENE_WORDS, BUILD_WORDS, PHOTO_REMARKS):
        for forms_train, forms_held in table.values():
            for f in forms_train:
                train |= set(words(f))
            for f in forms_held:
                held |= set(words(f))
    for forms in _HELD_OUT_WALKS.values():
        for f in forms:
            held |= set(words(f))
    for forms in _WALKS.values():
        for f in forms:
            train |= set(words(f))
    held |= {"individual", "dressed", "sporting", "toting", "outfit", "consists", "paired"}
    return held - train - _FUNCTION_WORDS


_FUNCTION_WORDS = {"a", "an", "the", "of", "on", "in", "with", "and", "by", "part", "is", "to", "hair", "through"}


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:-[a-z]+)*", text.lower())
