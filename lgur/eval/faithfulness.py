"""Are the explanations about *this* image? Each measure beside templates that ignore the image.

The world's own camera puts every body part at nearly the same place in every image, so a map that
ignores the image (a fixed point per part) passes a pointing game there. These measures use what
the renderer can vary: detector-framed images (lgur.synth.render.detector_framing), the same
person placed at the top and at the bottom of the frame, and counterfactual pairs (the same person
and camera, one attribute changed). Every figure stands beside what a template scores on the same
images:

- fixed point: each part's mean position over the training split's part labels;
- centre: the image's centre;
- uniform: a flat map (its pointing score is the chance that a random pixel lies near the part);
- mean map: each prototype's map averaged over the measured images (its best guess without the image).

Measures:

- pointing game: does the peak of a prototype's map (the one the page draws) fall on the body part the
  prototype stands for, on detector-framed images?
- equivariance: each prototype's centroid move divided by the person's move (scaled to 0.7 of the
  height, at the top vs at the bottom of the frame; 1 = the map follows the person, 0 = a template);
- deletion: the drop of a prototype's part vector (1 - cosine to the intact one) when its map's top
  10% of patches are blanked, over the drop when the mean map's top 10% are;
- counterfactuals: when one attribute changes, does the detector's phrase for the old value lose
  probability and the new one gain, and is the prototype whose part similarity drops most the one
  that reads the changed pixels most?
- DGA: the effective number of atoms (exp of the entropy of the heads-averaged weights) per patch and
  per word, against 400 for uniform weights; and how specific the atoms are (atom_specificity).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..data.dataset import normalize
from ..files import model_pixels, read_image
from ..model.details import PART_WORDS
from ..model.lgur import LGUR
from ..synth.attributes import COUNTERFACTUAL_KINDS, Attributes, counterfactual
from ..synth.render import BAG, PARTS, UPPER, Camera, encode_jpeg, placed, render
from .pointing import patch_part_fractions, pointing_hit, template_map, uniform_hit
from .quality import region_labels

DELETED_SHARE = 0.10  # deletion: the top 10% of a map's patches
PLACED_HEIGHT = 0.7  # equivariance: the person 0.7 of the height, at the top and at the bottom of the frame
PLACED_CENTRES = (0.36, 0.64)


# -- reading the world ---------------------------------------------------------------------------


def split_entries(data: str | Path, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The split's images with their side-file entries (attributes, camera, part labels)."""
    data = Path(data)
    side = json.loads((data / "synthetic_attributes.json").read_text())
    rows = [a for a in json.loads((data / "reid_raw.json").read_text()) if a["split"] == split][:limit]
    return [
        {"file_path": a["file_path"], "id": a["id"], "captions": a["captions"], **side[a["file_path"]]} for a in rows
    ]


def label_map(data: str | Path, entry: dict[str, Any]) -> np.ndarray:
    with Image.open(Path(data) / entry["parts"]) as labels:
        return np.asarray(labels)


def part_points(data: str | Path, split: str = "train", limit: int = 500) -> np.ndarray:
    """(parts, 2): each part's mean position (row, column as fractions of the image) over the split's
    labels: the fixed-point template."""
    sums, counts = np.zeros((len(PARTS), 2)), np.zeros(len(PARTS))
    for entry in split_entries(data, split, limit):
        labels = label_map(data, entry)
        h, w = labels.shape
        for part in range(len(PARTS)):
            ys, xs = np.nonzero(labels == part)
            if len(ys):
                sums[part] += ((ys.mean() + 0.5) / h, (xs.mean() + 0.5) / w)
                counts[part] += 1
    return sums / np.maximum(counts, 1)[:, None]


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _pixels(images: list[Image.Image], size: tuple[int, int]) -> Tensor:
    return normalize(torch.from_numpy(np.stack([model_pixels(i, size) for i in images])))


def drawn_maps(model: LGUR, images: Tensor, layer: int = -1) -> Tensor:
    """(B, P, rows, cols): each prototype's map as the page draws it (one layer, heads averaged)."""
    explained = model.explain_images(images)
    if explained.prototype_attention is None:
        raise ValueError("this model has no prototypes")
    rows, cols = explained.prototype_shape
    return explained.prototype_attention[:, layer].mean(1).unflatten(-1, (rows, cols))


