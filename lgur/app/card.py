"""A checkpoint's card as a visitor reads it: what the model is, what it was trained on, what it scores."""

from __future__ import annotations

import html
from typing import Any

from ..eval.faithfulness import summary_rows as faithfulness_rows
from ..eval.quality import summary_rows


def training_data(card: dict[str, Any]) -> str:
    """'synthetic world (seed 0): 4,000 training identities, 10,019 images' or the dataset's folder name."""
    data = card.get("data", {})
    world = data.get("world", {})
    if world.get("spec"):
        spec, train = world["spec"], world.get("splits", {}).get("train", {})
        images = f", {train['images']:,} images" if "images" in train else ""
        identities = f"{spec.get('train_identities', 0):,} training identities"
        return f"synthetic world (seed {spec.get('seed')}): {identities}{images}"
    path = str(data.get("path", "")).rstrip("/")
    return path.rsplit("/", 1)[-1] if path else "not recorded"


def image_encoder(card: dict[str, Any]) -> str:
    image = card.get("config", {}).get("image", {})
    size = "x".join(str(x) for x in image.get("img_size", []))
    source = card.get("image_weights", {}).get("initialised_from")
    start = f", from ImageNet weights ({source['package']} {source['version']})" if source else ", trained from scratch"
    return f"{image.get('timm_name')} at {size}{start}"


def detail_detector(config: dict[str, Any]) -> str:
    terms, weight = config.get("detail_terms"), config.get("detail_weight")
    if not terms:
        return ""
    blocks = config.get("detail_stage_blocks", 1)
    copy = "the trunk's last stage" if blocks == 1 else f"the trunk's last {blocks} stages"
    stage = f", on its own fine-tuned copy of {copy}" if config.get("detail_stage") else ""
    return f"{len(terms)} caption phrases, weight {weight} in the score{stage} (lgur.model.details)"


def card_table(card: dict[str, Any], prototype_names: list[str]) -> str:
    """The Model tab's table (Markdown; every value escaped)."""
    config = card.get("config", {})
    parameters = card.get("parameters")
    counts = f"{parameters['trainable']:,} / {parameters['frozen']:,}" if parameters else ""
    rows = {
        "image encoder": image_encoder(card),
        "text encoder": f"{card.get('text_encoder', {}).get('name')} (frozen) + BiLSTM",
        "dictionary atoms / prototypes": f"{config.get('num_atoms')} / {config.get('num_prototypes')}",
        "embedding": f"{config.get('num_prototypes', 1) * config.get('part_dim', 0)}-d",
        "parameters (trainable / frozen)": counts,
        "training data": training_data(card),
        "detail detector": detail_detector(config),
    }
    lines = ["| model | |", "| --- | --- |"] + [f"| {k} | {html.escape(str(v))} |" for k, v in rows.items() if v]
    for split, m in card.get("metrics", {}).items():
        lines.append(
            f"| {html.escape(split)} | R@1 {m.get('R@1')} · R@5 {m.get('R@5')} · R@10 {m.get('R@10')} · "
            f"mAP {m.get('mAP')} |"
        )
    for style, qb in card.get("query_bench", {}).items():
        lines.append(
            f"| short queries ({html.escape(style)} set{', with details' if qb.get('details') else ''}"
            f"{', read as the app reads them' if qb.get('read_as_the_app_does') else ''}) | "
            f"attribute precision@10 {qb['precision@10']:.1f}% · top-1 "
            f"right {qb['top1']:.1f}% · chance {qb['chance']:.1f}% ({qb['queries']} queries) |"
        )
    lines += [f"| {k} | {v} |" for k, v in summary_rows(card.get("explanations", {}), ", ".join(prototype_names))]
    lines += [f"| {html.escape(k)} | {html.escape(v)} |" for k, v in faithfulness_rows(card.get("faithfulness", {}))]
    return "\n".join(lines)
