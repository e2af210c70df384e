"""Lexical probe: does the frozen text encoder know the paraphrase split's synonyms?

The test-paraphrase split swaps every colour, garment and person word for a held-out
synonym. The trainable text layers only ever see the frozen encoder's token features
of the training words, so a held-out word can only be understood if its features lie
nearest the features of its own concept's training words. This probe measures that:
for every held-out form, is the nearest concept (of the same kind, by the best cosine
to any of its training forms, in the same sentence context) the right one? The same
question for each training form against the *other* training forms is the reference
for how well the encoder separates the concepts at all.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.encoders import TextEncoder
from ..synth.captions import COLOUR_WORDS, HAIR_COLOUR_WORDS, NOUNS, PERSON_WORDS

# Sentence frames that put each kind of phrase where a caption would.
FRAMES = {
    "colour": "a person wearing a {} coat and walking on the street",
    "hair_colour": "a person with {} hair walking on the street",
    "person": "a {} walking on the street",
}
DEFAULT_FRAME = "a person with {} walking on the street"


@dataclass
class Concept:
    kind: str
    name: str
    train: list[str]
    held_out: list[str]


def concepts() -> list[Concept]:
    out = [Concept("colour", c, *forms) for c, forms in COLOUR_WORDS.items()]
    out += [Concept("hair_colour", c, *forms) for c, forms in HAIR_COLOUR_WORDS.items()]
    out += [Concept(kind, value, *forms) for (kind, value), forms in NOUNS.items()]
    out += [Concept("person", f"{g} {a}", *forms) for (g, a), forms in PERSON_WORDS.items()]
    return out


@torch.no_grad()
def phrase_features(encoder: TextEncoder, kind: str, phrases: list[str]) -> torch.Tensor:
    """Mean frozen-encoder feature of each phrase's own tokens, in its kind's frame -> (N, hidden)."""
    frame = FRAMES.get(kind, DEFAULT_FRAME)
    prefix = frame.split("{}")[0]
    start = 1 + len(encoder.tokenizer.tokenize(prefix))  # after [CLS] and the frame's prefix
    ids, mask = encoder.tokenize([frame.format(p) for p in phrases])
    features = encoder.backbone_features(ids, mask)
    rows = []
    for row, phrase in enumerate(phrases):
        n = len(encoder.tokenizer.tokenize(phrase))
        rows.append(features[row, start : start + n].mean(dim=0))
    return F.normalize(torch.stack(rows), dim=-1)


def concept_similarity(
    queries: torch.Tensor, forms: torch.Tensor, owner: torch.Tensor, num_concepts: int, exclude_self: bool = False
) -> torch.Tensor:
    """Best cosine of each query to any form of each concept -> (Q, num_concepts)."""
    sims = queries @ forms.T  # (Q, forms)
    if exclude_self:  # queries are the forms themselves
        sims.fill_diagonal_(-2.0)
    best = torch.full((len(queries), num_concepts), -2.0)
    return best.scatter_reduce(1, owner.expand(len(queries), -1), sims, "amax")


def lexical_probe(encoder: TextEncoder) -> dict:
    """Nearest-concept accuracy of held-out and training forms, per kind and overall."""
    by_kind: dict[str, list[Concept]] = defaultdict(list)
    for concept in concepts():
        by_kind[concept.kind].append(concept)
    report: dict = {"kinds": {}, "examples": []}
    totals = {"held_out": [0, 0], "train": [0, 0], "chance": []}
    for kind, group in by_kind.items():
        if len(group) < 2:
            continue
        train_forms = [(i, f) for i, c in enumerate(group) for f in c.train]
        held_forms = [(i, f) for i, c in enumerate(group) for f in c.held_out]
        train = phrase_features(encoder, kind, [f for _, f in train_forms])
        held = phrase_features(encoder, kind, [f for _, f in held_forms])
        owner = torch.tensor([i for i, _ in train_forms])
        held_sims = concept_similarity(held, train, owner, len(group))
        held_pred = held_sims.argmax(dim=1)
        held_truth = torch.tensor([i for i, _ in held_forms])
        # A training form is scored against the other training forms (its own excluded);
        # concepts with a single training form cannot be tested that way.
        testable = [j for j, (i, _) in enumerate(train_forms) if len(group[i].train) > 1]
        train_pred = concept_similarity(train, train, owner, len(group), exclude_self=True).argmax(dim=1)
        train_hits = sum(int(train_pred[j] == owner[j]) for j in testable)
        held_hits = int((held_pred == held_truth).sum())
        report["kinds"][kind] = {
            "concepts": len(group),
            "held_out_forms": len(held_forms),
            "held_out_accuracy": 100.0 * held_hits / len(held_forms),
            "train_forms_tested": len(testable),
            "train_accuracy": 100.0 * train_hits / max(len(testable), 1),
            "chance": 100.0 / len(group),
        }
        totals["held_out"][0] += held_hits
        totals["held_out"][1] += len(held_forms)
        totals["train"][0] += train_hits
        totals["train"][1] += len(testable)
        totals["chance"] += [100.0 / len(group)] * len(held_forms)
        for j, (i, form) in enumerate(held_forms):
            sims = held_sims[j]
            report["examples"].append(
                {
                    "kind": kind,
                    "held_out": form,
                    "concept": group[i].name,
                    "nearest": group[int(held_pred[j])].name,
                    "cosine_own": round(float(sims[i]), 3),
                    "cosine_nearest": round(float(sims.max()), 3),
                }
            )
    report["held_out_accuracy"] = 100.0 * totals["held_out"][0] / totals["held_out"][1]
    report["train_accuracy"] = 100.0 * totals["train"][0] / max(totals["train"][1], 1)
    report["chance"] = sum(totals["chance"]) / len(totals["chance"])
    report["held_out_forms"] = totals["held_out"][1]
    return report


def format_lexical_probe(report: dict, encoder_name: str, show: int = 10) -> str:
    lines = [f"nearest concept of a form, by the frozen encoder's token features ({encoder_name}):"]
    for kind, r in report["kinds"].items():
        lines.append(
            f"  {kind:15s} {r['concepts']:2d} concepts  held-out forms {r['held_out_accuracy']:5.1f}% "
            f"({r['held_out_forms']})  training forms {r['train_accuracy']:5.1f}% ({r['train_forms_tested']})  "
            f"chance {r['chance']:.1f}%"
        )
    lines.append(
        f"  all: held-out {report['held_out_accuracy']:.1f}% of {report['held_out_forms']} forms, "
        f"training {report['train_accuracy']:.1f}%, chance {report['chance']:.1f}%"
    )
    misses = [e for e in report["examples"] if e["nearest"] != e["concept"]]
    for e in misses[:show]:
        own, best = e["cosine_own"], e["cosine_nearest"]
        lines.append(f"  {e['held_out']!r} ({e['concept']}) -> {e['nearest']}: cosine {best} vs {own} to its own")
    return "\n".join(lines)
