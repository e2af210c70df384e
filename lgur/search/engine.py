"""Search: a description in, ranked gallery images out, with everything needed to explain them.

This is the one place where the numbers of an explanation are put together: the query
side (embedding, part vectors, PGU attention over words, DGA atom weights) is computed
once per query and cached; the image side comes from the index's explanation cache;
each result carries its part similarities, score shares and shared atoms. explain.py
only draws them. A full response for 10 results needs one text forward pass.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.dataset import content_word, normalize, vocabulary_words
from ..files import read_image
from ..model.checkpoint import checkpoint_fingerprint, load_checkpoint
from ..model.details import prototype_readings
from ..model.lgur import LGUR
from ..model.serving import fold_for_serving
from .atlas import Atlas
from .atoms import relative_weights, salient_atoms, shared_atoms, word_atom_weights, word_spans
from .colours import ColourReading
from .domain import UNLIKE_NOTE, PhotoDomain, domain_path
from .index import GalleryIndex, UpdateReport, default_index_dir, update_index
from .query import Query, QueryError, QueryReader, QueryReading, clean_query
from .reading import WordReading
from .weaknesses import weak_spots

PRIVATE_PREFIX = "your uploads/"  # how a result from a visitor's own uploads is named


@dataclass
class QueryEncoding:
    text: str  # what the model read: the cleaned query, unknown words read as training words (lgur.search.reading)
    words: list[str]  # the query's words (word pieces merged), as typed
    token_ids: np.ndarray  # (T,) what the model read (so later explanations need no second tokenising)
    spans: list[list[int]]  # token positions of each word
    embedding: np.ndarray  # (E,)
    parts: np.ndarray  # (P, part_dim)
    word_attention: np.ndarray  # (L, H, P, W) PGU prototype attention summed over each word's pieces
    word_atoms: np.ndarray  # (W, atoms) DGA weights per word, averaged over heads and pieces
    atom_histogram: np.ndarray  # (atoms,) mean over the words
    atom_weights: np.ndarray  # (atoms,) relative to the average query's (relative_weights)
    truncated: bool  # the query was longer than the text encoder reads
    colour_readings: list[ColourReading] = field(default_factory=list)  # "crimson" read as "red", ...
    word_readings: list[WordReading] = field(default_factory=list)  # "tshirt" read as "t shirt", ...
    phrases: list[str] = field(default_factory=list)  # the phrases the detail detector knows (lgur.model.details)
    phrase_rows: list[int] = field(default_factory=list)  # their rows in the detector
    phrase_reference: list[float] = field(default_factory=list)  # their mean log p over the training images
    details: np.ndarray | None = None  # (K,) their weights in the score (None: no detail score)


@dataclass
class SearchResult:
    rank: int
    row: int  # row in the gallery's index (-1 for a visitor's private upload)
    file: str  # relative to the gallery
    path: str  # absolute path of the image file
    score: float  # the ranking score: cosine similarity, plus the detail score where the query has one
    part_similarity: np.ndarray  # (P,) cosine of each prototype's part vectors
    part_contribution: np.ndarray  # (P,) each part's share of the cosine (sums to it)
    prototype_attention: np.ndarray  # (L, H, P, N) over the prototype maps' grid (float16)
    foreground: np.ndarray  # (N,) (float16)
    atom_histogram: np.ndarray  # (atoms,) mean over patches, m-weighted where m is learned (float16)
    atom_weights: np.ndarray  # (atoms,) relative to the average gallery image (relative_weights)
    shared_atoms: list[int]  # in the top 20 of both this image and the query, by relative weight
    salient_atoms: list[int]  # the atoms that matter most to either (what the atom chart shows)
    parts: np.ndarray | None = None  # (P, part_dim) the image's part vectors (float16)
    metadata: dict[str, Any] = field(default_factory=dict)
    # The query's detail phrases and this image's probability of each (lgur.model.details); score - cosine.
    details: dict[str, float] = field(default_factory=dict)
    detail_score: float = 0.0

    @property
    def cosine(self) -> float:
        return self.score - self.detail_score

    @property
    def score_share(self) -> np.ndarray:
        """(P,) each prototype's fraction of the cosine."""
        return self.part_contribution / self.cosine if self.cosine else np.zeros_like(self.part_contribution)

    @property
    def strongest_part(self) -> int:
        return int(np.argmax(self.part_contribution))

    def to_json(self) -> dict[str, Any]:
        """What an API client gets: the gallery-relative file name, never a server path."""
        return {
            "rank": self.rank,
            "file": self.file,
            "score": round(self.score, 6),
            **({"cosine": round(self.cosine, 6), "details": self.details} if self.details else {}),
            "part_similarity": [round(float(x), 6) for x in self.part_similarity],
            "part_contribution": [round(float(x), 6) for x in self.part_contribution],
            **({"metadata": self.metadata} if self.metadata else {}),
        }


