"""Search: a description in, ranked gallery images out, with everything needed to explain them.

The query side (embedding, part vectors, PGU attention over words, DGA atom weights)
is computed per query and cached; the image side comes from the index's
explanation cache, so a full response for 10 results needs one text forward pass.
"""

from __future__ import annotations

import json
import re
import time
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import checkpoint_fingerprint, load_checkpoint
from .data.dataset import normalize
from .index import GalleryIndex, UpdateReport, read_image, update_index
from .model import LGUR

MAX_QUERY_CHARS = 2000


class QueryError(ValueError):
    """A query that cannot be searched; the message is meant for the user."""


def clean_query(text: str) -> str:
    """Normalise a user's query: NFKC, control characters out, whitespace collapsed, length capped."""
    if not isinstance(text, str):
        raise QueryError("The query must be text.")
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in text)
    text = re.sub(r"\s+", " ", text).strip()[:MAX_QUERY_CHARS]
    if not text:
        raise QueryError("Type a description of the person, e.g. 'a woman in a red coat with a black backpack'.")
    return text


@dataclass
class QueryEncoding:
    text: str
    words: list[str]  # the query's words (word pieces merged), as typed
    embedding: np.ndarray  # (E,)
    parts: np.ndarray  # (P, part_dim)
    word_attention: np.ndarray  # (L, H, P, W) PGU prototype attention summed over each word's pieces
    word_atoms: np.ndarray  # (W, atoms) DGA weights per word, averaged over heads and pieces
    atom_histogram: np.ndarray  # (atoms,) mean over the words
    truncated: bool  # the query was longer than the text encoder reads


@dataclass
class SearchResult:
    rank: int
    row: int  # row in the index
    file: str  # relative to the gallery
    path: str  # absolute path of the image file
    score: float  # cosine similarity
    part_similarity: np.ndarray  # (P,) cosine of each prototype's part vectors
    part_contribution: np.ndarray  # (P,) each part's share of the score (sums to score)
    prototype_attention: np.ndarray  # (L, H, P, N) over the patch grid
    foreground: np.ndarray  # (N,)
    atom_histogram: np.ndarray  # (atoms,) foreground-weighted
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "file": self.file,
            "path": self.path,
            "score": round(self.score, 6),
            "part_similarity": [round(float(x), 6) for x in self.part_similarity],
            "part_contribution": [round(float(x), 6) for x in self.part_contribution],
            **({"metadata": self.metadata} if self.metadata else {}),
        }


@dataclass
class SearchResponse:
    query: QueryEncoding
    results: list[SearchResult]
    grid: tuple[int, int]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"query": self.query.text, "results": [r.to_json() for r in self.results]}


