"""How good are the explanations? Measured against the synthetic world's part labels.

- Foreground weights: ROC-AUC of the per-patch weight m for "this patch is mostly person".
- Prototypes: the share of each prototype's attention that falls on each body part,
  next to the share a uniform attention would give (the parts' area), so specialisation
  shows as a departure from area; each prototype's region label; their overlap. Beside them, the
  least background a map at the model's grid can read while on a part (background_floor): a patch
  holds some background wherever a part is smaller than a patch, so at 12x4 a map on the shoes
  reads close to half background however sharp it is.
- Cross-modality guidance: the pointing game (Zhang et al., ECCV 2016). For each caption
  word that names a garment or accessory of one part, does the peak of its guidance map
  (how much that word contributes to each patch: attention, times the foreground weight m
  where the model learns m, as the app shows it), upsampled to the image's pixels, fall
  within 15/224 of the image height of that part's pixels (Zhang et al.'s 15 pixels at 224)? Counted in pixels, not
  patches, so a coarser grid does not score higher. Also the share of the map's energy inside
  the part.
- Shared dictionary: how many of their top-20 atoms a caption and an image share, for
  matching and for non-matching pairs; by raw weight, and by weight relative to the average
  caption's / image's (what the app ranks by: atoms every description uses say nothing).
- Details kept (details=True): can a linear probe read an attribute (shoe colour, bag colour, ...)
  from the image encoder's features over that part's patches, and from the retrieval embedding?
  A detail the first has and the second lacks is lost on the way to the embedding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..data.dataset import normalize
from ..files import read_image
from ..model.details import PART_WORDS, WORD_PART, phrase_index, phrase_rows
from ..model.lgur import LGUR
from ..model.pgu import prototype_overlap
from ..search.atoms import TOP_ATOMS, encoded_atom_histograms
from ..synth.render import BAG, LOWER, PARTS, SHOES, UPPER
from .pointing import patch_part_fractions, pointing_hit, template_map, uniform_hit

REGION_NAMES = {
    "background": "background",
    "hair/head": "head",
    "skin": "skin",
    "upper": "upper body",
    "lower": "lower body",
    "shoes": "feet",
    "bag": "bag",
    "accessory": "accessories",
}


# attribute -> the part whose patches carry it (detail probe)
DETAILS = {"top_colour": UPPER, "top_type": UPPER, "bottom_colour": LOWER, "shoe_colour": SHOES, "bag_colour": BAG}


def linear_probe(features: np.ndarray, labels: list[str], groups: np.ndarray, ridge: float = 0.01) -> float:
    """Balanced accuracy (%) of a ridge-regression classifier, 2-fold cross-validated with the
    folds split by group (identity), so no person is both trained on and tested."""
    classes = sorted(set(labels))
    target = np.eye(len(classes))[[classes.index(v) for v in labels]]
    x = np.asarray(features, dtype=np.float64)
    fold = np.asarray(groups) % 2 == 0
    scores = []
    for train in (fold, ~fold):
        if not train.any() or train.all():
            continue
        mean, std = x[train].mean(0), x[train].std(0) + 1e-6
        a = np.hstack([(x[train] - mean) / std, np.ones((train.sum(), 1))])
        b = np.hstack([(x[~train] - mean) / std, np.ones(((~train).sum(), 1))])
        w = np.linalg.solve(a.T @ a + ridge * len(a) * np.eye(a.shape[1]), a.T @ target[train])
        predicted, true = (b @ w).argmax(1), target[~train].argmax(1)
        scores.append(np.mean([np.mean(predicted[true == c] == c) for c in np.unique(true)]))
    return 100 * float(np.mean(scores))


def energy_inside(word_map: np.ndarray, part_fraction: np.ndarray) -> float:
    """Share of the map's mass on the part's pixels (patches weighted by their part fraction)."""
    total = float(word_map.sum())
    return float((word_map * part_fraction).sum() / total) if total > 0 else 0.0


def top_atom_overlap(a: Tensor, b: Tensor, k: int = TOP_ATOMS) -> Tensor:
    """(B, atoms) x (B, atoms) -> (B,) share of the k strongest atoms the two have in common."""
    k = min(k, a.shape[1])  # a dictionary of fewer atoms: all of them
    top_a = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, dim=1).indices, True)
    top_b = torch.zeros_like(b, dtype=torch.bool).scatter_(1, b.topk(k, dim=1).indices, True)
    return (top_a & top_b).sum(1).float() / k


def shared_atom_counts(texts: Tensor, images: Tensor, own: Tensor, other: Tensor, k: int = TOP_ATOMS) -> dict:
    """Top-k atoms in common: each caption with its own image (`own`: image row per caption) and
    with another identity's image (`other`; -1: no such pair)."""
    match = top_atom_overlap(texts, images[own], k)
    keep = other >= 0
    mismatch = top_atom_overlap(texts[keep], images[other[keep]], k)

    def summary(x: Tensor) -> dict[str, float]:
        return {"mean_shared": float(x.mean() * k), "any_shared": 100 * float((x > 0).float().mean()), "pairs": len(x)}

    return {"top": k, "matching_pairs": summary(match), "non_matching_pairs": summary(mismatch)}