@dataclass
class SearchResponse:
    query: QueryEncoding
    results: list[SearchResult]
    grid: tuple[int, int]  # the patch grid: foreground and detail maps
    prototype_grid: tuple[int, int]  # the prototype maps' (finer with pgu_fine)
    seconds: float
    unknown_words: list[str] = field(default_factory=list)  # not in the training captions' vocabulary
    known_words: int | None = None  # how many of the query's words it has (None: no vocabulary recorded)
    weak_spots: list[str] = field(default_factory=list)  # what the query names that the model rarely gets right

    @property
    def warning(self) -> str | None:
        """For the user, when the model cannot have understood the query (or parts of it)."""
        if self.known_words == 0:
            return "None of these words appear in the descriptions the model learned from: the ranking is a guess."
        if self.unknown_words:
            return (
                "Not in the descriptions the model learned from (it may misread them): "
                + ", ".join(self.unknown_words[:10])
                + "."
            )
        return None

    @property
    def colour_note(self) -> str | None:
        """What the visitor should know was read differently: "crimson -> red"."""
        readings = self.query.colour_readings
        return ", ".join(f"{r.word} -> {r.colour}" for r in readings) if readings else None

    @property
    def word_note(self) -> str | None:
        """Words read in the form the training captions use: "tshirt -> t shirt"."""
        readings = self.query.word_readings
        return ", ".join(f"{r.typed} -> {r.read_as}" for r in readings) if readings else None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"query": self.query.text, "results": [r.to_json() for r in self.results]}
        if self.query.colour_readings:
            body["colours_read_as"] = {r.word: r.colour for r in self.query.colour_readings}
        if self.query.word_readings:
            body["words_read_as"] = {r.typed: r.read_as for r in self.query.word_readings}
        if self.weak_spots:
            body["weak_spots"] = self.weak_spots
        return body | ({"warning": self.warning} if self.warning else {})


@dataclass
class ImageQuery:
    """A photo as the query (search by photo): its embedding and the same explanation numbers a
    gallery image has, so its prototype maps sit beside each result's."""

    path: str
    embedding: np.ndarray  # (E,)
    parts: np.ndarray  # (P, part_dim)
    prototype_attention: np.ndarray  # (L, H, P, N)
    foreground: np.ndarray  # (N,)
    atom_histogram: np.ndarray  # (atoms,)
    atom_weights: np.ndarray  # (atoms,) relative to the average gallery image


@dataclass
class PhotoResponse:
    query: ImageQuery
    results: list[SearchResult]
    grid: tuple[int, int]
    prototype_grid: tuple[int, int]
    seconds: float
    unlike_training: bool = False  # the photo lies beyond the checkpoint's photo domain (lgur.search.domain)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"results": [r.to_json() for r in self.results]}
        return body | ({"out_of_domain": True, "note": UNLIKE_NOTE} if self.unlike_training else {})


@dataclass
class Comparison:
    """Why not this one? An image the visitor expected, explained beside the query's top result."""

    image: SearchResult  # with its rank in the whole gallery
    top: SearchResult
    gallery_size: int

    @property
    def loses_most(self) -> int:
        """The prototype where this image falls furthest behind the top result's score."""
        return int(np.argmin(self.image.part_contribution - self.top.part_contribution))

    @property
    def atoms_it_lacks(self) -> list[int]:
        """Atoms the top result shares with the query that this image does not."""
        return [a for a in self.top.shared_atoms if a not in self.image.shared_atoms]

    @property
    def atoms_only_it_has(self) -> list[int]:
        return [a for a in self.image.shared_atoms if a not in self.top.shared_atoms]

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image.to_json(),
            "top": self.top.to_json(),
            "gallery_size": self.gallery_size,
            "loses_most": self.loses_most,
            "atoms_it_lacks": self.atoms_it_lacks,
            "atoms_only_it_has": self.atoms_only_it_has,
        }


