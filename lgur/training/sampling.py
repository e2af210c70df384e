"""What a training batch holds: the splits, the order of an epoch's samples, the text each sample
reads (its caption or a crop of it) and the terms its image and text should predict."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..data.dataset import (
    RetrievalSplit,
    TextFeatures,
    caption_crops,
    description_terms,
    frequent_terms,
    frozen_text_features,
    person_terms,
)
from ..data.readers import Record
from ..model.details import phrase_index, phrase_rows
from ..model.lgur import LGUR
from .config import SAMPLES, TrainConfig

CROPS_PER_CAPTION = 2
TERM_MIN_CAPTIONS = 20  # a term predicted must be in at least this many training captions


def split_records(records: list[Record], seed: int) -> dict[str, list[Record]]:
    splits: dict[str, list[Record]] = {}
    for r in records:
        splits.setdefault(r.split, []).append(r)
    if "val" not in splits and "train" in splits:  # e.g. ICFG-PEDES: hold out 5% of training identities
        ids = sorted({r.identity for r in splits["train"]})
        g = torch.Generator().manual_seed(seed)
        held = {ids[i] for i in torch.randperm(len(ids), generator=g)[: max(1, len(ids) // 20)].tolist()}
        splits["val"] = [r for r in splits["train"] if r.identity in held]
        splits["train"] = [r for r in splits["train"] if r.identity not in held]
    return splits


def epoch_order(split: RetrievalSplit, cfg: TrainConfig, labels: Tensor, g: torch.Generator) -> Tensor:
    """Caption indices of one epoch, in batch order (see TrainConfig.samples)."""
    counts = torch.bincount(split.caption_image, minlength=len(split.records))
    starts = torch.cumsum(counts, 0) - counts

    def random_caption(images: Tensor) -> Tensor:  # one random caption of each image
        return starts[images] + (torch.rand(len(images), generator=g) * counts[images]).long()

    if cfg.samples == "captions":
        return torch.randperm(len(split.captions), generator=g)
    if cfg.samples == "images":
        return random_caption(torch.randperm(len(split.records), generator=g))
    if cfg.samples not in SAMPLES:
        raise ValueError(f"unknown sampling {cfg.samples!r}: {', '.join(SAMPLES)}")
    image_label = labels[starts]  # (N_images,) training label of each image
    by_identity = [torch.nonzero(image_label == i).flatten() for i in range(int(image_label.max()) + 1)]
    picks = []
    for i in torch.randperm(len(by_identity), generator=g).tolist():
        images = by_identity[i][torch.randperm(len(by_identity[i]), generator=g)]
        picks.append(images.repeat(cfg.instances)[: cfg.instances])  # fewer images: one repeats
    return random_caption(torch.cat(picks))


@dataclass
class Texts:
    """Every text a training sample may read, as frozen features.

    Text k < captions is caption k; with caption crops, crop j of caption i is text
    captions + i * CROPS_PER_CAPTION + j. With term prediction, `terms[k]` are text k's person terms,
    `identity_terms[label]` those of all of an identity's captions, and `term_index` the predicted
    terms in the classifier's order.
    """

    features: TextFeatures
    captions: int
    crops: bool = False
    terms: list[frozenset[str]] | None = None
    identity_terms: list[frozenset[str]] | None = None
    term_index: dict[str, int] | None = None
    word_rows: Tensor | None = None  # (texts, max_length) phrase_word_rows, with --word-maps


def caption_crop_texts(captions: list[str], seed: int) -> list[str]:
    """CROPS_PER_CAPTION crops of each caption (a few of its clauses), in caption order."""
    rng = np.random.default_rng(seed)
    return [c for caption in captions for c in caption_crops(caption, CROPS_PER_CAPTION, rng)]


def description_term_sets(
    texts: list[str], captions: int, labels: Tensor, identities: int
) -> tuple[list[frozenset[str]], list[frozenset[str]]]:
    """Each text's person terms, and each identity's (over its full captions, texts[:captions])."""
    every = [description_terms(t) for t in texts]
    kept = person_terms(every[:captions], labels.tolist())
    terms = [t & kept for t in every]
    gathered: list[set[str]] = [set() for _ in range(identities)]
    for t, label in zip(terms, labels.tolist()):  # zip stops at the full captions
        gathered[label] |= t
    return terms, [frozenset(t) for t in gathered]


def training_texts(
    cfg: TrainConfig, model: LGUR, split: RetrievalSplit, labels: Tensor, cache: str, bar: bool
) -> Texts:
    encoder, n = model.text_encoder, len(split.captions)
    texts = Texts(frozen_text_features(encoder, split.captions, cache, progress=bar), n)
    all_texts = list(split.captions)
    if cfg.caption_crops > 0 and cfg.crops_from_epoch < cfg.epochs:
        crops = caption_crop_texts(split.captions, cfg.seed)
        texts.features = texts.features.concat(frozen_text_features(encoder, crops, cache, progress=bar))
        texts.crops, all_texts = True, all_texts + crops
    if cfg.term_prediction > 0:
        texts.terms, texts.identity_terms = description_term_sets(all_texts, n, labels, int(labels.max()) + 1)
        frequent = frequent_terms(texts.terms[:n], TERM_MIN_CAPTIONS)
        texts.term_index = {t: i for i, t in enumerate(frequent)}
    if cfg.word_maps > 0:
        texts.word_rows = phrase_word_rows(model, all_texts)
    return texts


def batch_texts(texts: Texts, cfg: TrainConfig, idx: Tensor, epoch: int, draws: torch.Generator) -> Tensor:
    """Which text each sample reads: its caption, or with probability caption_crops a crop of it."""
    if not (texts.crops and epoch >= cfg.crops_from_epoch):
        return idx
    use = torch.rand(len(idx), generator=draws) < cfg.caption_crops
    which = torch.randint(0, CROPS_PER_CAPTION, (len(idx),), generator=draws)
    return torch.where(use, texts.captions + idx * CROPS_PER_CAPTION + which, idx)


def term_targets(texts: Texts, text: Tensor, labels: Tensor) -> tuple[Tensor, Tensor] | None:
    """(B, K) multi-hot targets of term prediction: the images' (their identity's terms), the texts'."""
    index = texts.term_index
    if index is None:
        return None

    def multi_hot(term_sets: list[frozenset[str]]) -> Tensor:
        out = torch.zeros(len(term_sets), len(index))
        for row, terms in enumerate(term_sets):
            out[row, [index[t] for t in terms if t in index]] = 1.0
        return out

    images = multi_hot([texts.identity_terms[i] for i in labels.tolist()])
    return images, multi_hot([texts.terms[t] for t in text.tolist()])


