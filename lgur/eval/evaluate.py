"""Text-to-image retrieval metrics, CUHK-PEDES protocol.

Every caption of the split is a query; the gallery is every image of the split; a
hit is any image of the same identity. Also reported: the variant that removes
each caption's own source image from its gallery (a harder, cross-camera test).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data.dataset import RetrievalSplit, TextFeatures, build_split, frozen_text_features, normalize
from ..data.readers import Record
from ..files import atomic_write_bytes
from ..model.checkpoint import card_path
from ..model.details import detail_scores
from ..model.lgur import LGUR
from ..search.query import QueryReader

RANKS = (1, 5, 10)
GROUNDED_PARAPHRASE = "test-paraphrase+colour-grounding"  # the card's entry for that split, grounded
READ_PARAPHRASE = "test-paraphrase+read-as-app"  # colour grounding and word forms (lgur.search.reading)


@torch.inference_mode()
def image_features(model: LGUR, images: Tensor, batch_size: int = 128) -> tuple[Tensor, Tensor | None]:
    """uint8 (N, 3, H, W) -> (N, E) unit-norm embeddings and, for a model with a detail detector, the
    images' (N, K) phrase lifts (lgur.model.details) from the same pass; else None."""
    model.eval()
    device = next(model.parameters()).device
    embeddings, lifts = [], []
    for i in range(0, len(images), batch_size):
        explained = model.explain_images(normalize(images[i : i + batch_size]).to(device), need_weights=False)
        embeddings.append(explained.embedding.cpu())
        if explained.detail_logits is not None:
            lifts.append(model.details.lift(explained.detail_logits).cpu())
    empty = torch.empty(0, model.config.embedding_dim)
    return (torch.cat(embeddings) if embeddings else empty), (torch.cat(lifts) if lifts else None)


def image_embeddings(model: LGUR, images: Tensor, batch_size: int = 128) -> Tensor:
    """uint8 (N, 3, H, W) -> (N, E) unit-norm embeddings."""
    return image_features(model, images, batch_size)[0]


@torch.inference_mode()
def caption_embeddings(model: LGUR, features: TextFeatures, batch_size: int = 256) -> Tensor:
    model.eval()
    out = []
    device = next(model.parameters()).device
    for start in range(0, len(features.lengths), batch_size):
        feats, mask = features.batch(list(range(start, min(start + batch_size, len(features.lengths)))))
        explained = model.explain_texts(mask.to(device), backbone_features=feats.to(device), need_weights=False)
        out.append(explained.embedding.cpu())
    return torch.cat(out)


def retrieval_metrics(
    similarity: Tensor, query_ids: Tensor, gallery_ids: Tensor, exclude: Tensor | None = None, cmc_depth: int = 50
) -> dict[str, Any]:
    """similarity (Q, G). exclude: (Q,) gallery index removed from each query's gallery (or None)."""
    sim = similarity.clone().float()
    matches = query_ids[:, None] == gallery_ids[None, :]  # (Q, G)
    if exclude is not None:
        rows = torch.arange(len(sim))
        sim[rows, exclude] = float("-inf")
        matches[rows, exclude] = False
    keep = matches.any(dim=1)  # queries with at least one true image left
    sim, matches = sim[keep], matches[keep]
    order = sim.argsort(dim=1, descending=True)
    hits = matches.gather(1, order)  # (Q, G) sorted by score
    if exclude is not None:
        hits = hits[:, :-1]  # the excluded image sits last
    first = hits.float().argmax(dim=1)  # rank of the first hit (0-based)
    cmc = [(first < k).float().mean().item() * 100 for k in range(1, cmc_depth + 1)]
    cum = hits.float().cumsum(dim=1)
    ranks = torch.arange(1, hits.shape[1] + 1, dtype=torch.float32)
    ap = ((cum / ranks) * hits).sum(dim=1) / hits.sum(dim=1)
    result = {f"R@{k}": cmc[k - 1] for k in RANKS}
    result |= {"mAP": ap.mean().item() * 100, "queries": int(keep.sum()), "cmc": cmc}
    return result


def evaluate_split(
    model: LGUR, split: RetrievalSplit, features: TextFeatures, details: list[str] | None = None
) -> dict[str, Any]:
    """details: the captions, to add the detail detector's score (lgur.model.details) as the app ranks."""
    image_emb, lift = image_features(model, split.images)
    text_emb = caption_embeddings(model, features)
    similarity = text_emb @ image_emb.t()
    if details is not None:
        similarity = similarity + detail_scores(model.config, details, lift)
    standard = retrieval_metrics(similarity, split.caption_ids, split.image_ids)
    cross = retrieval_metrics(similarity, split.caption_ids, split.image_ids, exclude=split.caption_image)
    return {"standard": standard, "exclude_own_image": cross, "similarity": similarity}


def attribute_breakdown(
    similarity: Tensor, split: RetrievalSplit, side_file: str | Path, mentions_key: str = "mentions"
) -> dict[str, dict[str, float]]:
    """On the synthetic world: R@1 over the captions that mention each attribute kind."""
    side = json.loads(Path(side_file).read_text())
    first_hit = retrieval_first_hit(similarity, split.caption_ids, split.image_ids)
    by_kind: dict[str, list[bool]] = defaultdict(list)
    q = 0
    for record in split.records:
        info = side[record.file_path]
        for mentions in info[mentions_key][: len(record.captions)]:
            for kind in {k for k, _ in mentions}:
                by_kind[kind].append(bool(first_hit[q] == 0))
            q += 1
    return {k: {"R@1": 100 * sum(v) / len(v), "captions": len(v)} for k, v in sorted(by_kind.items())}