@torch.inference_mode()
def encode_text(model: LGUR, query: Query | str, atom_average: np.ndarray | None = None) -> QueryEncoding:
    """A query as the model reads it: embedding, part vectors, and per word the prototypes' attention
    and the dictionary weights (atom weights relative to `atom_average`, the average caption's). A
    plain string is read as it is (no cleaning or reading, no detail score)."""
    if isinstance(query, str):
        query = Query(query, QueryReading(query, [], []), [], None)
    text = query.text
    max_length = model.text_encoder.max_length
    # Tokenised once: cut by hand to what the model reads ([CLS] ... [SEP]), as truncation would.
    encoded = model.text_encoder.encode([text], truncation=False, return_offsets_mapping=True, verbose=False)
    token_ids, word_ids, offsets = encoded["input_ids"][0], encoded.word_ids(0), encoded["offset_mapping"][0]
    truncated = len(token_ids) > max_length
    if truncated:
        keep = [*range(max_length - 1), len(token_ids) - 1]
        token_ids, word_ids, offsets = ([x[i] for i in keep] for x in (token_ids, word_ids, offsets))
    ids = torch.tensor([token_ids])
    explained = model.explain_texts(torch.ones_like(ids, dtype=torch.bool), ids)
    spans = word_spans(word_ids)
    words = [text[offsets[span[0]][0] : offsets[span[-1]][1]] for span in spans]
    attention = explained.prototype_attention
    attention = attention[0].numpy() if attention is not None else np.zeros((1, 1, 1, ids.shape[1]))
    word_attention = np.stack([attention[..., s].sum(-1) for s in spans], -1) if spans else attention[..., :0]
    if explained.dictionary_weights is not None:
        word_atoms = word_atom_weights(explained.dictionary_weights[0].mean(0).numpy(), spans)  # (W, atoms)
    else:
        word_atoms = np.zeros((len(spans), 1), np.float32)
    histogram = word_atoms.mean(0) if len(word_atoms) else np.zeros(word_atoms.shape[1], np.float32)
    phrase_rows, details = query.phrase_rows, query.details
    return QueryEncoding(
        text=text,
        words=words,
        token_ids=ids[0].numpy(),
        spans=spans,
        embedding=explained.embedding[0].numpy(),
        parts=explained.parts[0].numpy(),
        word_attention=word_attention,
        word_atoms=word_atoms,
        atom_histogram=histogram,
        atom_weights=relative_weights(histogram, atom_average),
        truncated=truncated,
        phrases=[model.config.detail_terms[r] for r in phrase_rows],
        phrase_rows=phrase_rows,
        phrase_reference=[float(model.details.reference[r]) for r in phrase_rows],
        details=details,
        colour_readings=query.reading.colours,
        word_readings=query.reading.words,
    )


@torch.inference_mode()
def words_left_out(model: LGUR, query: QueryEncoding) -> tuple[list[int], torch.Tensor]:
    """The query's describing words (their indexes; not "a" or "with": data.dataset.content_word)
    and (1 + len, E) unit-norm embeddings: the whole query's, then the query's without each of
    those words (its word pieces left out), all in one text batch. The part of `word_effects` that
    does not depend on the image: computed once per query, it serves every result."""
    ids = query.token_ids
    scored = [i for i, word in enumerate(query.words) if content_word(word)]
    rows = [ids] + [np.delete(ids, query.spans[i]) for i in scored]
    batch = np.zeros((len(rows), len(ids)), dtype=np.int64)  # 0: [PAD]; masked out below
    mask = np.zeros_like(batch, dtype=bool)
    for i, row in enumerate(rows):
        batch[i, : len(row)], mask[i, : len(row)] = row, True
    return scored, model.embed_texts(torch.from_numpy(batch), torch.from_numpy(mask))


def word_effects(
    model: LGUR,
    query: QueryEncoding,
    image_parts: np.ndarray,
    left_out: tuple[list[int], torch.Tensor] | None = None,
) -> np.ndarray:
    """(W,) what each query word adds to an image's score: the cosine with the whole query minus the
    cosine with the query without that word; NaN for the words not scored ("a", "with").
    `left_out`: words_left_out(model, query), if already computed."""
    scored, texts = left_out if left_out is not None else words_left_out(model, query)
    image = torch.nn.functional.normalize(torch.from_numpy(image_parts.astype(np.float32)).flatten(), dim=0)
    scores = (texts @ image).numpy()
    effects = np.full(len(query.words), np.nan, np.float32)
    effects[scored] = scores[0] - scores[1:]
    return effects