def region_labels(share: np.ndarray, area: np.ndarray, min_ratio: float = 2.0) -> dict[str, Any]:
    """Name each prototype by a body part it concentrates on (>= min_ratio x the part's area share).

    Prototypes are matched to distinct parts (as many as possible, then the strongest
    concentrations: a linear assignment), so two prototypes that both over-attend the small
    head are not both called "head" when one of them also stands out on the lower body.
    Unmatched prototypes take their strongest part if it passes min_ratio, else "mixed".
    """
    from scipy.optimize import linear_sum_assignment

    ratio = share / np.maximum(area, 1e-9)  # (P, parts)
    body = ratio[:, 1:]  # a region names a body part, not the background
    valid = body >= min_ratio
    gain = np.where(valid, 1000.0 + np.log(np.maximum(body, 1e-9)), 0.0)
    rows, cols = linear_sum_assignment(-gain)
    assignment = {int(p): int(c) + 1 for p, c in zip(rows, cols) if valid[p, c]}
    labels = []
    for p in range(len(ratio)):
        part = assignment.get(p, int(np.argmax(body[p])) + 1 if valid[p].any() else None)
        labels.append(REGION_NAMES[PARTS[part]] if part is not None else "mixed")
    return {
        "labels": labels,
        "ratio_to_area": ratio.round(2).tolist(),
        "distinct_regions": len(assignment),
        "assignment": {f"P{p + 1}": PARTS[part] for p, part in sorted(assignment.items())},
    }