def centroid_rows(maps: Tensor) -> Tensor:
    """(B, P, rows, cols) -> (B, P) each map's centroid height (0 top, 1 bottom)."""
    rows = maps.shape[-2]
    heights = (torch.arange(rows, dtype=maps.dtype) + 0.5) / rows
    profile = maps.sum(-1)  # (B, P, rows)
    return (profile * heights).sum(-1) / profile.sum(-1).clamp(min=1e-12)


# -- the measures ---------------------------------------------------------------------------------


@torch.inference_mode()
def pointing(
    model: LGUR,
    data: str | Path,
    split: str,
    points: np.ndarray,
    limit: int | None = None,
    batch_size: int = 32,
    assignment: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Prototype maps' pointing game on the split, each prototype scored on the part it stands for
    (`assignment`, e.g. {"P1": "hair/head"}, read on another split; default: region_labels over this
    split's maps), beside the templates on the same (image, part) pairs."""
    entries = split_entries(data, split, limit)
    size = tuple(model.config.image.img_size)
    model.eval()
    prototypes = model.config.num_prototypes
    share, area = np.zeros((prototypes, len(PARTS))), np.zeros(len(PARTS))
    hits: list[np.ndarray] = []  # per image (P, parts): the map's peak on the part (nan: part hardly visible)
    fixed, centre, flat = [], [], []  # per image (parts,)
    for chunk in _batches(entries, batch_size):
        images = torch.from_numpy(np.stack([read_image(Path(data) / "imgs" / e["file_path"], size) for e in chunk]))
        maps = drawn_maps(model, normalize(images)).numpy()  # (B, P, rows, cols)
        for i, entry in enumerate(chunk):
            labels = label_map(data, entry)
            fractions = patch_part_fractions(labels, maps.shape[-2:])
            share += maps[i].reshape(prototypes, -1) @ fractions
            area += fractions.mean(0)
            row, f_row, c_row, u_row = np.full((prototypes, len(PARTS)), np.nan), [], [], []
            for part in range(len(PARTS)):
                mask = labels == part
                visible = part > 0 and mask.sum() >= 0.002 * mask.size
                for p in range(prototypes):
                    row[p, part] = pointing_hit(maps[i, p], mask) if visible else np.nan
                grid = maps.shape[-2:]
                f_row.append(pointing_hit(template_map(points[part], grid), mask) if visible else np.nan)
                c_row.append(pointing_hit(template_map((0.5, 0.5), grid), mask) if visible else np.nan)
                u_row.append(uniform_hit(mask) if visible else np.nan)
            hits.append(row)
            fixed.append(f_row)
            centre.append(c_row)
            flat.append(u_row)
    n = max(len(entries), 1)
    regions = region_labels(share / n, area / n)
    assignment = regions["assignment"] if assignment is None else assignment
    assigned = {int(p[1:]) - 1: PARTS.index(part) for p, part in assignment.items()}
    hits_, fixed_, centre_, flat_ = (np.array(x, dtype=float) for x in (hits, fixed, centre, flat))
    by_prototype, model_all, fixed_all, centre_all, flat_all = {}, [], [], [], []
    for p, part in sorted(assigned.items()):
        seen = ~np.isnan(hits_[:, p, part])
        figures = {
            "part": PARTS[part],
            "images": int(seen.sum()),
            "model": 100 * float(hits_[seen, p, part].mean()) if seen.any() else float("nan"),
            "fixed_point": 100 * float(fixed_[seen, part].mean()) if seen.any() else float("nan"),
        }
        by_prototype[f"P{p + 1}"] = figures
        model_all += hits_[seen, p, part].tolist()
        fixed_all += fixed_[seen, part].tolist()
        centre_all += centre_[seen, part].tolist()
        flat_all += flat_[seen, part].tolist()

    def pct(values: list[float]) -> float:
        return 100 * float(np.mean(values)) if values else float("nan")

    return {
        "split": split,
        "images": len(entries),
        "regions": regions,
        "assignment": assignment,
        "by_prototype": by_prototype,
        "model": pct(model_all),
        "fixed_point": pct(fixed_all),
        "centre": pct(centre_all),
        "uniform": pct(flat_all),
        "pairs": len(model_all),
    }


def placed_pair(entry: dict[str, Any], degrade: bool = True) -> tuple[Image.Image, Image.Image, float]:
    """The same person and camera, PLACED_HEIGHT tall, at the top and at the bottom of the frame; and
    the person's move as a fraction of the height."""
    attributes, camera = Attributes.from_dict(entry["attributes"]), Camera.from_dict(entry["camera"])
    top, bottom = (placed(camera, attributes.height, PLACED_HEIGHT, c) for c in PLACED_CENTRES)
    return (
        render(attributes, top, degrade=degrade).image,
        render(attributes, bottom, degrade=degrade).image,
        PLACED_CENTRES[1] - PLACED_CENTRES[0],
    )


@torch.inference_mode()
def equivariance(
    model: LGUR, data: str | Path, split: str, limit: int | None = 100, batch_size: int = 32
) -> dict[str, Any]:
    """Each prototype's centroid move / the person's move, for the drawn (last) layer and the first."""
    entries = split_entries(data, split, limit)
    size = tuple(model.config.image.img_size)
    model.eval()
    moves: dict[int, list[Tensor]] = {0: [], -1: []}
    for chunk in _batches(entries, batch_size):
        pairs = [placed_pair(e) for e in chunk]
        top, bottom = _pixels([p[0] for p in pairs], size), _pixels([p[1] for p in pairs], size)
        person = torch.tensor([p[2] for p in pairs])[:, None]
        for layer in moves:
            move = centroid_rows(drawn_maps(model, bottom, layer)) - centroid_rows(drawn_maps(model, top, layer))
            moves[layer].append(move / person)  # (B, P)
    result: dict[str, Any] = {"split": split, "images": len(entries), "template": 0.0}
    for layer, name in ((-1, "drawn_layer"), (0, "first_layer")):
        ratio = torch.cat(moves[layer]).mean(0)
        result[name] = [round(float(r), 3) for r in ratio]
    result["min_drawn"] = min(result["drawn_layer"])
    return result


def top_cells(maps: Tensor, share: float = DELETED_SHARE) -> Tensor:
    """(..., rows, cols) -> bool mask of the same shape: the share of cells with the largest values."""
    flat = maps.flatten(-2)
    k = max(1, round(share * flat.shape[-1]))
    chosen = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, flat.topk(k, dim=-1).indices, True)
    return chosen.view_as(maps)


def blank(images: Tensor, cells: Tensor) -> Tensor:
    """images (B, 3, H, W) normalised; cells (B, rows, cols) bool -> those cells set to 0 (the mean colour)."""
    mask = F.interpolate(cells[:, None].float(), size=images.shape[-2:], mode="nearest")  # (B, 1, H, W)
    return images * (1 - mask)


@torch.inference_mode()
def deletion(
    model: LGUR, data: str | Path, split: str, limit: int | None = 100, batch_size: int = 16
) -> dict[str, Any]:
    """The drop of each prototype's part vector when its map's top cells are blanked, over the drop when
    the mean map's top cells (the same number) are."""
    entries = split_entries(data, split, limit)
    size = tuple(model.config.image.img_size)
    model.eval()
    every = []
    for chunk in _batches(entries, 64):
        images = torch.from_numpy(np.stack([read_image(Path(data) / "imgs" / e["file_path"], size) for e in chunk]))
        every.append(normalize(images))
    images = torch.cat(every)
    maps = torch.cat([drawn_maps(model, b) for b in images.split(batch_size)])  # (B, P, rows, cols)
    template = maps.mean(0, keepdim=True).expand_as(maps)
    drops = {"map": [], "template": []}
    prototypes = maps.shape[1]
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        intact = F.normalize(model.explain_images(batch, need_weights=False).parts, dim=-1)  # (B, P, D)
        for name, source in (("map", maps), ("template", template)):
            cells = top_cells(source[start : start + batch_size])  # (B, P, rows, cols)
            for p in range(prototypes):
                blanked = F.normalize(model.explain_images(blank(batch, cells[:, p]), need_weights=False).parts, dim=-1)
                drops[name].append(1 - (blanked[:, p] * intact[:, p]).sum(-1))  # (B,)
    by_map, by_template = torch.cat(drops["map"]), torch.cat(drops["template"])  # (images * P,)
    model_drop, template_drop = float(by_map.mean()), float(by_template.mean())
    return {
        "split": split,
        "images": len(images),
        "share": DELETED_SHARE,
        "model_drop": model_drop,
        "template_drop": template_drop,
        "ratio": model_drop / max(template_drop, 1e-9),
    }


def phrase_rows_for(terms: tuple[str, ...], kind: str, value: str) -> list[int]:
    """The detector's phrases that name `value` of `kind` for this person ("red backpack" for a red
    backpack); [] where nothing names it ("none")."""
    if value == "none":
        return []
    words = [t.split() for t in terms]
    if kind in ("top_colour", "bag_colour"):
        garment = set(PART_WORDS[UPPER if kind == "top_colour" else BAG].split()) | (
            {"t", "t-shirt"} if kind == "top_colour" else {"back", "shoulder", "hand", "sling", "cross"}
        )
        return [i for i, w in enumerate(words) if len(w) == 2 and w[0] == value and w[1] in garment]
    names = {
        "glasses": {"glasses", "spectacles", "eyeglasses"},
        "sunglasses": {"sunglasses", "shades"},
        "cap": {"cap"},
        "beanie": {"beanie"},
        "hat": {"hat"},
        "backpack": {"backpack", "bookbag", "rucksack"},
        "shoulder bag": {"shoulder", "sling"},
        "handbag": {"handbag", "purse"},
    }[value]
    return [i for i, w in enumerate(words) if w[-1] in names or (len(w) == 2 and w[0] in names and w[1] == "bag")]


@torch.inference_mode()
def counterfactuals(
    model: LGUR, data: str | Path, split: str, limit: int | None = 150, batch_size: int = 16, seed: int = 0
) -> dict[str, Any]:
    """Pairs (the same person and camera, one attribute changed): does the old value's phrase lose and
    the new one's gain, and is the prototype of the largest part-similarity drop the one that reads the
    changed pixels most (and would the mean map have picked it)?"""
    entries = split_entries(data, split, limit)
    size = tuple(model.config.image.img_size)
    rng = np.random.default_rng(seed)
    model.eval()
    pairs = []
    for n, entry in enumerate(entries):
        attributes, camera = Attributes.from_dict(entry["attributes"]), Camera.from_dict(entry["camera"])
        kinds = COUNTERFACTUAL_KINDS[n % len(COUNTERFACTUAL_KINDS) :] + COUNTERFACTUAL_KINDS
        for kind in kinds:  # this image's kind, or the next that applies
            changed = counterfactual(attributes, kind, rng)
            if changed is not None:
                break
        if camera.view == "back" and kind == "glasses":  # glasses are never seen from behind
            continue
        before, after = render(attributes, camera), render(changed, camera)
        differs = np.abs(np.asarray(before.image, np.int16) - np.asarray(after.image, np.int16)).max(-1) > 12
        if not differs.any():
            continue
        jpeg = [Image.open(io.BytesIO(encode_jpeg(r.image, camera.jpeg_quality))) for r in (before, after)]
        pairs.append((kind, attributes, changed, jpeg, differs))
    terms = model.config.detail_terms
    phrase_ok, part_ok, template_ok, by_kind = [], [], [], {}
    maps_all = []
    results = []
    for chunk in _batches(pairs, batch_size):
        first = _pixels([p[3][0] for p in chunk], size)
        second = _pixels([p[3][1] for p in chunk], size)
        a, b = model.explain_images(first), model.explain_images(second)
        rows, cols = a.prototype_shape
        maps = ((a.prototype_attention[:, -1].mean(1) + b.prototype_attention[:, -1].mean(1)) / 2).unflatten(
            -1, (rows, cols)
        )
        drop = 1 - (F.normalize(a.parts, dim=-1) * F.normalize(b.parts, dim=-1)).sum(-1)  # (B, P)
        probs_a = torch.sigmoid(a.detail_logits) if a.detail_logits is not None else None
        probs_b = torch.sigmoid(b.detail_logits) if b.detail_logits is not None else None
        maps_all.append(maps)
        for i, (kind, old, new, _, differs) in enumerate(chunk):
            cells = torch.from_numpy(patch_part_fractions(differs.astype(np.uint8), (rows, cols))[:, 1])  # (cells,)
            reads = (maps[i].flatten(1) * cells).sum(-1)  # (P,) attention on the changed pixels
            results.append((kind, int(drop[i].argmax()), int(reads.argmax()), cells))
            if probs_a is not None:
                old_rows = phrase_rows_for(terms, kind, getattr(old, kind))
                new_rows = phrase_rows_for(terms, kind, getattr(new, kind))
                checks = []
                if old_rows:
                    checks.append(float(probs_b[i, old_rows].max()) < float(probs_a[i, old_rows].max()))
                if new_rows:
                    checks.append(float(probs_b[i, new_rows].max()) > float(probs_a[i, new_rows].max()))
                if checks:
                    phrase_ok.append(all(checks))
                    by_kind.setdefault(kind, {"phrase": [], "part": []})["phrase"].append(all(checks))
    mean_map = torch.cat(maps_all).mean(0).flatten(1) if maps_all else None  # (P, cells): the template
    for kind, dropped, reader, cells in results:
        part_ok.append(dropped == reader)
        template_ok.append(dropped == int((mean_map * cells).sum(-1).argmax()))
        by_kind.setdefault(kind, {"phrase": [], "part": []})["part"].append(dropped == reader)

    def pct(values: list[bool]) -> float:
        return 100 * float(np.mean(values)) if values else float("nan")

    return {
        "split": split,
        "pairs": len(results),
        "phrase_pairs": len(phrase_ok),
        "phrase_old_loses_new_gains": pct(phrase_ok),
        "largest_drop_reads_change": pct(part_ok),
        "template_largest_drop": pct(template_ok),
        "chance": 100 / model.config.num_prototypes,
        "by_kind": {
            k: {"phrase": pct(v["phrase"]), "part": pct(v["part"]), "pairs": len(v["part"])}
            for k, v in sorted(by_kind.items())
        },
    }


def effective_atoms(weights: Tensor, mask: Tensor | None = None) -> Tensor:
    """(B, H, L, atoms) -> (B, L): exp of the entropy of each position's heads-averaged atom weights."""
    p = weights.mean(1)
    effective = (-(p * p.clamp(min=1e-12).log()).sum(-1)).exp()
    return effective if mask is None else effective * mask.to(effective.dtype)


@torch.inference_mode()
def dictionary_sparsity(
    model: LGUR, data: str | Path, split: str, limit: int | None = 200, batch_size: int = 32
) -> dict[str, Any]:
    """Effective atoms per patch (every patch; and person patches alone) and per word, and the atoms'
    specificity (atom_specificity), against a uniform template's 400."""
    if model.dga is None:
        raise ValueError("this model has no dictionary")
    entries = split_entries(data, split, limit)
    size = tuple(model.config.image.img_size)
    model.eval()
    patches, person, words = [], [], []
    texts = [c for e in entries for c in e["captions"]]
    for chunk in _batches(entries, batch_size):
        images = torch.from_numpy(np.stack([read_image(Path(data) / "imgs" / e["file_path"], size) for e in chunk]))
        explained = model.explain_images(normalize(images))
        eff = effective_atoms(explained.dictionary_weights)  # (B, N)
        patches.append(eff.flatten())
        for i, entry in enumerate(chunk):
            on_person = patch_part_fractions(label_map(data, entry), explained.grid)[:, 0] < 0.5
            person.append(eff[i][torch.from_numpy(on_person)])
    for chunk in _batches(texts, 64):
        ids, mask = model.tokenize(chunk)
        explained = model.explain_texts(mask, ids)
        words.append(effective_atoms(explained.dictionary_weights)[mask])
    return {
        "split": split,
        "atoms": model.config.num_atoms,
        "uniform_template": model.config.num_atoms,
        "per_patch": float(torch.cat(patches).mean()),
        "per_person_patch": float(torch.cat(person).mean()),
        "per_word": float(torch.cat(words).mean()),
        "specificity": atom_specificity(model, texts),
    }


@torch.inference_mode()
def atom_specificity(model: LGUR, captions: list[str], top: int = 5, min_count: int = 5) -> dict[str, Any]:
    """For the atoms that rebuild the captions most (each caption's `top` atoms, heads and words
    averaged), each atom's most specific word: its weight on the atom over the atom's average weight
    over words (1 = no more than any word). The share of those atoms whose word is >= 3x."""
    from ..search.atoms import word_spans

    encoder = model.text_encoder
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    shown: set[int] = set()
    for chunk in _batches(captions, 64):
        encoded = encoder.encode(
            chunk, truncation=True, max_length=encoder.max_length, padding=True, return_offsets_mapping=True
        )
        ids = torch.tensor(encoded["input_ids"])
        mask = torch.tensor(encoded["attention_mask"], dtype=torch.bool)
        weights = model.explain_texts(mask, ids).dictionary_weights.mean(1).numpy()  # (B, T, atoms)
        for b, text in enumerate(chunk):
            offsets, spans = encoded["offset_mapping"][b], word_spans(encoded.word_ids(b))
            per_word = []
            for span in spans:
                word = text[offsets[span[0]][0] : offsets[span[-1]][1]].lower()
                w = weights[b, span].mean(0)
                sums[word] = sums.get(word, 0) + w
                counts[word] = counts.get(word, 0) + 1
                per_word.append(w)
            if per_word:
                shown.update(int(a) for a in np.argsort(-np.mean(per_word, 0))[:top])
    vocabulary = [w for w in sorted(sums) if counts[w] >= min_count]
    if not vocabulary:
        return {"atoms_shown": 0}
    from ..search.atoms import describing

    table = np.stack([sums[w] / counts[w] for w in vocabulary])  # (W, atoms)
    average = table.mean(0)  # each atom's average weight over words
    usable = describing(vocabulary, model.config.detail_terms)  # as the page names atoms (explain.atom_names)
    ratios, named = [], {}
    for atom in sorted(shown):
        best = int(np.argmax(np.where(usable, table[:, atom], -np.inf)))
        ratio = float(table[best, atom] / max(average[atom], 1e-12))
        ratios.append(ratio)
        named[str(atom)] = {"word": vocabulary[best], "ratio": round(ratio, 2)}
    ratios_ = np.array(ratios)
    return {
        "atoms_shown": len(ratios),
        "median_ratio": float(np.median(ratios_)),
        "share_at_least_3x": 100 * float((ratios_ >= 3).mean()),
        "atoms": named,
    }


def faithfulness(
    model: LGUR,
    data: str | Path,
    framed: str | Path,
    split: str = "val",
    limit: int | None = 200,
    assignment: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Every measure above on `framed`'s split (a detector-framed world of the same seed), with the
    fixed-point template read off `data`'s training labels; assignment: the part each prototype is
    scored on in the pointing game (read on val; default: on this split)."""
    from .quality import explanation_quality

    points = part_points(data)
    small = None if limit is None else max(limit // 2, 1)
    maps = explanation_quality(model, framed, split, limit, points=points)
    result = {
        "split": split,
        "pointing": pointing(model, framed, split, points, limit, assignment=assignment),
        "word_maps": maps.get("pointing_game"),
        "detail_maps": maps.get("phrase_pointing_game"),
        "equivariance": equivariance(model, framed, split, small),
        "deletion": deletion(model, framed, split, small),
        "counterfactuals": counterfactuals(model, framed, split, limit),
    }
    if model.dga is not None:
        result["dictionary"] = dictionary_sparsity(model, framed, split, limit)
    return result


def format_faithfulness(result: dict[str, Any]) -> str:
    """One table: each measure, the model's figure, what the templates score, the target."""
    rows = [("measure", "model", "fixed point", "centre", "uniform / mean map", "target")]

    def pct(x: float | None) -> str:
        return "-" if x is None or x != x else f"{x:.1f}"

    p = result["pointing"]
    rows.append(
        (
            "pointing game, prototype maps (% on their part)",
            pct(p["model"]),
            pct(p["fixed_point"]),
            pct(p["centre"]),
            pct(p["uniform"]),
            "fixed point + 15",
        )
    )
    for key, name in (("word_maps", "word (guidance) maps"), ("detail_maps", "detail maps")):
        g = result.get(key)
        if g:
            rows.append(
                (
                    f"pointing game, {name}",
                    pct(g["accuracy"]),
                    pct(g.get("fixed_point")),
                    pct(g.get("centre")),
                    pct(g.get("uniform")),
                    "fixed point + 15",
                )
            )
    e = result["equivariance"]
    drawn = ", ".join(f"{x:.2f}" for x in e["drawn_layer"])
    rows.append(("equivariance, drawn layer (centroid move / person move)", drawn, "0", "0", "0", ">= 0.7 each"))
    rows.append(("equivariance, first layer", ", ".join(f"{x:.2f}" for x in e["first_layer"]), "0", "0", "0", ""))
    d = result["deletion"]
    rows.append(
        (
            "deletion: part-vector drop, top 10% blanked",
            f"{d['model_drop']:.4f} ({d['ratio']:.2f}x)",
            "",
            "",
            f"{d['template_drop']:.4f}",
            ">= 2x the mean map's",
        )
    )
    c = result["counterfactuals"]
    rows.append(
        ("counterfactuals: old phrase loses, new gains (%)", pct(c["phrase_old_loses_new_gains"]), "", "", "", ">= 90")
    )
    rows.append(
        (
            "counterfactuals: largest drop = prototype reading the change (%)",
            pct(c["largest_drop_reads_change"]),
            "",
            "",
            f"{pct(c['template_largest_drop'])} (chance {c['chance']:.0f})",
            ">= 70",
        )
    )
    if "dictionary" in result:
        dg = result["dictionary"]
        rows.append(
            (
                "DGA effective atoms per patch / person patch / word",
                f"{dg['per_patch']:.1f} / {dg['per_person_patch']:.1f} / {dg['per_word']:.1f}",
                "",
                "",
                str(dg["uniform_template"]),
                "<= 25",
            )
        )
        sp = dg["specificity"]
        if sp.get("atoms_shown"):
            rows.append(
                ("DGA atoms shown with a word >= 3x its average (%)", pct(sp["share_at_least_3x"]), "", "", "", "100")
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"explanations on {result.get('split', '?')} (detector-framed); templates ignore the image"]
    for n, row in enumerate(rows):
        lines.append("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def summary_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The headline figures of a faithfulness result beside their templates, as (what, figure) rows for
    the Model tab."""
    if not result:
        return []
    rows = []
    p = result["pointing"]
    templates = f"a fixed point per part {p['fixed_point']:.1f}%, the centre {p['centre']:.1f}%"
    rows.append(("prototype maps on their part, detector-framed crops", f"{p['model']:.1f}% ({templates})"))
    for key, name in (("word_maps", "word maps on their part"), ("detail_maps", "detail maps on their part")):
        if result.get(key):
            g = result[key]
            rows.append(
                (name, f"{g['accuracy']:.1f}% (a fixed point per part {g.get('fixed_point', float('nan')):.1f}%)")
            )
    e = result["equivariance"]["drawn_layer"]
    rows.append(("maps follow a moved person (1 = fully, a template 0)", ", ".join(f"{x:.2f}" for x in e)))
    d, c = result["deletion"], result["counterfactuals"]
    rows.append(("blanking a map's strongest 10%", f"hurts its part {d['ratio']:.2f}x as much as the mean map's"))
    rows.append(
        (
            "one attribute changed",
            f"its phrases move the right way {c['phrase_old_loses_new_gains']:.1f}%; the "
            f"largest drop on the prototype reading it {c['largest_drop_reads_change']:.1f}% (mean map "
            f"{c['template_largest_drop']:.1f}%, chance {c['chance']:.1f}%)",
        )
    )
    if "dictionary" in result:
        g = result["dictionary"]
        rows.append(("atoms rebuilding a patch / a word (of 400)", f"{g['per_patch']:.1f} / {g['per_word']:.1f}"))
    return rows