class SearchEngine:
    def __init__(self, model: LGUR, index: GalleryIndex, manifest: dict[str, dict] | None = None, cache: int = 256):
        self.model = model.eval()
        self.index = index
        self.manifest = manifest or {}
        self._cache: OrderedDict[str, QueryEncoding] = OrderedDict()
        self._embeddings: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache
        self.grid = model.image_encoder.grid

    @classmethod
    def open(
        cls,
        checkpoint: str | Path,
        gallery: str | Path,
        index_dir: str | Path | None = None,
        progress: bool = False,
        text_encoder_path: str | None = None,
    ) -> tuple[SearchEngine, UpdateReport]:
        """Load the model and bring the gallery's index up to date (building it if needed)."""
        model, _ = load_checkpoint(checkpoint, text_encoder_path)
        index, report = update_index(model, checkpoint_fingerprint(checkpoint), gallery, index_dir, progress=progress)
        return cls(model, index, read_manifest(Path(gallery))), report

    # -- query side ------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_query(self, text: str) -> QueryEncoding:
        text = clean_query(text)
        if text in self._cache:
            self._cache.move_to_end(text)
            return self._cache[text]
        tokenizer = self.model.text_encoder.tokenizer
        max_length = self.model.text_encoder.max_length
        encoded = tokenizer([text], truncation=True, max_length=max_length, return_offsets_mapping=True)
        ids = torch.tensor(encoded["input_ids"])
        mask = torch.ones_like(ids, dtype=torch.bool)
        explained = self.model.explain_texts(mask, ids)
        word_ids = encoded.word_ids(0)
        offsets = encoded["offset_mapping"][0]
        words, spans = [], []
        for position, word in enumerate(word_ids):
            if word is None:
                continue
            if not spans or word_ids[spans[-1][-1]] != word:
                spans.append([position])
            else:
                spans[-1].append(position)
        for span in spans:
            words.append(text[offsets[span[0]][0] : offsets[span[-1]][1]])
        attention = explained.prototype_attention
        attention = attention[0].numpy() if attention is not None else np.zeros((1, 1, 1, ids.shape[1]))
        word_attention = np.stack([attention[..., s].sum(-1) for s in spans], -1) if spans else attention[..., :0]
        if explained.dictionary_weights is not None:
            per_token = explained.dictionary_weights[0].mean(0).numpy()  # (T, atoms)
            word_atoms = np.stack([per_token[s].mean(0) for s in spans]) if spans else per_token[:0]
        else:
            word_atoms = np.zeros((len(spans), 1), np.float32)
        truncated = len(tokenizer([text], truncation=False)["input_ids"][0]) > max_length
        result = QueryEncoding(
            text=text,
            words=words,
            embedding=explained.embedding[0].numpy(),
            parts=explained.parts[0].numpy(),
            word_attention=word_attention,
            word_atoms=word_atoms,
            atom_histogram=word_atoms.mean(0) if len(word_atoms) else np.zeros(word_atoms.shape[1], np.float32),
            truncated=truncated,
        )
        self._cache[text] = result
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return result

    # -- search ----------------------------------------------------------------------------
    @torch.inference_mode()
    def embed_query(self, text: str) -> np.ndarray:
        """The query's embedding alone (no attention kept): the fast path, cached too."""
        text = clean_query(text)
        if text in self._cache:
            return self._cache[text].embedding
        if text not in self._embeddings:
            ids, mask = self.model.tokenize([text])
            self._embeddings[text] = self.model.embed_texts(ids, mask)[0].numpy()
            if len(self._embeddings) > self._cache_size:
                self._embeddings.popitem(last=False)
        self._embeddings.move_to_end(text)
        return self._embeddings[text]

    def clear_cache(self) -> None:
        self._cache.clear()
        self._embeddings.clear()

    def search_ids(self, text: str, k: int = 10) -> list[tuple[str, float]]:
        """The fast path: (relative file, score) of the top k."""
        scores, rows = self.index.search(self.embed_query(text)[None], k)
        return [(self.index.entries[r].path, float(s)) for s, r in zip(scores[0], rows[0]) if r >= 0]

    def search(self, text: str, k: int = 10) -> SearchResponse:
        start = time.perf_counter()
        query = self.encode_query(text)
        scores, rows = self.index.search(query.embedding[None], k)
        q_parts = query.parts.astype(np.float32)
        q_norm = np.linalg.norm(q_parts.reshape(-1))
        results = []
        for rank, (score, row) in enumerate(zip(scores[0], rows[0]), 1):
            if row < 0:
                continue
            parts = self.index.arrays["parts"][row].astype(np.float32)
            dots = (q_parts * parts).sum(-1)
            cosine = dots / (np.linalg.norm(q_parts, axis=-1) * np.linalg.norm(parts, axis=-1) + 1e-8)
            contribution = dots / (q_norm * np.linalg.norm(parts.reshape(-1)) + 1e-8)
            entry = self.index.entries[row]
            results.append(
                SearchResult(
                    rank=rank,
                    row=int(row),
                    file=entry.path,
                    path=str(self.index.gallery / entry.path),
                    score=float(score),
                    part_similarity=cosine,
                    part_contribution=contribution,
                    prototype_attention=self.index.arrays["prototype_attention"][row].astype(np.float32),
                    foreground=self.index.arrays["foreground"][row].astype(np.float32),
                    atom_histogram=self.index.arrays["atom_histogram"][row].astype(np.float32),
                    metadata=self.manifest.get(entry.path, {}),
                )
            )
        return SearchResponse(query, results, self.grid, time.perf_counter() - start)

    # -- on-demand explanations (one image) -------------------------------------------------
    def _image(self, row: int) -> torch.Tensor:
        """One gallery image, ready for the model: (1, 3, H, W)."""
        path = self.index.gallery / self.index.entries[row].path
        return normalize(torch.from_numpy(read_image(path, self.model.config.image.img_size))[None])

    @torch.inference_mode()
    def guidance(self, text: str, row: int) -> np.ndarray:
        """Cross-modality guidance: (N, W) how much each patch reads each query word (heads averaged)."""
        query_text = clean_query(text)
        tokenizer = self.model.text_encoder.tokenizer
        encoded = tokenizer([query_text], truncation=True, max_length=self.model.text_encoder.max_length)
        ids = torch.tensor(encoded["input_ids"])
        mask = torch.ones_like(ids, dtype=torch.bool)
        weights = self.model.guidance_attention(self._image(row), ids, mask)[0].mean(0).numpy()  # (N, T)
        word_ids = encoded.word_ids(0)
        columns = sorted({w for w in word_ids if w is not None})
        return np.stack([weights[:, [i for i, w in enumerate(word_ids) if w == c]].sum(-1) for c in columns], -1)

    @torch.inference_mode()
    def patch_atoms(self, row: int) -> np.ndarray:
        """DGA reconstruction weights of one image: (N, atoms), averaged over heads."""
        explained = self.model.explain_images(self._image(row))
        if explained.dictionary_weights is None:
            raise ValueError("this model has no DGA module")
        return explained.dictionary_weights[0].mean(0).numpy()


def read_manifest(gallery: Path) -> dict[str, dict]:
    """gallery/manifest.json (as shipped) -> {relative file: metadata}; empty if absent or unreadable."""
    path = gallery / "manifest.json"
    try:
        body = json.loads(path.read_text())
        return {m["file"]: {k: m[k] for k in ("identity", "captions", "view") if k in m} for m in body["images"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
