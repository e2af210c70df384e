"""Short queries as people type them into a search box, scored against the gallery's attributes.

`python -m lgur query-bench` draws queries of 1 to 4 attributes from the gallery itself
(a random person, a random subset of what they wear), writes them the way people type
("guy in red jacket", "lady with a black backpack", "blue jeans white sneakers") with
everyday words, and scores the model's top 10 by whether each result has every attribute
the query names (from the gallery manifest). Chance is the share of the gallery that has
them. Two query sets with different phrasings exist: `default` and `check`; a model is
tuned on neither.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..model.details import detail_scores
from ..search.query import QueryReader

# Everyday words per attribute value. A query names (kind, value) pairs; ANY matches every
# value but "none" (e.g. "with a bag").
ANY = "*"
COLOUR_FORMS = {
    "black": ["black"],
    "white": ["white"],
    "grey": ["grey", "gray"],
    "red": ["red"],
    "blue": ["blue", "light blue"],
    "navy": ["navy", "dark blue"],
    "green": ["green"],
    "yellow": ["yellow"],
    "pink": ["pink"],
    "purple": ["purple"],
    "orange": ["orange"],
    "brown": ["brown"],
    "beige": ["beige", "khaki"],
}
HAIR_COLOUR_FORMS = {
    "black": ["black", "dark"],
    "brown": ["brown"],
    "blonde": ["blonde", "blond"],
    "grey": ["grey", "gray", "white"],
    "red": ["red", "ginger"],
}
TYPE_FORMS = {
    "top_type": {
        "t-shirt": ["t-shirt", "tshirt", "t shirt", "tee"],
        "shirt": ["shirt", "button up shirt"],
        "sweater": ["sweater", "jumper"],
        "jacket": ["jacket"],
        "coat": ["coat"],
        "hoodie": ["hoodie"],
    },
    "bottom_type": {
        "trousers": ["pants", "trousers"],
        "jeans": ["jeans"],
        "shorts": ["shorts"],
        "skirt": ["skirt"],
    },
    "shoe_type": {"sneakers": ["sneakers", "trainers"], "boots": ["boots"], "sandals": ["sandals"]},
    "bag_type": {
        "backpack": ["backpack"],
        "shoulder bag": ["shoulder bag", "side bag"],
        "handbag": ["handbag", "purse"],
        ANY: ["bag"],
    },
    "headwear": {"cap": ["cap", "baseball cap"], "beanie": ["beanie"], "hat": ["hat"]},
    "glasses": {"glasses": ["glasses"], "sunglasses": ["sunglasses"]},
    "carried_object": {"umbrella": ["umbrella"], "phone": ["phone"], "bottle": ["water bottle", "bottle"]},
    "hair_style": {
        "long": ["long hair"],
        "short": ["short hair"],
        "ponytail": ["ponytail"],
        "bun": ["bun", "hair bun"],
        "bald": ["bald head", "shaved head"],
    },
}
GENERIC = {"top_type": ["top"], "shoe_type": ["shoes"]}  # a colour with no garment type
PERSON_FORMS = {
    # set name -> gender -> forms
    "default": {"male": ["man", "guy", "male"], "female": ["woman", "lady", "female"], None: ["person", "someone"]},
    "check": {"male": ["dude", "gentleman", "boy"], "female": ["girl", "gal", "women"], None: ["somebody", "anyone"]},
}
# Phrasings per set. Worn things follow "in"/"wearing"; bags, objects and hair follow "with".
TEMPLATES = {
    "default": {
        "worn": ["{person} in {worn}", "{person} wearing {worn}", "{worn}"],
        "held": ["{person} with {held}", "{held}"],
        "both": ["{person} in {worn} with {held}", "{worn}, {held}", "{person} wearing {worn} and {held}"],
        "and": [" and ", ", ", " "],
    },
    "check": {
        "worn": ["{worn} {person}", "looking for {person} in {worn}", "{person} dressed in {worn}"],
        "held": ["{person} w/ {held}", "{held}, {person}"],
        "both": ["{person}, {worn}, {held}", "{worn} {person} with {held}", "{person} in {worn} + {held}"],
        "and": [" + ", " with ", " & "],
    },
}
WORN = {"top_type", "bottom_type", "shoe_type", "headwear", "glasses"}
COLOUR_KIND = {
    "top_type": "top_colour",
    "bottom_type": "bottom_colour",
    "shoe_type": "shoe_colour",
    "bag_type": "bag_colour",
    "headwear": "headwear_colour",
}


@dataclass
class Query:
    text: str
    attributes: dict[str, str]  # kind -> value (or ANY)


def matches(attributes: dict[str, Any], wanted: dict[str, str]) -> bool:
    """Does a person with these attributes have everything the query names?"""
    for kind, value in wanted.items():
        have = attributes.get(kind)
        if value == ANY:
            if have in (None, "none"):
                return False
        elif have != value:
            return False
    return True


def _phrase(person: dict[str, Any], kind: str, rng: np.random.Generator) -> tuple[str, dict[str, str]] | None:
    """One garment/accessory phrase this person fits, e.g. 'red jacket', with what it names."""
    value = person.get(kind)
    if value in (None, "none"):
        return None
    forms = TYPE_FORMS[kind]
    named: dict[str, str] = {}
    use_generic = kind in GENERIC and rng.random() < 0.2
    if kind == "bag_type" and rng.random() < 0.2:
        noun, named[kind] = str(rng.choice(forms[ANY])), ANY
    elif use_generic:
        noun = str(rng.choice(GENERIC[kind]))
    else:
        noun, named[kind] = str(rng.choice(forms[value])), value
    colour_kind = COLOUR_KIND.get(kind)
    if kind == "hair_style":
        colour = person.get("hair_colour")
        if value != "bald" and colour not in (None, "none") and rng.random() < 0.6:
            named["hair_colour"] = colour
            noun = f"{rng.choice(HAIR_COLOUR_FORMS[colour])} {noun}"
        return noun, named
    if colour_kind and (use_generic or rng.random() < 0.8):
        colour = person[colour_kind]
        named[colour_kind] = colour
        noun = f"{rng.choice(COLOUR_FORMS[colour])} {noun}"
    if kind in ("bag_type", "carried_object", "headwear") and rng.random() < 0.5:
        noun = ("an " if noun[0] in "aeiou" else "a ") + noun
    return noun, named


def make_queries(people: list[dict[str, Any]], count: int = 200, seed: int = 0, style: str = "default") -> list[Query]:
    """`count` distinct queries of 1-4 attributes, each fitting at least one person of `people`."""
    if style not in TEMPLATES:
        raise ValueError(f"unknown query set {style!r}; choose from {sorted(TEMPLATES)}")
    rng = np.random.default_rng([seed, sorted(TEMPLATES).index(style)])  # each set draws its own people
    kinds = ["top_type", "bottom_type", "shoe_type", "bag_type", "headwear", "glasses", "carried_object", "hair_style"]
    weights = np.array([6, 5, 2, 3, 1, 1, 1, 1.5])
    queries: dict[str, Query] = {}
    attempts = 0
    while len(queries) < count and attempts < count * 100:
        attempts += 1
        person = people[int(rng.integers(len(people)))]
        phrases, chosen = [], []
        for kind in rng.choice(kinds, size=int(rng.integers(1, 3)), replace=False, p=weights / weights.sum()):
            phrase = _phrase(person, str(kind), rng)
            if phrase:
                phrases.append(phrase)
                chosen.append(str(kind))
        if not phrases:
            continue
        named: dict[str, str] = {}
        for _, n in phrases:
            named |= n
        gender = person["gender"] if rng.random() < 0.6 else None
        if gender:
            named["gender"] = gender
        if not 1 <= len(named) <= 4:
            continue
        t = TEMPLATES[style]
        worn = str(rng.choice(t["and"])).join(p for (p, _), k in zip(phrases, chosen) if k in WORN)
        held = " and ".join(p for (p, _), k in zip(phrases, chosen) if k not in WORN)
        shape = "both" if worn and held else "worn" if worn else "held"
        template = str(rng.choice(t[shape]))
        if "{person}" not in template and gender:
            template = t[shape][0]
        person_word = str(rng.choice(PERSON_FORMS[style][gender]))
        text = template.format(person=person_word, worn=worn, held=held)
        if text not in queries:
            queries[text] = Query(text, named)
    return list(queries.values())


def score(rankings: np.ndarray, people: list[dict[str, Any]], queries: list[Query], k: int = 10) -> dict[str, Any]:
    """rankings: (Q, >=k) gallery rows, best first. Attribute precision@k, top-1 correctness, chance,
    and the ceiling: the precision@k of a perfect ranking (below 100% where fewer than k images fit)."""
    rows = []
    for q, ranking in zip(queries, rankings):
        hit = np.array([matches(people[i], q.attributes) for i in ranking[:k]])
        fits = sum(matches(p, q.attributes) for p in people)
        # ceiling: a query that only 3 gallery images fit scores at most 3/k, whatever the model
        rows.append(
            {
                "query": q.text,
                "attributes": q.attributes,
                "precision": float(hit.mean()),
                "top1": bool(hit[0]),
                "chance": fits / len(people),
                "ceiling": min(fits, k) / k,
            }
        )
    by_size: dict[int, list[float]] = {}
    for r in rows:
        by_size.setdefault(len(r["attributes"]), []).append(r["precision"])
    # Each named attribute on its own: which kinds the model finds, and which it does not.
    by_kind: dict[str, list[tuple[float, float]]] = {}
    share: dict[tuple[str, str], float] = {}  # chance of one attribute, counted once per value
    for q, ranking in zip(queries, rankings):
        for kind, value in q.attributes.items():
            one = {kind: value}
            if (kind, value) not in share:
                share[kind, value] = float(np.mean([matches(p, one) for p in people]))
            hit = np.mean([matches(people[i], one) for i in ranking[:k]])
            by_kind.setdefault(kind, []).append((hit, share[kind, value]))
    return {
        "queries": len(rows),
        f"precision@{k}": 100 * float(np.mean([r["precision"] for r in rows])),
        "top1": 100 * float(np.mean([r["top1"] for r in rows])),
        "chance": 100 * float(np.mean([r["chance"] for r in rows])),
        "ceiling": 100 * float(np.mean([r["ceiling"] for r in rows])),
        "by_attribute_count": {n: 100 * float(np.mean(v)) for n, v in sorted(by_size.items())},
        "by_kind": {
            kind: {
                "precision": 100 * float(np.mean([h for h, _ in v])),
                "chance": 100 * float(np.mean([c for _, c in v])),
                "queries": len(v),
            }
            for kind, v in sorted(by_kind.items())
        },
        "rows": rows,
    }


def embedding_probe(
    embeddings: Tensor, people: list[dict[str, Any]], identities: list[int], kinds: list[str]
) -> dict[str, dict[str, float]]:
    """What the gallery embeddings encode, per attribute kind: the balanced accuracy (mean recall
    over values) of a nearest-class-mean classifier fitted on two thirds of the identities and
    tested on the rest, next to chance (1 / number of values).

    Labels are used only to measure; an attribute the embedding does not carry cannot be found
    by any query, however it is phrased. Class means cannot overfit a small gallery as a trained
    classifier on 1,536 dimensions would.
    """
    rng = np.random.default_rng(0)
    unique = np.unique(identities)
    held = set(rng.choice(unique, len(unique) // 3, replace=False).tolist())
    test = torch.tensor([i in held for i in identities])
    x = F.normalize(embeddings.float(), dim=1)
    result = {}
    for kind in kinds:
        labels = [str(p.get(kind)) for p in people]
        values = sorted(set(labels))
        y = torch.tensor([values.index(v) for v in labels])
        fitted = [v for v in range(len(values)) if bool((y[~test] == v).any())]
        means = F.normalize(torch.stack([x[~test][y[~test] == v].mean(0) for v in fitted]), dim=1)
        predicted = torch.tensor(fitted)[(x[test] @ means.T).argmax(1)]
        recalls = [
            float((predicted[y[test] == v] == v).float().mean())
            for v in range(len(values))
            if bool((y[test] == v).any())
        ]
        result[kind] = {
            "balanced_accuracy": 100 * float(np.mean(recalls)),
            "chance": 100 / len(recalls),
            "values": len(recalls),
        }
    return result


def binding_probe(model: Any, texts: list[str], seed: int = 0) -> dict[str, Any]:
    """Does the query embedding see which thing a colour belongs to? For each kind of swap
    (two colours traded between things, one colour changed, one garment changed; see
    `swapped_caption`), how far a query's embedding moves when its words are swapped, as a share
    of how far it is from an unrelated query: sensitivity = (1 - cos(q, swapped)) / (1 - cos(q, other)).
    0: the swap is invisible to the model; 1: as different as another query.
    """
    from ..data.dataset import SWAP_KINDS, swapped_caption

    def embed(batch: list[str]) -> Tensor:
        ids, mask = model.tokenize(batch)
        return model.embed_texts(ids, mask)

    original = embed(texts)
    other = original.roll(1, dims=0)  # each query against the next one
    unrelated = (original * other).sum(1)
    result: dict[str, Any] = {"unrelated_cosine": float(unrelated.mean())}
    for kind in SWAP_KINDS:
        rng = np.random.default_rng(seed)
        swapped = [swapped_caption(t, rng, (kind,)) for t in texts]
        rows = [i for i, t in enumerate(swapped) if t is not None]
        if not rows:
            continue
        cosine = (original[rows] * embed([swapped[i] for i in rows])).sum(1)
        sensitivity = (1 - cosine) / (1 - unrelated[rows]).clamp(min=1e-6)
        result[kind] = {"queries": len(rows), "cosine": float(cosine.mean()), "sensitivity": float(sensitivity.mean())}
    return result


# Descriptions of four things, in two orders (so a thing's position in the sentence is not
# what the probe measures); {0}-{3}: the colours of the top, bottom, shoes and bag.
_THING_TEMPLATES = (
    "a man wearing a {0} jacket, {1} jeans and {2} sneakers. he carries a {3} backpack.",
    "a woman with a {3} handbag, {2} boots, a {1} skirt and a {0} sweater.",
)
THINGS = ("top", "bottom", "shoes", "bag")
_PROBE_COLOURS = ("black", "white", "grey", "red", "blue", "green", "yellow", "pink", "purple", "brown")


def colour_sensitivity(model: Any, count: int = 100, seed: int = 0) -> dict[str, float]:
    """Which thing's colour the text embedding sees: for each of top, bottom, shoes and bag, how
    far a description's embedding moves when that thing's colour alone changes, as a share of how
    far it is from a description with every colour different (0: that colour is ignored)."""
    rng = np.random.default_rng(seed)
    base, changed = [], {thing: [] for thing in THINGS}
    for i in range(count):
        template = _THING_TEMPLATES[i % len(_THING_TEMPLATES)]
        colours = [str(c) for c in rng.choice(_PROBE_COLOURS, size=4, replace=False)]
        base.append(template.format(*colours))
        for k, thing in enumerate(THINGS):
            other = [c for c in _PROBE_COLOURS if c not in colours]
            changed[thing].append(
                template.format(*colours[:k], other[int(rng.integers(len(other)))], *colours[k + 1 :])
            )

    def embed(batch: list[str]) -> Tensor:
        ids, mask = model.tokenize(batch)
        return model.embed_texts(ids, mask)

    original = embed(base)
    # the next description of the same template: every colour differs or moves
    unrelated = 1 - (original * original.roll(len(_THING_TEMPLATES), dims=0)).sum(1)
    return {
        thing: float(((1 - (original * embed(changed[thing])).sum(1)) / unrelated.clamp(min=1e-6)).mean())
        for thing in THINGS
    }


@torch.inference_mode()
def run_query_bench(
    checkpoint: str | Path,
    gallery: str | Path,
    style: str = "default",
    count: int = 200,
    seed: int = 0,
    probe: bool = False,
    details: bool = True,
    reading: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint, embed the gallery's images, rank each query's top 10 and score them.

    reading: read each query as the app does (lgur.search.reading: unknown colour words and word forms,
    from the card's training vocabulary); False: the model reads the queries as typed.

    details: rank as the app does, by cosine plus the detail score where the model has a detail
    detector (lgur.model.details); False: by the embeddings' cosine alone.

    probe: also measure which attribute kinds the gallery embeddings carry (embedding_probe), and
    how far the query embeddings move when colours or garments are swapped (binding_probe), and
    when one thing's colour changes (colour_sensitivity).
    """
    from ..files import read_image
    from ..model.checkpoint import load_checkpoint
    from .evaluate import image_features

    gallery = Path(gallery)
    manifest = json.loads((gallery / "manifest.json").read_text())["images"]
    people = [m["attributes"] for m in manifest]
    queries = make_queries(people, count, seed, style)
    model, card = load_checkpoint(checkpoint)
    size = model.config.image.img_size
    images = torch.from_numpy(np.stack([read_image(gallery / m["file"], size) for m in manifest]))
    gallery_embeddings, lift = image_features(model, images)
    reader = QueryReader(card.get("vocabulary", []), model.config.detail_terms, colours=reading, forms=reading)
    texts = [reader.read(q.text).text for q in queries]
    ids, mask = model.tokenize(texts)
    text_embeddings = model.embed_texts(ids, mask)
    scores = text_embeddings @ gallery_embeddings.t()
    details = details and model.details is not None and model.config.detail_weight > 0
    if details:
        scores = scores + detail_scores(model.config, texts, lift)
    rankings = scores.argsort(dim=1, descending=True)[:, :10].numpy()
    result = score(rankings, people, queries) | {"details": details, "read_as_the_app_does": reading}
    for row, ranking, text in zip(result["rows"], rankings, texts):
        row["top10"] = [manifest[i]["file"] for i in ranking]
        if text != row["query"]:
            row["read_as"] = text
    if probe:
        kinds = sorted({kind for q in queries for kind in q.attributes})
        identities = [int(m["identity"]) for m in manifest]
        result["embedding_probe"] = embedding_probe(gallery_embeddings, people, identities, kinds)
        result["binding_probe"] = binding_probe(model, [q.text for q in queries], seed)
        result["colour_sensitivity"] = colour_sensitivity(model, seed=seed)
    return {"checkpoint": str(checkpoint), "gallery": str(gallery), "set": style, "seed": seed} | result