def rank_hits(
    embedding: np.ndarray, indexes: tuple[GalleryIndex, ...], k: int, details: np.ndarray | None = None
) -> list[tuple[float, GalleryIndex, int]]:
    """The k best (score, index, row) over one or more indexes (the gallery and a visitor's uploads);
    `details`: the query's detail vector (QueryEncoding.details)."""
    hits = []
    for index in indexes:
        scores, rows = index.search(embedding[None], k, None if details is None else details[None])
        hits += [(float(s), index, int(r)) for s, r in zip(scores[0], rows[0]) if r >= 0]
    return sorted(hits, key=lambda hit: -hit[0])[:k]


def explain_hit(
    query: QueryEncoding | ImageQuery,
    index: GalleryIndex,
    row: int,
    rank: int,
    score: float,
    image_atom_average: np.ndarray | None,
    manifest: dict[str, dict],
    shared: bool,
) -> SearchResult:
    """One result with the numbers of its explanation: per-prototype similarities and score shares,
    and the atoms it shares with the query (a text's or an image's). `shared`: a gallery row (else a
    visitor's upload)."""
    q_parts = query.parts.astype(np.float32)
    parts = index.arrays["parts"][row].astype(np.float32)
    dots = (q_parts * parts).sum(-1)
    cosine = dots / (np.linalg.norm(q_parts, axis=-1) * np.linalg.norm(parts, axis=-1) + 1e-8)
    contribution = dots / (np.linalg.norm(q_parts.reshape(-1)) * np.linalg.norm(parts.reshape(-1)) + 1e-8)
    entry = index.entries[row]
    atoms = index.arrays["atom_histogram"][row]  # a float16 view, like the maps below
    weights = relative_weights(atoms, image_atom_average)
    # An ImageQuery has no phrases. A phrase's probability is exp(lift + its reference log p).
    text_query = isinstance(query, QueryEncoding)
    phrases = zip(query.phrases, query.phrase_rows, query.phrase_reference) if text_query else []
    lift = index.arrays["detail_lift"][row].astype(np.float32)
    details = query.details if text_query else None
    return SearchResult(
        rank=rank,
        row=row if shared else -1,
        file=entry.path if shared else f"{PRIVATE_PREFIX}{entry.path}",
        path=str(index.gallery / entry.path),
        score=score,
        part_similarity=cosine,
        part_contribution=contribution,
        # views into the index (float16), not copies: a kept response stays small
        prototype_attention=index.arrays["prototype_attention"][row],
        foreground=index.arrays["foreground"][row],
        atom_histogram=atoms,
        atom_weights=weights,
        shared_atoms=shared_atoms(query.atom_weights, weights),
        salient_atoms=salient_atoms(query.atom_weights, weights),
        parts=index.arrays["parts"][row],
        metadata=manifest.get(entry.path, {}) if shared else {},
        details={p: round(float(np.exp(lift[r] + ref)), 4) for p, r, ref in phrases} if len(lift) else {},
        detail_score=float(details @ lift) if details is not None and len(lift) else 0.0,
    )


