"""Dictionary atoms: how a caption or an image is summarised by DGA's shared dictionary.

A text's atom histogram is the mean over its words of each word's reconstruction weights
(heads and word pieces averaged); an image's is the mean over its patches, weighted by the
foreground weight m where the model learns it (model.ImageExplanation.atom_histogram). Atoms
are compared by weight relative to the average caption's or image's, since every description
uses some atoms heavily. Used by training and export (the card's average), explanation
quality, and the search engine.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..data.dataset import content_word
from ..model.lgur import LGUR

TOP_ATOMS = 20  # "shared atoms": in the top 20 of both the query and the image


def word_spans(word_ids: list[int | None]) -> list[list[int]]:
    """Token positions of each word (a tokenizer's word_ids; None = special token)."""
    spans: list[list[int]] = []
    for position, word in enumerate(word_ids):
        if word is None:
            continue
        if spans and word_ids[spans[-1][-1]] == word:
            spans[-1].append(position)
        else:
            spans.append([position])
    return spans


def word_atom_weights(per_token: np.ndarray, spans: list[list[int]]) -> np.ndarray:
    """(T, atoms) token weights -> (W, atoms): each word's weights, averaged over its pieces."""
    if not spans:
        return per_token[:0]
    return np.stack([per_token[s].mean(0) for s in spans])


@torch.inference_mode()
def encoded_atom_histograms(model: LGUR, encoded: Any) -> np.ndarray:
    """(B, atoms) for a tokenizer batch (TextEncoder.encode, tensors): each caption's atom histogram,
    computed as a query's is (mean over its words)."""
    weights = model.explain_texts(encoded["attention_mask"].bool(), encoded["input_ids"]).dictionary_weights
    if weights is None:
        raise ValueError("this model has no dictionary")
    per_token = weights.mean(1).numpy()  # (B, T, atoms)
    rows = []
    for row in range(len(per_token)):
        words = word_atom_weights(per_token[row], word_spans(encoded.word_ids(row)))
        rows.append(words.mean(0) if len(words) else np.zeros(per_token.shape[-1], np.float32))
    return np.stack(rows)


def caption_atom_histograms(model: LGUR, captions: list[str], batch_size: int = 128) -> np.ndarray:
    """(C, atoms): each caption's atom histogram, computed as a query's is (mean over its words)."""
    encoder = model.text_encoder
    return np.concatenate(
        [
            encoded_atom_histograms(
                model,
                encoder.encode(
                    captions[start : start + batch_size],
                    padding=True,
                    truncation=True,
                    max_length=encoder.max_length,
                    return_tensors="pt",
                ),
            )
            for start in range(0, len(captions), batch_size)
        ]
    )


def text_atom_average(model: LGUR, captions: list[str]) -> dict[str, list[float]] | None:
    """What a checkpoint card stores for relative_weights: the average caption's atom histogram
    (over held-out captions, e.g. the validation split's). None without a dictionary."""
    if model.dga is None or not captions:
        return None
    return {"text": [round(float(x), 7) for x in caption_atom_histograms(model, captions).mean(0)]}


def relative_weights(histogram: np.ndarray, average: np.ndarray | None) -> np.ndarray:
    """Atom weights relative to the average query's or gallery image's (1 = as usual): what sets
    this one apart. The raw weights are dominated by atoms that every description or image
    uses; the relative ones say which atoms are particular to it. None: the raw weights."""
    weights = histogram.astype(np.float32)
    return weights if average is None else weights / np.maximum(average.astype(np.float32), 1e-6)


def top_atoms(histogram: np.ndarray, k: int) -> list[int]:
    return [int(i) for i in np.argsort(-histogram)[:k]]


def shared_atoms(query_histogram: np.ndarray, image_histogram: np.ndarray, k: int = TOP_ATOMS) -> list[int]:
    """Atoms among the top k of both the query and the image."""
    return sorted(set(top_atoms(query_histogram, k)) & set(top_atoms(image_histogram, k)))


def salient_atoms(query_histogram: np.ndarray, image_histogram: np.ndarray, k: int = 10) -> list[int]:
    """The k atoms that matter most to either side: each side's top k/2, then their joint top."""
    atoms = list(dict.fromkeys(top_atoms(query_histogram, k // 2) + top_atoms(image_histogram, k // 2)))
    joint = top_atoms(query_histogram + image_histogram, 2 * k)
    return atoms + [a for a in joint if a not in atoms][: k - len(atoms)]


def describing(words: list[str], terms: tuple[str, ...] = ()) -> np.ndarray:
    """(W,) bool: the words that can name an atom: content words ("red", "backpack", not "off"), and
    where the model has a detail detector, words of its phrases (what captions say of how people look)."""
    known = {w for t in terms for w in t.split()}
    return np.array([content_word(w) and (not known or w in known) for w in words], dtype=bool)


def specificity(table: np.ndarray, atom: int) -> np.ndarray:
    """(W,) each word's weight on the atom over the atom's average weight over the words (table (W, atoms)):
    1 = no more than the average word; what names an atom."""
    return table[:, atom] / max(float(table[:, atom].mean()), 1e-12)