def retrieval_first_hit(similarity: Tensor, query_ids: Tensor, gallery_ids: Tensor) -> Tensor:
    order = similarity.argsort(dim=1, descending=True)
    hits = (query_ids[:, None] == gallery_ids[None, :]).gather(1, order)
    return hits.float().argmax(dim=1)


def plot_cmc(curves: dict[str, list[float]], out: str | Path, title: str = "CMC (text to image)") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for name, cmc in curves.items():
        ax.plot(range(1, len(cmc) + 1), cmc, label=name)
    ax.set_xlabel("rank")
    ax.set_ylabel("recall (%)")
    ax.set_title(title)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


# -- a checkpoint on a dataset's splits ------------------------------------------------------


def _rounded(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in metrics.items() if k != "cmc"}


def split_metrics(
    model: LGUR,
    records: list[Record],
    name: str,
    data: str | Path,
    cache: str | Path | None,
    reader: QueryReader | None = None,
    details: bool = False,
) -> tuple[dict[str, Any], list[float]]:
    """R@k and mAP of one split (own image excluded too; per attribute kind on the synthetic world)
    -> (metrics as recorded in a card, the CMC curve). With a `reader`, each caption is read as the
    app reads queries first (colour grounding, word forms: lgur.search.reading); with `details`, the detail
    detector's score is added (as the app ranks)."""
    split = build_split(records, model.config.image.img_size)
    captions = [reader.read(c).text for c in split.captions] if reader else split.captions
    features = frozen_text_features(model.text_encoder, captions, cache)
    result = evaluate_split(model, split, features, captions if details else None)
    metrics = _rounded(result["standard"]) | {"exclude_own_image": _rounded(result["exclude_own_image"])}
    side = Path(data) / "synthetic_attributes.json"
    if side.is_file():
        key = "paraphrase_mentions" if name == "test-paraphrase" else "mentions"
        metrics["by_attribute"] = attribute_breakdown(result["similarity"], split, side, key)
    return metrics, result["standard"]["cmc"]


def score_test_splits(
    model: LGUR,
    data: str | Path,
    splits: dict[str, list[Record]],
    cache: str | Path | None,
    cmc_plot: Path | None = None,
    vocabulary: list[str] | None = None,
) -> dict[str, Any]:
    """The test splits' metrics and CMC curves, as a card records them: {"metrics", "cmc"}. With the
    training `vocabulary`, test-paraphrase is also scored with colour grounding alone (its own
    entry); a model with a detail detector is also scored as the app ranks ("...+details"), the
    paraphrases read as the app reads them (colour grounding and word forms)."""
    metrics: dict[str, Any] = {}
    curves = {}
    for name in ("test", "test-paraphrase"):
        if splits.get(name):
            metrics[name], curves[name] = split_metrics(model, splits[name], name, data, cache)
    paraphrases = splits.get("test-paraphrase") if vocabulary else None
    if paraphrases:
        grounded = split_metrics(
            model, paraphrases, "test-paraphrase", data, cache, QueryReader(vocabulary, forms=False)
        )
        metrics[GROUNDED_PARAPHRASE], curves[GROUNDED_PARAPHRASE] = grounded
    if model.details is not None and model.config.detail_weight > 0:  # also as the app ranks
        ranked = [("test", "test+details", None)]
        if paraphrases:
            ranked.append(
                ("test-paraphrase", f"{READ_PARAPHRASE}+details", QueryReader(vocabulary, model.config.detail_terms))
            )
        for name, entry, reader in ranked:
            if splits.get(name):
                metrics[entry], curves[entry] = split_metrics(
                    model, splits[name], name, data, cache, reader, details=True
                )
    if curves and cmc_plot:
        plot_cmc(curves, cmc_plot)
    return {"metrics": metrics, "cmc": {k: [round(x, 2) for x in v] for k, v in curves.items()}}


def record_in_card(checkpoint: Path, card: dict[str, Any]) -> None:
    atomic_write_bytes(card_path(checkpoint), json.dumps(card, indent=2).encode())


def evaluation_report(checkpoint: str | Path, split: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """What `evaluate --json` prints: one split's metrics (as `split_metrics` returns them)."""
    extras = ("exclude_own_image", "by_attribute")
    report = {
        "checkpoint": str(checkpoint),
        "split": split,
        "standard": {k: v for k, v in metrics.items() if k not in extras},
    }
    return report | {k: metrics[k] for k in extras if k in metrics}


def format_metrics(metrics: dict[str, Any]) -> str:
    """One split's metrics (as `split_metrics` returns them), as printed by `evaluate`."""
    lines = []
    for name, m in (("standard", metrics), ("exclude_own_image", metrics["exclude_own_image"])):
        lines.append(
            f"{name:18s} R@1 {m['R@1']:.2f}  R@5 {m['R@5']:.2f}  R@10 {m['R@10']:.2f}  mAP {m['mAP']:.2f}"
            f"  ({m['queries']} queries)"
        )
    for kind, m in metrics.get("by_attribute", {}).items():
        lines.append(f"  captions mentioning {kind:16s} R@1 {m['R@1']:.2f} ({m['captions']})")
    return "\n".join(lines)