class SearchEngine:
    def __init__(
        self,
        model: LGUR,
        index: GalleryIndex,
        card: dict[str, Any] | None = None,
        manifest: dict[str, dict] | None = None,
        index_dir: Path | None = None,
        cache: int = 256,
        colour_grounding: bool = True,
        word_forms: bool = True,
    ):
        self.model = model.eval()
        self.index = index
        self.card = card or {}
        self.manifest = manifest or {}
        self.index_dir = index_dir or default_index_dir(index.gallery)
        self.domain: PhotoDomain | None = None  # what photos the model was trained on (lgur.search.domain)
        self._cache: OrderedDict[str, QueryEncoding] = OrderedDict()
        self._embeddings: OrderedDict[str, np.ndarray] = OrderedDict()
        self._parsed: OrderedDict[str, Query] = OrderedDict()
        self._cache_size = cache
        self._cache_lock = threading.Lock()  # the app serves several requests at once
        self.atlas = Atlas(self)  # what each dictionary atom stands for
        self.vocabulary = frozenset(self.card.get("vocabulary", []))
        # Words the model never saw are read as training words where that is unambiguous (lgur.search.reading).
        self.reader = QueryReader(self.vocabulary, model.config.detail_terms, colour_grounding, word_forms)
        self.grid = model.image_encoder.grid
        self.prototype_grid = model.prototype_grid
        # Per attribute kind, how often the model's top 10 has it (the card's query-bench figures).
        self.weak_kinds = self.card.get("query_bench", {}).get("default", {}).get("by_kind", {})
        self.colours = self.reader.grounding.targets if self.reader.grounding else frozenset()
        # The average caption's atom histogram, measured when the checkpoint was trained or exported.
        average = self.card.get("atom_average", {}).get("text")
        self.text_atom_average = np.asarray(average, np.float32) if average else None
        self._image_atom_average: np.ndarray | None = None

    @property
    def relative_atoms(self) -> bool:
        """Atoms are ranked by weight relative to the average (the card holds the average caption's)."""
        return self.text_atom_average is not None

    @property
    def image_atom_average(self) -> np.ndarray | None:
        """The gallery's average image atom histogram (None: an empty gallery, or raw weights)."""
        if self._image_atom_average is None and len(self.index) and self.relative_atoms:
            self._image_atom_average = self.index.arrays["atom_histogram"].astype(np.float32).mean(0)
        return self._image_atom_average

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
        model, card = load_checkpoint(checkpoint, text_encoder_path)
        fold_for_serving(model)  # the same embeddings, sooner
        index_dir = Path(index_dir).resolve() if index_dir else default_index_dir(gallery)
        index, report = update_index(model, checkpoint_fingerprint(card), gallery, index_dir, progress=progress)
        engine = cls(model, index, card, read_manifest(Path(gallery)), index_dir)
        engine.domain = PhotoDomain.load(domain_path(checkpoint), checkpoint_fingerprint(card))
        return engine, report

    # -- the gallery ---------------------------------------------------------------------------
    @property
    def gallery(self) -> Path:
        return self.index.gallery

    def __len__(self) -> int:
        return len(self.index)

    def image_path(self, file: str) -> Path | None:
        """The image file behind an indexed gallery-relative name; None for anything else."""
        return self.gallery / file if isinstance(file, str) and self.index.row(file) is not None else None

    def files(self) -> list[str]:
        """Every indexed file, gallery-relative, in index order."""
        return [e.path for e in self.index.entries]

    def refresh(self, progress: bool = False) -> UpdateReport:
        """Re-read the gallery folder: embed new or changed files, drop removed ones."""
        self.index, report = update_index(
            self.model, self.index.checkpoint, self.gallery, self.index_dir, progress=progress
        )
        self._image_atom_average = None  # the gallery changed
        return report

    # -- query side ------------------------------------------------------------------------
    def _recall(self, cache: OrderedDict, key: str) -> Any:
        """The cached value of `key` (now the most recent), or None."""
        with self._cache_lock:
            if key in cache:
                cache.move_to_end(key)
                return cache[key]
        return None

    def _keep(self, cache: OrderedDict, key: str, value: Any) -> Any:
        """Cache `value` under `key`, dropping the least recent beyond the cache's size."""
        with self._cache_lock:
            cache[key] = value
            if len(cache) > self._cache_size:
                cache.popitem(last=False)
        return value

    def parse_query(self, text: str) -> Query:
        """A visitor's query cleaned, read and its detail phrases found, once (query.QueryReader.parse)."""
        key = clean_query(text)
        query = self._recall(self._parsed, key)
        if query is None:
            query = self._keep(self._parsed, key, self.reader.parse(key, self.model.config))
        return query

    @torch.inference_mode()
    def encode_query(self, text: str | Query) -> QueryEncoding:
        query = text if isinstance(text, Query) else self.parse_query(text)
        key = query.typed  # cached as typed: two spellings of one colour are two queries
        encoding = self._recall(self._cache, key)
        if encoding is None:
            encoding = self._keep(self._cache, key, encode_text(self.model, query, self.text_atom_average))
        return encoding

    # -- search ----------------------------------------------------------------------------
    @torch.inference_mode()
    def embed_query(self, text: str | Query) -> np.ndarray:
        """The query's embedding alone (no attention kept): the fast path, cached too."""
        query = text if isinstance(text, Query) else self.parse_query(text)
        key = query.typed
        with self._cache_lock:
            if key in self._cache:
                return self._cache[key].embedding
        embedding = self._recall(self._embeddings, key)
        if embedding is None:
            ids, mask = self.model.tokenize([query.text])
            embedding = self._keep(self._embeddings, key, self.model.embed_texts(ids, mask)[0].numpy())
        return embedding

    def warm_up(self) -> threading.Thread:
        """Build the atom atlas's word table (about 3 s on 2 cores) and load the query reader's WordNet
        (0.2 s) in the background, so that neither the first visitor who opens an atom nor the first
        one who types an unknown word waits for it."""

        def work() -> None:
            if self.reader.forms is not None:
                self.reader.forms.wordnet.senses("backpack")
            self.atlas.word_atoms()

        thread = threading.Thread(target=work, name="warm-up", daemon=True)
        thread.start()
        return thread

    def clear_cache(self) -> None:
        with self._cache_lock:
            self._cache.clear()
            self._embeddings.clear()
            self._parsed.clear()

    def search_ids(self, text: str, k: int = 10) -> list[tuple[str, float]]:
        """The fast path: (relative file, score) of the top k."""
        query = self.parse_query(text)
        details = None if query.details is None else query.details[None]
        scores, rows = self.index.search(self.embed_query(query)[None], k, details)
        return [(self.index.entries[r].path, float(s)) for s, r in zip(scores[0], rows[0]) if r >= 0]

    def search(self, text: str, k: int = 10, private: GalleryIndex | None = None) -> SearchResponse:
        """The top k of the gallery (and of a visitor's `private` uploads, if given), explained."""
        start = time.perf_counter()
        query = self.encode_query(text)
        indexes = (self.index, private) if private is not None else (self.index,)
        results = [
            explain_hit(query, index, row, rank, score, self.image_atom_average, self.manifest, index is self.index)
            for rank, (score, index, row) in enumerate(rank_hits(query.embedding, indexes, k, query.details), 1)
        ]
        response = SearchResponse(query, results, self.grid, self.prototype_grid, time.perf_counter() - start)
        response.weak_spots = weak_spots(query.text, self.weak_kinds, self.colours)
        if self.vocabulary:
            words = vocabulary_words(query.text)
            response.unknown_words = list(dict.fromkeys(w for w in words if w not in self.vocabulary))
            response.known_words = sum(w in self.vocabulary for w in words)
        return response

    def compare(self, text: str, file: str) -> Comparison:
        """Why not this one? `file` (a gallery-relative name) ranked against the whole gallery for the
        query, explained beside the top result. QueryError for a file that is not in the gallery."""
        row = self.index.row(file) if isinstance(file, str) else None
        if row is None:
            raise QueryError("Pick an image of the gallery (its name as the gallery lists it).")
        query = self.encode_query(text)
        scores = self.index.embeddings.astype(np.float32) @ query.embedding.astype(np.float32)
        if query.details is not None:  # the search's ranking score (GalleryIndex.search)
            scores = scores + (self.index.detail_lift @ torch.from_numpy(query.details)).numpy()
        rank = 1 + int((scores > scores[row]).sum())
        best = int(np.argmax(scores))
        average = self.image_atom_average

        def explained(r: int, rank: int) -> SearchResult:
            return explain_hit(query, self.index, r, rank, float(scores[r]), average, self.manifest, True)

        return Comparison(explained(row, rank), explained(best, 1), len(self.index))

    @torch.inference_mode()
    def search_by_photo(self, image: str | Path, k: int = 10, exclude_self: bool = True) -> PhotoResponse:
        """Image to image: `image` (a gallery file's path or any image file) as the query, ranked
        against the gallery's embeddings; the query keeps its own explanation numbers."""
        start = time.perf_counter()
        explained = self.model.explain_images(self._images([image]))
        histogram = explained.atom_histogram
        atoms = histogram[0].numpy() if histogram is not None else np.zeros(1, np.float32)
        query = ImageQuery(
            path=str(image),
            embedding=explained.embedding[0].numpy(),
            parts=explained.parts[0].numpy(),
            prototype_attention=explained.prototype_attention[0].numpy()
            if explained.prototype_attention is not None
            else np.zeros((1, 1, 1, 0), np.float32),
            foreground=explained.foreground[0].numpy() if explained.foreground is not None else np.zeros(0),
            atom_histogram=atoms,
            atom_weights=relative_weights(atoms, self.image_atom_average),
        )
        path, gallery = Path(image).resolve(), self.gallery.resolve()
        same = self.index.row(path.relative_to(gallery).as_posix()) if path.is_relative_to(gallery) else None
        hits = rank_hits(query.embedding, (self.index,), k + (exclude_self and same is not None))
        hits = [h for h in hits if not (exclude_self and h[2] == same)][:k]
        results = [
            explain_hit(query, index, row, rank, score, self.image_atom_average, self.manifest, True)
            for rank, (score, index, row) in enumerate(hits, 1)
        ]
        # a gallery image is the world itself; a photo is read from the tokens explain_images computed
        unlike = same is None and self.domain is not None and bool(self.domain.unlike(explained.patch_features)[0])
        return PhotoResponse(query, results, self.grid, self.prototype_grid, time.perf_counter() - start, unlike)

    # -- on-demand explanations (one image) -------------------------------------------------
    def _images(self, paths: list[str | Path]) -> torch.Tensor:
        """Image files, ready for the model: (B, 3, H, W)."""
        size = self.model.config.image.img_size
        return normalize(torch.from_numpy(np.stack([read_image(p, size, cached=True) for p in paths])))

    @torch.inference_mode()
    def guidance(self, query: QueryEncoding, image: str | Path) -> np.ndarray:
        """Cross-modality guidance: (N, W) how much each query word contributes to each patch of `image`
        (a result's path): each patch's attention to the word, heads averaged, times the patch's foreground
        weight where the model learns it (LGUR.learns_foreground)."""
        ids = torch.from_numpy(query.token_ids)[None]
        mask = torch.ones_like(ids, dtype=torch.bool)
        weighted = self.model.learns_foreground
        weights = self.model.guidance_attention(self._images([image]), ids, mask, weighted)[0].mean(0).numpy()
        return np.stack([weights[:, span].sum(-1) for span in query.spans], -1) if query.spans else weights[:, :0]

    @torch.inference_mode()
    def detail_maps(self, query: QueryEncoding, image: str | Path) -> np.ndarray:
        """(N, phrases): where on `image` (a result's path) the detail detector saw each of the query's
        phrases (query.phrases): its pooling weights over the patches."""
        if not query.phrase_rows or self.model.details is None:
            return np.zeros((self.grid[0] * self.grid[1], 0), np.float32)
        return self._details_of(image)[1][:, query.phrase_rows]

    def _details_of(self, image: str | Path) -> tuple[np.ndarray, np.ndarray]:
        """The detector on one image: each phrase's probability (K,) and where it was seen (N, K); kept for
        a few images (keyed by the file's modification time and size), since a result's panels share it."""
        stat = os.stat(image)
        return self._details_cached(str(image), stat.st_mtime_ns, stat.st_size)

    @functools.lru_cache(maxsize=16)  # noqa: B019 (the engine lives as long as the app)
    @torch.inference_mode()
    def _details_cached(self, image: str, modified: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        probabilities, where = self.model.find_details(self._images([image]))
        return probabilities[0].numpy(), where[0].numpy()

    def prototype_readings(self, result: SearchResult | ImageQuery, layer: int = -1) -> list[tuple[str, float] | None]:
        """What each prototype reads on a result's (or a query photo's) image (details.prototype_readings):
        a phrase the detector sees there where the prototype's map concentrates, or None."""
        count = result.prototype_attention.shape[2]
        if self.model.details is None:
            return [None] * count
        probabilities, where = self._details_of(result.path)
        maps = result.prototype_attention[layer].astype(np.float32).mean(0)  # (P, cells) heads averaged
        return prototype_readings(
            maps, self.prototype_grid, where, probabilities, self.model.config.detail_terms, self.grid
        )


def format_results(response: SearchResponse) -> str:
    lines = [f"colours read as: {response.colour_note}"] if response.colour_note else []
    lines += [f"words read as: {response.word_note}"] if response.word_note else []
    for r in response.results:
        parts = " ".join(f"{x:+.2f}" for x in r.part_similarity)
        lines.append(f"{r.rank:3d}  {r.score:.4f}  {r.file}  parts [{parts}]")
    return "\n".join(lines)


def read_manifest(gallery: Path) -> dict[str, dict]:
    """gallery/manifest.json (as shipped) -> {relative file: metadata}; empty if absent or unreadable."""
    path = gallery / "manifest.json"
    try:
        body = json.loads(path.read_text())
        return {m["file"]: {k: m[k] for k in ("identity", "captions", "view") if k in m} for m in body["images"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
