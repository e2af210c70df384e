"""Training and evaluation data: images in memory, frozen text features cached once.

The frozen text encoder's outputs never change during training, so they are
computed once per (encoder fingerprint, caption list) and stored as safetensors;
CPU training then spends its time on the trainable parts only.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import Tensor

from ..files import atomic_output, read_image
from .readers import Record

log = logging.getLogger(__name__)


IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what ImageNet-trained trunks expect
IMAGENET_STD = (0.229, 0.224, 0.225)


def vocabulary_words(text: str) -> list[str]:
    """A text's words as the vocabulary counts them: lower case, letters only."""
    return re.findall(r"[a-z]+", text.lower())


def caption_vocabulary(captions: list[str], min_count: int = 2) -> list[str]:
    """The words used at least `min_count` times: what a model trained on these captions has seen,
    so a query without any of them can be flagged."""
    counts: dict[str, int] = {}
    for caption in captions:
        for word in vocabulary_words(caption):
            counts[word] = counts.get(word, 0) + 1
    return sorted(w for w, n in counts.items() if n >= min_count)


def normalize(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float, ImageNet-normalised (what the encoders expect)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


# Where the synthetic world's camera puts a person: about 0.87 of the image height, centred at 0.535.
WORLD_PERSON_HEIGHT, WORLD_PERSON_CENTRE = 0.87, 0.535


def reframe(
    images: Tensor,
    generator: torch.Generator,
    share: float = 1.0,
    height: tuple[float, float] = (0.55, 1.0),
    offset: float = 0.15,
) -> Tensor:
    """Frame a share of uint8 images (B, 3, H, W) as a person detector frames its crops: the person
    `height` of the image (at random in that range), moved up to `offset` of the size each way; the
    image's border rows and columns fill what the frame adds, and what leaves it is cut off."""
    b = images.shape[0]
    chosen = torch.rand(b, generator=generator) < share
    zoom = torch.empty(b).uniform_(height[0], height[1], generator=generator) / WORLD_PERSON_HEIGHT
    dy = torch.empty(b).uniform_(-offset, offset, generator=generator)
    dx = torch.empty(b).uniform_(-offset, offset, generator=generator)
    if not chosen.any():
        return images
    idx = chosen.nonzero().squeeze(1)
    z, ty, tx = zoom[idx], 2 * dy[idx], 2 * dx[idx]  # normalised coordinates span 2
    centre = 2 * WORLD_PERSON_CENTRE - 1
    # output y = z * (input y - centre) + ty: the person's centre lands at the frame's centre plus the offset
    theta = torch.zeros(len(idx), 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / z
    theta[:, 0, 2] = -tx / z
    theta[:, 1, 2] = centre - ty / z
    picked = images[idx].float()
    grid = F.affine_grid(theta, list(picked.shape), align_corners=False)
    moved = F.grid_sample(picked, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = images.clone()
    out[idx] = moved.round().clamp(0, 255).to(images.dtype)
    return out


def augment(images: Tensor, pad: int, generator: torch.Generator, framing: float = 0.0) -> Tensor:
    """The paper's augmentation: zero-pad, random crop back to size, random horizontal flip; before it,
    with framing > 0, that share of the images reframed as a detector frames people (reframe)."""
    if framing > 0:
        images = reframe(images, generator, framing)
    b, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    out = torch.empty_like(images)
    for i in range(b):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def load_images(records: list[Record], size: tuple[int, int], progress: bool = False) -> Tensor:
    """Decode each distinct image once: uint8 (N, 3, H, W) in record order."""
    from tqdm import tqdm

    arrays = [read_image(r.image_path, size) for r in tqdm(records, desc="images", disable=not progress)]
    return torch.from_numpy(np.stack(arrays)) if arrays else torch.empty(0, 3, *size, dtype=torch.uint8)


@dataclass
class TextFeatures:
    """Frozen-encoder outputs of many captions, stored ragged: features[offsets[i]:offsets[i]+lengths[i]]."""

    features: Tensor  # (total_tokens, hidden) float16
    offsets: Tensor  # (N,)
    lengths: Tensor  # (N,)

    def batch(self, indices: Tensor | list[int]) -> tuple[Tensor, Tensor]:
        """-> padded features (B, T, hidden) float32 and mask (B, T)."""
        idx = torch.as_tensor(indices)
        lengths = self.lengths[idx]
        t = int(lengths.max())
        out = torch.zeros(len(idx), t, self.features.shape[1])
        for row, i in enumerate(idx.tolist()):
            start, n = int(self.offsets[i]), int(self.lengths[i])
            out[row, :n] = self.features[start : start + n].float()
        mask = torch.arange(t)[None, :] < lengths[:, None]
        return out, mask

    def concat(self, other: TextFeatures) -> TextFeatures:
        """Both caption lists in one: other's captions are numbered after self's."""
        return TextFeatures(
            torch.cat([self.features, other.features]),
            torch.cat([self.offsets, other.offsets + len(self.features)]),
            torch.cat([self.lengths, other.lengths]),
        )


_CLAUSE = re.compile(r"[.,;!]|\band\b|\bwith\b|\bwhile\b", re.IGNORECASE)


def caption_crops(caption: str, count: int, rng: np.random.Generator, max_clauses: int = 3) -> list[str]:
    """`count` shorter descriptions that are still true: 1 to max_clauses of the caption's clauses, in order.

    Training on them teaches the model that a description naming a few things (as people type
    into a search box) matches the images that have those things. A caption of one clause is its own crop.
    """
    clauses = [c.strip() for c in _CLAUSE.split(caption) if c and c.strip()]
    if len(clauses) < 2:
        return [caption] * count
    crops = []
    for _ in range(count):
        k = int(rng.integers(1, min(max_clauses, len(clauses) - 1) + 1))
        keep = np.sort(rng.choice(len(clauses), size=k, replace=False))
        crops.append(", ".join(clauses[i] for i in keep))
    return crops


# Words that say nothing about how a person looks: articles, prepositions, the verbs captions
# use to attach things ("wearing", "carries"). Pronouns stay: "he" / "she" name the gender.
_FUNCTION_WORDS = frozenset(
    "a an the this that these those is are was be been being it its of in on at to from for by with and or "
    "also some any who which while as into onto over under up down out off very there here we us see seen "
    "can what looks look like wearing wears wear worn dressed clad has have having carrying carries carry "
    "holding holds hold brings bringing includes include".split()
)


def content_word(word: str) -> bool:
    """Does the word say something about how a person looks ("red", "coat", "she"), not "a" or "with"?"""
    return word.lower() not in _FUNCTION_WORDS


def description_terms(text: str) -> frozenset[str]:
    """What a description asserts, as words: its content words and each adjacent pair of them.

    Pairs keep a colour on its thing ("red jacket" is not "red jeans"), so "red jacket, blue
    jeans" is not contained in the terms of "blue jacket, red jeans". Plain English, no labels.
    """
    terms: set[str] = set()
    for clause in re.split(r"[.,;:!?]", text):  # no pair across a comma: "cap, she" is not a thing
        words = vocabulary_words(clause)
        content = [w not in _FUNCTION_WORDS for w in words]
        terms |= {w for w, c in zip(words, content) if c}
        terms |= {f"{a} {b}" for a, b, ca, cb in zip(words, words[1:], content, content[1:]) if ca and cb}
    return frozenset(terms)


def person_terms(terms: list[frozenset[str]], identities: list[int], min_excess: float = 0.1) -> frozenset[str]:
    """The terms that describe the person rather than the photo, learned from captions and identities.

    terms: description_terms of each caption; identities: whom each caption describes.
    A term about the person recurs across the captions of one identity more often than it occurs
    for a random identity ("red jacket", "she", "glasses"); one about the photo or the writer
    ("walking", "camera", "trees", "sideways") recurs no more than chance. Kept: terms whose share
    of captions with the term repeated in another caption of the same identity exceeds the share of
    identities using the term by at least `min_excess`.
    """
    by_identity: dict[int, Counter[str]] = {}
    for caption_terms, identity in zip(terms, identities, strict=True):
        by_identity.setdefault(identity, Counter()).update(caption_terms)
    uses: Counter[str] = Counter()  # captions with the term
    repeated: Counter[str] = Counter()  # of those, captions whose identity has the term in another caption too
    people: Counter[str] = Counter()  # identities with the term
    for counts in by_identity.values():
        uses.update(counts)
        repeated.update({t: n for t, n in counts.items() if n > 1})
        people.update(counts.keys())
    total = max(len(by_identity), 1)
    return frozenset(t for t in uses if repeated[t] / uses[t] - people[t] / total >= min_excess)


def frequent_terms(terms: list[frozenset[str]], min_count: int) -> list[str]:
    """The terms in at least `min_count` of these term sets (one per caption), sorted."""
    counts = Counter(t for caption in terms for t in caption)
    return sorted(t for t, n in counts.items() if n >= min_count)


# Words for swapped-attribute negatives: plain English, usable on any pedestrian dataset.
# Each colour maps to a concept, so that synonyms ("grey"/"gray") never count as a change.
_COLOURS = {
    "black": "black",
    "white": "white",
    "grey": "grey",
    "gray": "grey",
    "silver": "grey",
    "red": "red",
    "maroon": "red",
    "blue": "blue",
    "navy": "navy",
    "green": "green",
    "yellow": "yellow",
    "pink": "pink",
    "purple": "purple",
    "orange": "orange",
    "brown": "brown",
    "beige": "beige",
    "khaki": "beige",
    "cream": "beige",
    "tan": "beige",
}
_GARMENTS = (
    ("t-shirt", "shirt", "sweater", "jacket", "coat", "hoodie", "blouse", "dress", "vest"),
    ("trousers", "jeans", "shorts", "skirt", "leggings"),
    ("sneakers", "boots", "sandals", "heels"),
    ("backpack", "handbag", "suitcase"),
)
_GARMENT_GROUP = {g: i for i, group in enumerate(_GARMENTS) for g in group}
_COLOUR_NAMES = "|".join(_COLOURS)
_COLOUR_RUN = re.compile(rf"\b(?:{_COLOUR_NAMES})(?:\s+(?:{_COLOUR_NAMES}))*\b", re.IGNORECASE)  # "navy blue": one
_GARMENT_NAMES = "|".join(g for g in _GARMENT_GROUP if g != "t-shirt")
_GARMENT_WORD = re.compile(rf"\b(?:t[- ]shirt|{_GARMENT_NAMES})\b", re.IGNORECASE)


def _colour_concept(run: str) -> str:
    return _COLOURS[run.split()[-1].lower()]  # "navy blue" is blue-ish navy: its last word decides


SWAP_KINDS = ("trade", "colour", "garment")


def swapped_caption(caption: str, rng: np.random.Generator, kinds: tuple[str, ...] = SWAP_KINDS) -> str | None:
    """A caption that is false for its image but uses the same words: a hard negative.

    One of: two colours of different things trade places ("red jacket, blue jeans" ->
    "blue jacket, red jeans"), one colour becomes another, or one garment becomes another
    of its kind (jacket -> hoodie). Such negatives teach which thing a colour belongs to,
    which in-batch negatives rarely test. `kinds` limits the choice; None when none applies.
    """
    colours = list(_COLOUR_RUN.finditer(caption))
    garments = list(_GARMENT_WORD.finditer(caption))
    pairs = [
        (a, b)
        for i, a in enumerate(colours)
        for b in colours[i + 1 :]
        if _colour_concept(a.group()) != _colour_concept(b.group())
    ]
    possible = {"trade": bool(pairs), "colour": bool(colours), "garment": bool(garments)}
    usable = [k for k in kinds if possible[k]]
    if not usable:
        return None
    kind = usable[int(rng.integers(len(usable)))]
    if kind == "trade":
        a, b = pairs[int(rng.integers(len(pairs)))]
        edits = [(a, b.group()), (b, a.group())]
    elif kind == "colour":
        run = colours[int(rng.integers(len(colours)))]
        options = sorted({c for c, concept in _COLOURS.items() if concept != _colour_concept(run.group())})
        edits = [(run, options[int(rng.integers(len(options)))])]
    else:
        word = garments[int(rng.integers(len(garments)))]
        own = word.group().lower().replace(" ", "-")
        options = [g for g in _GARMENTS[_GARMENT_GROUP[own]] if g != own]
        edits = [(word, options[int(rng.integers(len(options)))])]
    out, last = [], 0
    for match, text in sorted(edits, key=lambda e: e[0].start()):
        out += [caption[last : match.start()], text]
        last = match.end()
    return "".join(out) + caption[last:]


def _captions_key(captions: list[str], fingerprint: str, max_length: int) -> str:
    digest = hashlib.sha256(f"{fingerprint}|{max_length}".encode())
    for c in captions:
        digest.update(c.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:20]


@torch.inference_mode()
def frozen_text_features(
    text_encoder, captions: list[str], cache_dir: str | Path | None, batch_size: int = 128, progress: bool = False
) -> TextFeatures:
    """Run the frozen encoder over every caption once (or read the cached result)."""
    key = _captions_key(captions, text_encoder.fingerprint, text_encoder.max_length)
    path = Path(cache_dir) / f"text_features_{key}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        stored = load_file(str(path))
        return TextFeatures(stored["features"], stored["offsets"], stored["lengths"])
    from tqdm import tqdm

    chunks, lengths = [], []
    order = np.argsort([len(c) for c in captions])  # similar lengths together: less padding
    by_index: dict[int, Tensor] = {}
    for start in tqdm(range(0, len(captions), batch_size), desc="text features", disable=not progress):
        idx = order[start : start + batch_size]
        ids, mask = text_encoder.tokenize([captions[i] for i in idx])
        device = next(text_encoder.backbone.parameters()).device
        feats = text_encoder.backbone_features(ids.to(device), mask.to(device)).half().cpu()
        for row, i in enumerate(idx):
            by_index[int(i)] = feats[row, : int(mask[row].sum())]
    for i in range(len(captions)):
        chunks.append(by_index[i])
        lengths.append(len(by_index[i]))
    lengths_t = torch.tensor(lengths, dtype=torch.long)
    offsets = torch.cumsum(lengths_t, 0) - lengths_t
    result = TextFeatures(torch.cat(chunks).contiguous(), offsets, lengths_t)
    if path is not None:
        with atomic_output(path) as tmp:
            tmp.write_bytes(save({"features": result.features, "offsets": offsets, "lengths": lengths_t}))
    return result


@dataclass
class RetrievalSplit:
    """One split ready for retrieval: images, captions, and which image each caption describes."""

    records: list[Record]
    images: Tensor  # uint8 (N_images, 3, H, W)
    image_ids: Tensor  # (N_images,) identity per image
    captions: list[str]
    caption_ids: Tensor  # (N_captions,) identity per caption
    caption_image: Tensor  # (N_captions,) index of the caption's own image


def build_split(records: list[Record], size: tuple[int, int], progress: bool = False) -> RetrievalSplit:
    captions, caption_ids, caption_image = [], [], []
    for i, r in enumerate(records):
        for c in r.captions:
            captions.append(c)
            caption_ids.append(r.identity)
            caption_image.append(i)
    return RetrievalSplit(
        records=records,
        images=load_images(records, size, progress),
        image_ids=torch.tensor([r.identity for r in records]),
        captions=captions,
        caption_ids=torch.tensor(caption_ids),
        caption_image=torch.tensor(caption_image),
    )
