"""Detail detection (not in the paper): which caption phrases an image shows, and where.

The retrieval embedding keeps a person's colours and loses small things: on the shipped model a
query naming a bag's or the shoes' colour found them in 18% / 39% of its top 10. The image
encoder still sees them. A detector reads the encoder's tokens (B, N, dim): a small MLP scores
every patch for every phrase the training captions use about people ("black backpack", "white
sneakers", "glasses"), and an image's score for a phrase pools its patches by log-mean-exp
(between the mean and the max: a bag is a few patches). It is trained after the model, on its
frozen encoder, with each image's identity's caption phrases as labels, so it needs captions
only (as CUHK-PEDES has), never attribute labels. With a DetailStage (`train-details --stage`) it
reads its own copy of the trunk's last stage instead, fine-tuned for the phrases: the encoder,
and so the embedding, stays as trained.

At search time the query's phrases that the detector knows add
    detail_weight * coverage * mean over those phrases of lift(phrase, image)
to the cosine similarity, where lift = log p(phrase | image) minus its mean over the training
images (positive: the image shows the phrase more than a typical person; a constant per query,
so it changes the score people read, not the ranking), and coverage is the share of the query's
content words those phrases hold (a query in words the detector never saw is ranked by its
embedding, not by the few phrases it knows); `detail_weight` is chosen on the validation split. The pooling
weights (a softmax over patches) say where each phrase was seen: the app draws them.
"""

from __future__ import annotations

import copy
import math
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.dataset import content_word, description_terms, vocabulary_words
from ..synth.render import BAG, HAIR, LOWER, SHOES, UPPER
from .config import LGURConfig

if TYPE_CHECKING:
    pass


class DetailDetector(nn.Module):
    """(B, N, dim) image tokens -> phrase logits (B, K) and per-patch phrase logits (B, N, K)."""

    def __init__(self, dim: int, terms: int, hidden: int = 256, sharpness: float = 4.0, dropout: float = 0.1) -> None:
        super().__init__()
        self.sharpness = sharpness  # 1: log of the mean of exp (soft mean); large: the max patch
        self.score = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, terms)
        )
        # (K,) mean log p(phrase) over the training images: lift is measured against a typical person
        self.register_buffer("reference", torch.zeros(terms))

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        patches = self.score(tokens)  # (B, N, K)
        r = self.sharpness
        pooled = (torch.logsumexp(r * patches, dim=1) - math.log(patches.shape[1])) / r  # (B, K)
        return pooled, patches

    def lift(self, logits: Tensor) -> Tensor:
        """(B, K) phrase logits -> log p(phrase | image) - its mean over the training images: > 0 where
        the image shows the phrase more than a typical person does. What the detail score adds up."""
        return F.logsigmoid(logits) - self.reference

    def where(self, patches: Tensor) -> Tensor:
        """(B, N, K) patch logits -> (B, N, K) each phrase's pooling weights over the patches (sum to 1)."""
        return torch.softmax(self.sharpness * patches, dim=1)


class DetailStage(nn.Module):
    """The detector's own copy of the image encoder's last trunk stage and token projection:
    (B, C, rows, cols), the input of that stage -> (B, N, dim) tokens. It starts equal to the
    encoder's (the same tokens), and `train-details --stage` fine-tunes it for the phrases while
    the encoder, and so the embedding, stays as trained."""

    def __init__(self, encoder: nn.Module, blocks: int = 1) -> None:
        super().__init__()
        self.blocks = blocks  # how many of the trunk's last block groups it holds
        self.stage = copy.deepcopy(encoder.last_stages(blocks))
        self.proj = copy.deepcopy(encoder.proj)
        self.position = nn.Parameter(encoder.position.detach().clone())

    def forward(self, features: Tensor) -> Tensor:
        x = self.stage(features)  # (B, C', rows, cols)
        return self.proj(x.flatten(2).transpose(1, 2)) + self.position

    def train(self, mode: bool = True) -> DetailStage:
        super().train(mode)
        self.stage.eval()  # batch-norm statistics and drop-path stay the encoder's
        return self


# -- phrases --------------------------------------------------------------------------------


# Words that name one part (garments and accessories of the caption lexicon, held-out forms too).
PART_WORDS = {
    UPPER: "shirt tee sweater jumper jacket coat hoodie blouse pullover windbreaker anorak overcoat trenchcoat "
    "sweatshirt top",
    LOWER: "trousers pants jeans shorts skirt slacks denims bermudas miniskirt",
    SHOES: "sneakers shoes boots sandals trainers booties",
    BAG: "backpack bag handbag purse rucksack knapsack satchel bookbag clutch tote",
    HAIR: "hair ponytail bun haircut cap beanie hat topknot pigtail visor toque fedora",
}
WORD_PART = {word: part for part, words in PART_WORDS.items() for word in words.split()}


