"""The atom atlas: what each atom of DGA's shared dictionary stands for, read off the gallery
(the image patches that use it most) and its captions (the words that use it most)."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..files import atomic_output
from .atoms import describing, specificity, word_spans

if TYPE_CHECKING:
    from .engine import SearchEngine

log = logging.getLogger(__name__)


@dataclass
class AtomAtlas:
    """What one dictionary atom stands for: the gallery images whose patches use it most, and the
    words (over the gallery's captions) that use it most."""

    atom: int
    images: list[tuple[Path, np.ndarray]]  # (image file, (N,) the atom's weight on each patch)
    words: list[tuple[str, float]]  # (word, its use of the atom over the average word's), most specific first


class Atlas:
    """The atlas of one search engine's gallery; the word table is computed once and kept beside
    the index (tied to the checkpoint and the captions), so a restart reads it at once."""

    def __init__(self, engine: SearchEngine) -> None:
        self.engine = engine
        self._word_atoms: tuple[list[str], np.ndarray] | None = None
        # Each atom's images, read once per gallery index (at most num_atoms small entries): a
        # result's panels open on an atom, and the next result's often on the same one.
        self._images: tuple[object, dict[tuple[int, int], list[tuple[Path, np.ndarray]]]] = (None, {})
        self._images_lock = threading.Lock()

    @torch.inference_mode()
    def patch_atoms(self, rows: list[int]) -> np.ndarray:
        """DGA reconstruction weights of gallery images: (B, N, atoms), averaged over heads."""
        model = self.engine.model
        if model.dga is None:
            raise ValueError("this model has no DGA module")
        images = self.engine._images([self.engine.gallery / self.engine.index.entries[r].path for r in rows])
        # the encoder and DGA alone (not the detector's stage, PGU or the fine read-out): the same weights
        # explain_images gives, at about a third of its cost
        return model.dga.reconstruct_image(model.image_encoder(images), need_weights=True).weights.mean(1).numpy()

    def atom(self, atom: int, top_images: int = 8, top_words: int = 15) -> AtomAtlas:
        """The images and words that use one atom most (the word table is computed once, the images
        once per atom and gallery index)."""
        if self.engine.model.dga is None:
            raise ValueError("this model has no dictionary")
        if not 0 <= atom < self.engine.model.config.num_atoms:
            raise ValueError(f"atoms are numbered 0 to {self.engine.model.config.num_atoms - 1}")
        index = self.engine.index
        with self._images_lock:
            if self._images[0] is not index:  # the gallery changed
                self._images = (index, {})
            images = self._images[1].get((atom, top_images))
        if images is None:
            atoms = index.arrays["atom_histogram"]
            rows = [int(r) for r in np.argsort(-atoms[:, atom].astype(np.float32))[:top_images]]
            weights = self.patch_atoms(rows)[..., atom] if rows else []
            images = [(self.engine.gallery / index.entries[r].path, w) for r, w in zip(rows, weights)]
            with self._images_lock:
                if self._images[0] is index:
                    self._images[1][(atom, top_images)] = images
        words, table = self.word_atoms()
        if not len(words):
            return AtomAtlas(atom, images, [])
        # as a legend: the describing words this atom stands out for, by their use of it over the average word's
        ratios = np.where(describing(words, self.engine.model.config.detail_terms), specificity(table, atom), 0.0)
        best = [int(i) for i in np.argsort(-ratios)[:top_words] if ratios[i] > 0]
        return AtomAtlas(atom, images, [(words[i], float(ratios[i])) for i in best])

    def word_atoms(self, captions: int = 300) -> tuple[list[str], np.ndarray]:
        """Mean DGA atom weights of each (lower-cased) word over the gallery's first captions; kept
        beside the index (tied to the checkpoint and the captions), so a restart reads it at once."""
        if self._word_atoms is not None:
            return self._word_atoms
        texts = [c for m in self.engine.manifest.values() for c in m.get("captions", [])][:captions]
        key = hashlib.sha256(json.dumps([self.engine.index.checkpoint, texts]).encode()).hexdigest()
        stored = self.engine.index_dir / "atlas_words.npz"
        try:
            with np.load(stored, allow_pickle=False) as saved:
                if str(saved["key"]) == key:
                    self._word_atoms = ([str(w) for w in saved["words"]], saved["table"])
                    return self._word_atoms
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # none yet, or another model's, or damaged: computed again
        words, table = self._word_table(texts)
        try:
            with atomic_output(stored) as tmp, open(tmp, "wb") as f:
                np.savez(f, key=np.array(key), words=np.array(words, dtype=str), table=table)
        except OSError as error:  # a read-only index folder: the table still serves this process
            log.warning("could not keep the atlas word table: %s", error)
        self._word_atoms = (words, table)
        return self._word_atoms

    @torch.inference_mode()
    def _word_table(self, texts: list[str], batch_size: int = 64) -> tuple[list[str], np.ndarray]:
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        encoder = self.engine.model.text_encoder
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            encoded = encoder.encode(
                batch, truncation=True, max_length=encoder.max_length, padding=True, return_offsets_mapping=True
            )
            ids = torch.tensor(encoded["input_ids"])
            mask = torch.tensor(encoded["attention_mask"], dtype=torch.bool)
            weights = self.engine.model.explain_texts(mask, ids).dictionary_weights.mean(1).numpy()  # (B, T, atoms)
            for b, text in enumerate(batch):
                offsets = encoded["offset_mapping"][b]
                for span in word_spans(encoded.word_ids(b)):
                    word = text[offsets[span[0]][0] : offsets[span[-1]][1]].lower()
                    sums[word] = sums.get(word, 0) + weights[b, span].mean(0)
                    counts[word] = counts.get(word, 0) + 1
        words = sorted(sums)
        table = (
            np.stack([sums[w] / counts[w] for w in words])
            if words
            else np.zeros((0, self.engine.model.config.num_atoms))
        )
        return words, table.astype(np.float32)