def background_floor(fractions: list[np.ndarray]) -> dict[str, dict[str, float]]:
    """The least background a map on each part can read at this grid, from the images' patch part
    fractions (each (N, parts)): a map shaped like the part (attention in proportion to the part's
    pixels in each patch) and a map on the part's best patch alone, their background shares averaged
    over the images where the part is visible (as explanation_quality counts it). A prototype's
    background share can only approach these; -> {part: {"part_shaped", "best_patch", "images"}}."""
    floors: dict[str, dict[str, float]] = {}
    for part in range(1, len(PARTS)):
        shaped, best = [], []
        for f in fractions:
            if f[:, part].sum() < 0.5:  # hardly visible
                continue
            shaped.append(float(f[:, 0] @ f[:, part] / f[:, part].sum()))
            best.append(float(f[np.argmax(f[:, part]), 0]))
        if shaped:
            floors[PARTS[part]] = {
                "part_shaped": float(np.mean(shaped)),
                "best_patch": float(np.mean(best)),
                "images": len(shaped),
            }
    return floors


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum (Mann-Whitney U) statistic, ties averaged."""
    from scipy.stats import rankdata

    labels = labels.astype(bool)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


@torch.inference_mode()
def explanation_quality(
    model: LGUR,
    data: str | Path,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 64,
    details: bool = False,
    points: np.ndarray | None = None,
) -> dict[str, Any]:
    """points: (parts, 2) each part's mean position (lgur.eval.faithfulness.part_points): each pointing-game
    hit is then scored beside what a template scores on the same (image, part): a fixed point per part,
    the centre, a uniform map."""
    data = Path(data)
    annotations = [a for a in json.loads((data / "reid_raw.json").read_text()) if a["split"] == split][:limit]
    side = json.loads((data / "synthetic_attributes.json").read_text())
    size, grid = model.config.image.img_size, model.image_encoder.grid
    model.eval()
    fg_scores, fg_labels, overlaps = [], [], []
    pointing: dict[str, list[tuple[float, ...]]] = {PARTS[p]: [] for p in PART_WORDS}
    phrase_pointing: dict[str, list[tuple[float, ...]]] = {PARTS[p]: [] for p in PART_WORDS}
    phrases = phrase_index(model.config.detail_terms) if model.details is not None else None
    caption_atoms, image_atoms, pair_image, other_image = [], [], [], []
    rng = np.random.default_rng(0)
    kept: dict[str, dict[str, list]] = {
        kind: {"region": [], "embedding": [], "label": [], "group": []} for kind in DETAILS
    }

    def templates(mask: np.ndarray, part: int) -> tuple[float, ...]:
        """What the fixed point, the centre and a uniform map score on this (image, part)."""
        if points is None:
            return ()

        return (
            float(pointing_hit(template_map(points[part], grid), mask)),
            float(pointing_hit(template_map((0.5, 0.5), grid), mask)),
            uniform_hit(mask),
        )

    share = np.zeros((model.config.num_prototypes, len(PARTS)))
    area = np.zeros(len(PARTS))
    every_fractions: list[np.ndarray] = []  # each image's (N, parts) at the prototype maps' grid, for background_floor
    for start in range(0, len(annotations), batch_size):
        chunk = annotations[start : start + batch_size]
        images = torch.from_numpy(np.stack([read_image(data / "imgs" / a["file_path"], size) for a in chunk]))
        explained = model.explain_images(normalize(images))
        if explained.prototype_attention is not None:  # (B, layers, H, P, N) -> last layer
            overlaps.append(prototype_overlap(explained.prototype_attention[:, -1]))
        # every caption of the chunk with its own image
        captions = [(i, c) for i, a in enumerate(chunk) for c in a["captions"]]
        encoded = model.text_encoder.encode(
            [c for _, c in captions],
            padding=True,
            truncation=True,
            max_length=model.text_encoder.max_length,
            return_tensors="pt",
        )
        ids, mask = encoded["input_ids"], encoded["attention_mask"].bool()
        owner = torch.tensor([i for i, _ in captions])
        guidance = None
        if model.dga is not None:
            guidance = model.guidance_attention(normalize(images[owner]), ids, mask, model.learns_foreground)
            guidance = guidance.mean(1)  # (C, N, T)
            # as the app computes them: a caption's histogram is the mean over its words
            caption_atoms.append(torch.from_numpy(encoded_atom_histograms(model, encoded)))
            image_atoms.append(explained.atom_histogram)  # (B, atoms)
            other = (owner.numpy() + rng.integers(1, len(chunk), len(owner))) % len(chunk)
            different = [chunk[o]["id"] != chunk[i]["id"] for o, i in zip(other.tolist(), owner.tolist())]
            pair_image.append(owner + start)
            other_image.append(torch.from_numpy(np.where(different, other + start, -1)))  # -1: same identity
        where = model.find_details(normalize(images))[1].numpy() if phrases else None  # (B, N, K)
        fractions_of, label_maps = {}, {}
        for i, a in enumerate(chunk):
            with Image.open(data / side[a["file_path"]]["parts"]) as labels:
                label_maps[i] = np.asarray(labels)  # (H, W) part ids at the image's pixels
            fractions = patch_part_fractions(label_maps[i], grid)  # (N, parts)
            fractions_of[i] = fractions
            fine = explained.prototype_grid  # prototype maps finer than the patches (pgu_fine)
            map_fractions = fractions if fine is None else patch_part_fractions(label_maps[i], fine)
            every_fractions.append(map_fractions)
            if details:
                attributes = side[a["file_path"]]["attributes"]
                for kind, part in DETAILS.items():
                    weight = torch.from_numpy(fractions[:, part])
                    if weight.sum() < 0.5 or attributes.get(kind) in (None, "none"):  # hardly visible
                        continue
                    region = (weight[:, None] * explained.patch_features[i]).sum(0) / weight.sum()
                    for key, value in (
                        ("region", region.numpy()),
                        ("embedding", explained.embedding[i].numpy()),
                        ("label", attributes[kind]),
                        ("group", a["id"]),
                    ):
                        kept[kind][key].append(value)
            if where is not None:  # the detail detector's map of each phrase of its captions that names a part
                for row in {r for c in a["captions"] for r in phrase_rows(c, phrases)}:
                    part = WORD_PART.get(model.config.detail_terms[row].split()[-1])
                    if part is not None and fractions[:, part].sum() >= 0.5:
                        hit = pointing_hit(where[i, :, row].reshape(grid), label_maps[i] == part)
                        energy = energy_inside(where[i, :, row], fractions[:, part])
                        phrase_pointing[PARTS[part]].append((hit, energy, *templates(label_maps[i] == part, part)))
            person = 1.0 - fractions[:, 0]
            area += fractions.mean(0)
            if explained.foreground is not None:
                fg_scores.append(explained.foreground[i].numpy())
                fg_labels.append(person > 0.5)
            if explained.prototype_attention is not None:
                attention = explained.prototype_attention[i, -1].mean(0).numpy()  # (P, N), last layer
                share += attention @ map_fractions
        if guidance is not None:
            for row, (i, _) in enumerate(captions):
                fractions = fractions_of[i]
                word_ids = encoded.word_ids(row)
                for word in sorted({w for w in word_ids if w is not None}):
                    positions = [t for t, w in enumerate(word_ids) if w == word]
                    start, end = encoded.word_to_chars(row, word)
                    part = WORD_PART.get(captions[row][1][start:end].lower())
                    if part is None or fractions[:, part].sum() < 0.5:  # not named, or hardly visible
                        continue
                    word_map = guidance[row][:, positions].sum(1).numpy()  # (N,)
                    hit = pointing_hit(word_map.reshape(grid), label_maps[i] == part)
                    energy = energy_inside(word_map, fractions[:, part])
                    pointing[PARTS[part]].append((hit, energy, *templates(label_maps[i] == part, part)))
    n = len(annotations)
    result: dict[str, Any] = {"split": split, "images": n, "parts": PARTS}
    if fg_scores:
        scores, labels = np.concatenate(fg_scores), np.concatenate(fg_labels)
        result["foreground_auc"] = roc_auc(scores, labels)
        result["foreground_mean"] = {
            "person_patches": float(scores[labels].mean()),
            "background_patches": float(scores[~labels].mean()),
        }
    if explained.prototype_attention is not None:
        result["prototype_part_share"] = (share / n).round(4).tolist()
        result["prototype_overlap"] = float(torch.cat(overlaps).mean())
        result["prototype_regions"] = region_labels(share / n, area / n)
    result["part_area_share"] = (area / n).round(4).tolist()
    result["background_floor"] = background_floor(every_fractions)
    if any(pointing.values()):
        result["pointing_game"] = {"weighted_by_foreground": model.learns_foreground} | pointing_summary(pointing)
    if any(phrase_pointing.values()):  # the same game for the detail detector's maps (lgur.model.details)
        result["phrase_pointing_game"] = pointing_summary(phrase_pointing)
    if details:
        result["details"] = {
            kind: {
                "region_features": linear_probe(np.stack(v["region"]), v["label"], np.array(v["group"])),
                "embedding": linear_probe(np.stack(v["embedding"]), v["label"], np.array(v["group"])),
                "chance": 100 / len(set(v["label"])),
                "images": len(v["label"]),
            }
            for kind, v in kept.items()
            if len(set(v["label"])) > 1
        }
    if caption_atoms:
        texts, images = torch.cat(caption_atoms), torch.cat(image_atoms)
        own, other = torch.cat(pair_image), torch.cat(other_image)
        result["shared_atoms"] = shared_atom_counts(texts, images, own, other)
        # relative to the average caption's and image's (as the app ranks atoms)
        relative = texts / texts.mean(0).clamp(min=1e-6), images / images.mean(0).clamp(min=1e-6)
        result["shared_atoms"]["relative"] = shared_atom_counts(*relative, own, other)
    return result


def pointing_summary(pointing: dict[str, list[tuple[float, ...]]]) -> dict[str, Any]:
    """Pointing-game hits and energy inside the part, per part name -> accuracy and energy (%), overall and by part."""
    every = [x for v in pointing.values() for x in v]

    def figures(rows: list[tuple[float, ...]]) -> dict[str, Any]:
        out = {
            "accuracy": 100 * float(np.mean([r[0] for r in rows])),
            "energy_inside": 100 * float(np.mean([r[1] for r in rows])),
            "words": len(rows),
        }
        if rows and len(rows[0]) == 5:  # beside the templates on the same (image, part) pairs
            for k, name in ((2, "fixed_point"), (3, "centre"), (4, "uniform")):
                out[name] = 100 * float(np.mean([r[k] for r in rows]))
        return out

    return figures(every) | {"by_part": {part: figures(v) for part, v in pointing.items() if v}}


def _template(pointing: dict[str, Any]) -> str:
    """'; a fixed point per part 96.1%': what a map that ignores the image scores on the same words."""
    return f"; a fixed point per part {pointing['fixed_point']:.1f}%" if "fixed_point" in pointing else ""


def summary_rows(result: dict[str, Any], prototype_names: str = "") -> list[tuple[str, str]]:
    """The headline figures of an explanation_quality result, as (what, figure) rows for a model card."""
    rows = []
    if "prototype_overlap" in result:
        distinct = result.get("prototype_regions", {}).get("distinct_regions", "?")
        overlap = f"overlap {result['prototype_overlap']:.2f} (0 = disjoint maps)"
        rows.append(("prototypes", f"{prototype_names}; {overlap}; {distinct} on distinct body parts"))
    if result.get("background_floor"):  # why a map on the shoes reads floor: the grid, not the model
        floors = ", ".join(
            f"{REGION_NAMES.get(part, part)} {100 * f['part_shaped']:.0f}%"
            for part, f in result["background_floor"].items()
        )
        rows.append(("background in each part's own patches (this grid)", f"a map shaped like the part reads {floors}"))
    if "pointing_game" in result:
        pg = result["pointing_game"]
        energy = f"{pg['energy_inside']:.1f}% of the energy inside" + _template(pg)
        rows.append(("guidance pointing game", f"{pg['accuracy']:.1f}% of garment words peak on their part ({energy})"))
    if "phrase_pointing_game" in result:
        pg = result["phrase_pointing_game"]
        energy = f"{pg['energy_inside']:.1f}% of the weight inside" + _template(pg)
        rows.append(
            ("detail maps' pointing game", f"{pg['accuracy']:.1f}% of garment phrases peak on their part ({energy})")
        )
    if "shared_atoms" in result:
        sa = result["shared_atoms"]
        match, other = sa["matching_pairs"]["mean_shared"], sa["non_matching_pairs"]["mean_shared"]
        shared = f"{match:.1f} for a caption and its image, {other:.1f} for another person"
        if "relative" in sa:  # what the app ranks atoms by
            r = sa["relative"]
            r_match, r_other = r["matching_pairs"]["mean_shared"], r["non_matching_pairs"]["mean_shared"]
            shared = f"by weight relative to the average {r_match:.1f} vs {r_other:.1f}; by raw weight {shared}"
        rows.append(("shared dictionary", f"top-{sa['top']} atoms in common: {shared}"))
    return rows


def format_quality(result: dict[str, Any]) -> str:
    lines = []
    if "foreground_auc" in result:
        m = result["foreground_mean"]
        lines.append(
            f"foreground weights: ROC-AUC {result['foreground_auc']:.3f} for person vs background patches "
            f"(mean m {m['person_patches']:.3f} on person, {m['background_patches']:.3f} on background)"
        )
    if "prototype_overlap" in result:
        lines.append(
            f"prototype overlap: mean cosine between two prototypes' attention maps {result['prototype_overlap']:.3f} "
            "(1 = all read the same patches, 0 = disjoint)"
        )
    if "prototype_regions" in result:
        regions = result["prototype_regions"]
        lines.append(
            "prototype regions: "
            + ", ".join(f"P{p + 1} {label}" for p, label in enumerate(regions["labels"]))
            + f"; {regions['distinct_regions']} prototypes each on a different part (>= 2x its area share)"
        )
    games = (
        ("pointing_game", "guidance maps of {} part words", "energy"),
        ("phrase_pointing_game", "detail detector's maps of {} phrases naming a part", "weight"),
    )
    for key, maps, mass in games:
        if key in result:
            pg = result[key]
            lines.append(
                f"pointing game ({maps.format(pg['words'])}): {pg['accuracy']:.1f}% hit, "
                f"{pg['energy_inside']:.1f}% of the {mass} inside the part{_template(pg)}; "
                + ", ".join(f"{k} {v['accuracy']:.0f}% ({v['words']})" for k, v in pg["by_part"].items())
            )
    if "shared_atoms" in result:
        sa = result["shared_atoms"]
        for name, counts in (("raw weight", sa), ("weight relative to the average", sa.get("relative"))):
            if counts:
                m, o = counts["matching_pairs"], counts["non_matching_pairs"]
                lines.append(
                    f"shared dictionary, top-{sa['top']} atoms by {name}: caption vs its image {m['mean_shared']:.2f} "
                    f"({m['any_shared']:.0f}% share any), vs another identity's image {o['mean_shared']:.2f} "
                    f"({o['any_shared']:.0f}%)"
                )
    if "details" in result:
        lines.append(
            "details kept (linear probe, balanced accuracy: the image encoder's features over the part -> "
            "the retrieval embedding, chance): "
            + ", ".join(
                f"{kind.replace('_', ' ')} {v['region_features']:.1f}% -> {v['embedding']:.1f}% ({v['chance']:.1f}%)"
                for kind, v in result["details"].items()
            )
        )
    if result.get("background_floor"):
        lines.append(
            "least background a map on a part can read at this grid (shaped like the part; on its best patch "
            "alone): "
            + ", ".join(
                f"{part} {100 * f['part_shaped']:.1f}% ({100 * f['best_patch']:.1f}%)"
                for part, f in result["background_floor"].items()
            )
        )
    parts = result["parts"]
    header = "| prototype | " + " | ".join(parts) + " |"
    lines += ["", header, "|" + " --- |" * (len(parts) + 1)]
    for p, row in enumerate(result.get("prototype_part_share", [])):
        lines.append(f"| P{p + 1} | " + " | ".join(f"{100 * x:.1f}" for x in row) + " |")
    lines.append("| area (uniform) | " + " | ".join(f"{100 * x:.1f}" for x in result["part_area_share"]) + " |")
    return "\n".join(lines)