# A prototype is named by a phrase when its map puts at least this many times a flat map's weight where
# the detector sees the phrase (chosen on the val split: docs/EXPERIMENTS.md, "Explanations that follow the person").
MIN_READING = 4.0
MIN_PHRASE_PROBABILITY = 0.5  # the phrases the detector sees on the image


def pool_to_grid(maps: np.ndarray, map_grid: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """(P, cells of map_grid) -> (P, cells of grid), summed over the cells each coarse cell holds."""
    (rows, cols), (fine_rows, fine_cols) = grid, map_grid
    r, c = fine_rows // rows, fine_cols // cols
    return maps.reshape(-1, rows, r, cols, c).sum((2, 4)).reshape(len(maps), rows * cols)


def prototype_readings(
    maps: np.ndarray,
    map_grid: tuple[int, int],
    where: np.ndarray,
    probabilities: np.ndarray,
    terms: tuple[str, ...],
    grid: tuple[int, int],
    min_reading: float = MIN_READING,
) -> list[tuple[str, float] | None]:
    """What each prototype reads on *this* image: of the detector's phrases seen on it, the one where the
    prototype's map (P, cells) concentrates most, as (phrase, concentration), else None. Concentration:
    the map's weight where the phrase is seen (its map `where` (N, K)) over a flat map's (1 = no more
    than anywhere). A phrase naming a thing ("black backpack", "backpack") is preferred to one that
    does not ("black"), and two words to one, when both pass."""
    maps = pool_to_grid(maps.astype(np.float32), map_grid, grid)  # the detector's grid
    maps = maps / np.maximum(maps.sum(-1, keepdims=True), 1e-12)
    seen = np.flatnonzero(probabilities >= MIN_PHRASE_PROBABILITY)
    readings: list[tuple[str, float] | None] = []
    if not len(seen):
        return [None] * len(maps)
    spots = where[:, seen].astype(np.float32)
    spots = spots / np.maximum(spots.sum(0, keepdims=True), 1e-12)  # (N, seen) each phrase's map sums to 1
    concentration = maps @ spots * where.shape[0]  # (P, seen)
    # Preferred: a phrase that names a thing ("black backpack", "backpack"), then two words, then any
    things = np.array([terms[k].split()[-1] in WORD_PART for k in seen])
    pairs = np.array([" " in terms[k] for k in seen])
    for row in concentration:
        passing = row >= min_reading
        pool = next(
            (tier for tier in (passing & things & pairs, passing & things, passing & pairs) if tier.any()), passing
        )
        if not pool.any():
            readings.append(None)
            continue
        best = int(np.argmax(np.where(pool, row, -np.inf)))
        readings.append((terms[seen[best]], float(row[best])))
    return readings


@lru_cache(maxsize=8)
def phrase_index(terms: tuple[str, ...]) -> dict[str, int]:
    """phrase -> row of the detector."""
    return {t: i for i, t in enumerate(terms)}


def phrase_rows(text: str, index: dict[str, int]) -> list[int]:
    """The detector's rows of the phrases a text asserts (description_terms), in row order."""
    return sorted(index[t] for t in description_terms(text) if t in index)


def coverage(text: str, phrases: list[str]) -> float:
    """The share of a text's content words that occur in its known phrases: how much of the text the
    detail score speaks for ("a man in a vermilion anorak": man only, 1/3)."""
    words = [w for w in vocabulary_words(text) if content_word(w)]
    known = {w for phrase in phrases for w in phrase.split()}
    return sum(w in known for w in words) / len(words) if words else 0.0


def known_phrases(text: str, terms: tuple[str, ...]) -> tuple[list[int], float]:
    """A text's phrases that the detector knows (their rows) and each one's weight: coverage / their
    count (a mean over the phrases, scaled by how much of the text they cover); 0 for none."""
    rows = phrase_rows(text, phrase_index(terms))
    return rows, coverage(text, [terms[r] for r in rows]) / len(rows) if rows else 0.0


def phrase_weights(texts: list[str], terms: tuple[str, ...]) -> Tensor:
    """(Q, K): each text's known phrases at their weight (known_phrases); zero rows for none."""
    weights = torch.zeros(len(texts), len(terms))
    for row, text in enumerate(texts):
        rows, weight = known_phrases(text, terms)
        weights[row, rows] = weight
    return weights


def detail_scores(config: LGURConfig, texts: list[str], lift: Tensor) -> Tensor:
    """(Q, G) what the detail detector adds to each text's score with each image, from the images'
    lifts (G, K) (evaluate.image_features): detail_weight x phrase_weights @ lift."""
    return config.detail_weight * phrase_weights(texts, config.detail_terms) @ lift.t()