def phrase_word_rows(model: LGUR, texts: list[str]) -> Tensor:
    """(texts, max_length) the detail detector's row of the phrase each token's word ends, -1 elsewhere.

    A word is given a phrase when the text asserts it (phrase_rows) and the word is its last: "black
    shoes" gives "shoes" the row of "black shoes", a word that ends no pair its own ("ponytail").
    Positions are the tokenizer's, as the frozen text features' are.
    """
    terms = model.config.detail_terms
    index = phrase_index(terms)
    out = torch.full((len(texts), model.text_encoder.max_length), -1, dtype=torch.int16)
    for start in range(0, len(texts), 1024):
        chunk = texts[start : start + 1024]
        encoded = model.text_encoder.encode(chunk, truncation=True, max_length=model.text_encoder.max_length)
        for row, text in enumerate(chunk):
            present = {terms[r] for r in phrase_rows(text, index)}
            if not present:
                continue
            word_ids = encoded.word_ids(row)
            previous = None
            for word in sorted({w for w in word_ids if w is not None}):
                begin, end = encoded.word_to_chars(row, word)
                name = text[begin:end].lower()
                pair = f"{previous} {name}" if previous else None
                phrase = pair if pair in present else name if name in present else None
                previous = name if name.isalpha() else None  # no phrase across punctuation
                if phrase is not None:
                    positions = [t for t, w in enumerate(word_ids) if w == word]
                    out[start + row, positions] = index[phrase]
    return out