def format_query_bench(result: dict[str, Any], show: int = 8) -> str:
    lines = [
        f"query set {result['set']!r} (seed {result['seed']}): {result['queries']} queries, "
        f"gallery {result['gallery']}",
        f"attribute precision@10 {result['precision@10']:.1f}%   top-1 correct {result['top1']:.1f}%   "
        f"chance {result['chance']:.1f}%   best possible {result['ceiling']:.1f}%",
        "by number of attributes named: "
        + ", ".join(f"{n}: {p:.1f}%" for n, p in result["by_attribute_count"].items()),
        "each named attribute alone, share of the top 10 that has it (chance):",
    ]
    probe = result.get("embedding_probe", {})
    for kind, v in result.get("by_kind", {}).items():
        line = f"  {kind:16s} {v['precision']:5.1f}% ({v['chance']:4.1f}%)  {v['queries']:3d} queries"
        if kind in probe:
            p = probe[kind]
            line += f"   embeddings' class-mean probe {p['balanced_accuracy']:5.1f}% (chance {p['chance']:.1f}%)"
        lines.append(line)
    binding = result.get("binding_probe")
    if binding:
        lines.append(
            "swapped words: how far a query's embedding moves (0 = unseen, 1 = as far as an unrelated query; "
            f"unrelated queries' cosine {binding['unrelated_cosine']:.2f}):"
        )
        names = {"trade": "two colours traded", "colour": "one colour changed", "garment": "one garment changed"}
        for kind, name in names.items():
            if kind in binding:
                v = binding[kind]
                lines.append(f"  {name:20s} {v['sensitivity']:.2f}  (cosine {v['cosine']:.3f}, {v['queries']} queries)")
    sensitivity = result.get("colour_sensitivity")
    if sensitivity:
        lines.append(
            "one thing's colour changed in a four-thing description (0 = unseen, 1 = as far as every colour changed): "
            + ", ".join(f"{thing} {v:.2f}" for thing, v in sensitivity.items())
        )
    worst = sorted(result["rows"], key=lambda r: r["precision"])[:show]
    if worst:
        lines.append("hardest queries:")
        lines += [f"  {r['precision'] * 10:.0f}/10  {r['query']!r}  {r['attributes']}" for r in worst]
    return "\n".join(lines)
