"""Training: `python -m lgur train --preset cpu --data DIR --out RUN_DIR`.

Reads top to bottom: data -> model -> optimiser -> epochs (train, validate, keep the
best on *val*) -> test the best. Seeded and resumable at epoch boundaries; every
random draw comes from a generator seeded by (seed, epoch, rank). Runs on several
processes with `torchrun` (DistributedDataParallel: gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import Tensor, nn

from ..data.dataset import (
    RetrievalSplit,
    TextFeatures,
    augment,
    build_split,
    caption_crops,
    caption_vocabulary,
    described_by,
    description_terms,
    frequent_terms,
    frozen_text_features,
    normalize,
    person_terms,
    swapped_caption,
)
from ..data.readers import Record, read_dataset
from ..eval.evaluate import evaluate_split, record_in_card, score_test_splits
from ..files import atomic_write_bytes
from ..model.checkpoint import load_checkpoint, load_optimizer_state, read_card, save_checkpoint, save_optimizer_state
from ..model.config import LGURConfig, preset
from ..model.encoders import resize_position_embedding
from ..model.lgur import LGUR
from ..model.pgu import position_heights
from ..search.atoms import text_atom_average
from .losses import LGURLoss, same_identity

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: str
    out: str
    preset: str = "cpu"
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3  # BiLSTM, part projections, identity classifiers
    lr_backbone: float = 1e-4  # image encoder, DGA, PGU (dictionary and prototypes included)
    # Not in the paper, for a pretrained CNN trunk: its own rate (None: lr_backbone), and epochs in
    # which its stem and first two blocks (stride 4) do not learn, so early gradients of the new
    # modules cannot wash out the ImageNet filters.
    lr_trunk: float | None = None
    frozen_stem_epochs: int = 0
    decay_epochs: tuple[int, ...] = (20, 40, 50)  # x0.1 at these epochs of `decay_reference`
    decay_reference: int = 60
    warmup_steps: int = 0
    margin: float = 0.3
    prototype_diversity: float = 0.0  # not in the paper: weight of the prototype-overlap penalty
    # Not in the paper: weight of the entropy of DGA's atom weights (heads averaged) per patch and per
    # word, so each is rebuilt from a few atoms (with LGURConfig.atom_sharpness).
    atom_entropy: float = 0.0
    # Not in the paper: the share of training images reframed as a person detector frames its crops
    # (data.dataset.reframe: the person 0.55-1.0 of the height, moved up to 0.15 each way), so that the
    # prototypes learn to find the parts wherever they are rather than at fixed heights.
    framing: float = 0.0
    sdm: float = 0.0  # not in the paper: weight of the similarity distribution matching loss
    temperature: float = 0.07  # initial (learned) temperature of that loss
    seed: int = 0
    pad: int = 10  # augmentation padding at 384-pixel height; scaled with the input size
    # An epoch visits every caption (paper), every image (one random caption each), or every
    # identity with `instances` images each, side by side in one batch (so a batch holds positives).
    # "neighbours" (not in the paper) is "identities" in groups of `group_size` identities that the
    # model itself finds alike (its image embeddings from the previous epoch), so a batch holds
    # look-alikes that only details tell apart: hard negatives. The first epoch is "identities".
    # "caption-neighbours" (not in the paper) groups identities whose captions use the same words
    # (TF-IDF of word pairs): people described alike, from captions alone. Both neighbour kinds
    # start at `neighbours_from_epoch`.
    samples: str = "captions"
    instances: int = 2
    group_size: int = 8
    neighbours_from_epoch: int = 0  # before this epoch, the neighbour kinds sample plain identities
    # Not in the paper: with this probability a sample's caption is replaced by a crop of it (a few
    # of its clauses: a shorter, still true description, like a typed query), from this epoch on.
    caption_crops: float = 0.0
    crops_from_epoch: int = 0
    # Not in the paper: from this epoch on, each image's SDM row also holds a false copy of its
    # caption (two colours traded, a colour or a garment changed): a hard negative that only
    # binding each colour to its garment can tell apart. None: off. Needs sdm > 0.
    swaps_from_epoch: int | None = None
    # Which in-batch texts match an image. "identities" (paper): its identity's. "descriptions" (not
    # in the paper): also every text whose person terms all occur in the captions of the image's
    # identity (data.dataset.person_terms), so a crop "black jeans" matches everyone described in
    # black jeans instead of pushing them away. Captions and identities only.
    matches: str = "identities"
    # Not in the paper: weight of predicting what the captions say from each branch's embedding.
    # One linear classifier over the person terms (content words and adjacent pairs that recur for
    # one identity: "white sneakers", "glasses"; data.dataset.person_terms) used by TERM_MIN_CAPTIONS
    # captions, shared by both modalities: an image predicts its identity's terms, a text its own.
    # In-batch identity losses never ask for a detail that top and bottom colour already settle;
    # this asks for every detail the captions name, on both sides. Captions only, no labels.
    term_prediction: float = 0.0
    # What predicts the terms: "embedding" (one linear classifier on the retrieval embedding) or
    # "parts" (one per prototype, a term said when some part says it: losses.PartTermClassifier),
    # so each detail is carried by one part and a part on the background predicts nothing.
    terms_from: str = "embedding"
    # Not in the paper: weight of the prototypes' attention (the maps the app draws) on what a teacher,
    # `person_from` (a checkpoint with a detail detector: train-details), does not see as the person
    # (LGUR.person_map): the attention mass times (1 - person map), averaged over prototypes. The map is 1
    # wherever the teacher is at least `person_saturation` as sure as at its surest patch, so the penalty
    # leaves the prototypes free to spread over the whole person (at 1.0 it pulls them all to one patch).
    prototype_person: float = 0.0
    person_from: str | None = None
    person_saturation: float = 1.0
    # First epoch (0-based) of that penalty: from the start it holds all six prototypes on the same person
    # map, where the diversity term has no gradient to part them; later, they have already parted.
    person_from_epoch: int = 0
    # With pgu_fine: the teacher's person map at the fine grid (LGUR.fine_person_map, shift-and-stitch)
    # rather than its patch map repeated over each patch's four cells, which cannot tell a leg from the
    # ground beside it in one patch (on the ground the feet prototypes read: 0.02-0.08 per unit, 0.16-0.24 fine).
    person_fine: bool = False
    # While that penalty is on, measure the image prototypes' overlap (prototype_diversity) on the
    # teacher's person map only: under the penalty, two prototypes on one part otherwise part most
    # cheaply by one of them reading the background (trunk table: diversity 4.0, 97% background).
    diversity_on_person: bool = False
    # Which prototype pairs the diversity term averages: "all", or "nearest" (each prototype with its
    # most similar other): six prototypes as two pairs on two parts overlap 0.19 on average, 0.9 nearest.
    diversity_pairs: str = "all"
    # Compare the image prototypes' row profiles (attention summed over each row of the grid) rather
    # than their maps: two prototypes may not part by reading two sides of one garment.
    diversity_rows: bool = False
    # Heights (0 top, 1 bottom) for the image prototypes' row prior (LGURConfig.prototype_rows), one per
    # prototype. A second stage hands them out by the prototypes' mean heights at its start
    # (place_prototypes), so the prior agrees with what each reads already and two prototypes on one
    # part (twins the diversity term cannot part: their gradients are the same) get different heights.
    prototype_rows: tuple[float, ...] | None = None
    prototype_row_width: float | tuple[float, ...] = 0.1  # one, or one per decoder layer (0: free)
    # A second stage: start from this checkpoint's model and weights (a run's last.safetensors with its
    # identity classifier, or an inference checkpoint: the classifier is then imprinted) with a fresh
    # optimiser and schedule. None: from scratch.
    init_from: str | None = None
    # Modules of the model (LGUR attribute names: image_encoder, dga, details, detail_stage, ...) held
    # fixed, weights and batch-norm statistics: a second stage that changes only what reads them
    # keeps a detail detector and a fitted foreground weight that were trained on them valid.
    frozen: tuple[str, ...] = ()
    max_minutes: float | None = None  # stop early; the best-on-val model is still tested
    final_test: bool = True  # test the best-on-val model when the run ends (the lineage measures its export)
    # end the run after its Nth epoch of the schedule (counted from the start, so the same command
    # resumes an interrupted run to the same place; raise it to go on)
    stop_after: int | None = None
    use_dga: bool = True
    use_pgu: bool = True
    text_encoder_path: str | None = None
    image_pretrained_path: str | None = None
    cache_dir: str | None = None  # frozen text features; default RUN_DIR/cache
    threads: int | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def model_config(self) -> LGURConfig:
        # A second stage builds the model its checkpoint holds (a detail detector included), then the overrides.
        config = LGURConfig.from_dict(read_card(self.init_from)["config"]) if self.init_from else preset(self.preset)
        config.use_dga, config.use_pgu = self.use_dga, self.use_pgu
        if self.text_encoder_path:
            config.text.path = self.text_encoder_path
        if self.image_pretrained_path:
            config.image.pretrained_path = self.image_pretrained_path
        for key, value in self.model_overrides.items():
            target = config
            *parents, leaf = key.split(".")
            for p in parents:
                target = getattr(target, p)
            if not hasattr(target, leaf):
                raise ValueError(f"unknown model setting {key!r}")
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass  # a plain string
            setattr(target, leaf, tuple(value) if isinstance(value, list) else value)
        if self.prototype_rows and not self.init_from:  # from scratch: in the order given
            config.prototype_rows, config.prototype_row_width = tuple(self.prototype_rows), self.prototype_row_width
        return config


# Training recipes. The paper fine-tunes a pretrained DeiT at 1e-4; the CPU preset's ResNet trunk
# starts from scratch, so its encoder and the DGA/PGU modules learn at a higher rate, with warm-up.
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    "cpu": {
        "epochs": 26,
        "lr_backbone": 5e-4,
        "warmup_steps": 300,
        "decay_epochs": (40, 52),  # late decays: the encoder learns from scratch
        # beyond the paper (options, each measured alone: docs/EXPERIMENTS.md):
        "samples": "identities",
        "sdm": 1.0,
        "prototype_diversity": 2.0,  # 0.5 left the maps at overlap 0.64; 2.0 gives 0.10
        "caption_crops": 0.5,  # after two epochs of full captions, half the samples as crops
        "crops_from_epoch": 2,
    },
    "cpu-vit": {"epochs": 8, "lr_backbone": 5e-4, "warmup_steps": 300, "samples": "images"},
}


# The pretrained trunk converges in fewer epochs (val R@1 58.4 after 4, the from-scratch trunk 33.4).
# Term prediction: over the whole run test R@1 77.92 vs 70.05, query-bench 47.3% vs 42.9% (EXPERIMENTS.md).
RECIPES["cpu-lite0"] = {**RECIPES["cpu"], "epochs": 16, "term_prediction": 1.0}


def recipe(name: str, **overrides: Any) -> TrainConfig:
    values = {**RECIPES.get(name, {}), **{k: v for k, v in overrides.items() if v is not None}}
    return TrainConfig(preset=name, **values)


# -- helpers ---------------------------------------------------------------------------------


class TrainingStep(nn.Module):
    """Model + losses in one module, so DistributedDataParallel sees every trainable weight."""

    def __init__(
        self,
        model: LGUR,
        criterion: LGURLoss,
        person_map: Callable[[Tensor], Tensor] | None = None,
        person_weight: float = 0.0,
        diversity_on_person: bool = False,
        frozen: tuple[str, ...] = (),
        atom_entropy: float = 0.0,
    ) -> None:
        """person_map: a frozen teacher's LGUR.person_map (a plain callable, so its weights are neither
        trained nor saved), with its loss weight (TrainConfig.prototype_person); while that weight is on,
        `diversity_on_person` measures the image maps' overlap on that map (TrainConfig). frozen: the
        model's modules held fixed (TrainConfig.frozen)."""
        super().__init__()
        self.model, self.criterion = model, criterion
        self.person_map, self.person_weight = person_map, person_weight
        self.diversity_on_person = diversity_on_person
        self.atom_entropy = atom_entropy
        self.frozen = []
        for name in frozen:  # a module of LGUR, or one inside it ("dga.foreground")
            try:
                module = model.get_submodule(name)
            except AttributeError:
                module = None
            if not isinstance(module, nn.Module):
                raise ValueError(f"cannot freeze {name!r}: the model has no such module")
            module.requires_grad_(False)
            self.frozen.append(module)

    def train(self, mode: bool = True) -> TrainingStep:
        super().train(mode)
        for module in self.frozen:  # batch-norm statistics and dropout stay fixed too
            module.eval()
        return self

    def forward(
        self,
        images: Tensor,
        features: Tensor,
        mask: Tensor,
        labels: Tensor,
        swapped: tuple[Tensor, Tensor, Tensor] | None = None,
        match: Tensor | None = None,
        term_targets: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[dict[str, Tensor], Tensor]:
        """-> losses, and the images' retrieval embeddings (B, E), detached (for neighbour batches).

        swapped: frozen features (B, T', H) and mask of each sample's false caption, and (B,) which
        samples have one. match: (B, B) bool, image i is described by text j (default: same identity).
        term_targets: (B, K) multi-hot terms of the images and of the texts (term prediction).
        """
        taught = self.person_map is not None and self.person_weight > 0
        atoms = self.atom_entropy > 0
        need_weights = self.criterion.diversity > 0 or taught
        out = self.model(images, mask, backbone_features=features, need_weights=need_weights, need_atoms=atoms)
        negatives = None
        if swapped is not None:
            swap_features, swap_mask, valid = swapped
            words = self.model.word_features(swap_mask, backbone_features=swap_features)
            branches = dict(zip(("text", "text_dictionary"), self.model.text_branches(words, swap_mask), strict=True))
            negatives = {
                name: parts.embedding.masked_fill(~valid[:, None], float("nan"))
                for name, parts in branches.items()
                if parts is not None
            }
        retrieval = out.image_dictionary if out.image_dictionary is not None else out.image
        person = self.person_map(images) if taught else None  # (B, N), or (B, 4N) already fine (person_fine)
        fine = self.model.pgu.fine if self.model.config.pgu_fine else None
        if person is not None and fine is not None and person.shape[-1] != fine.patch_of.numel():
            person = fine.upsample(person)  # the maps are on the fine grid, the teacher's is not
        on_person = person if self.diversity_on_person else None
        losses = self.criterion(out, labels, self.model.classifier, negatives, match, term_targets, on_person)
        if person is not None:  # the maps drawn: the last layer, heads averaged
            outside = 1.0 - person
            attention = retrieval.attention[-1].mean(1)  # (B, P, N)
            losses["person/image"] = self.person_weight * (attention * outside[:, None, :]).sum(-1).mean()
            losses["total"] = losses["total"] + losses["person/image"]
        if atoms and out.image_atoms is not None:
            losses["atoms"] = (
                self.atom_entropy * 0.5 * (atom_entropy(out.image_atoms) + atom_entropy(out.text_atoms, mask))
            )
            losses["total"] = losses["total"] + losses["atoms"]
        return losses, retrieval.embedding.detach()


def atom_entropy(weights: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean entropy (nats) of the heads-averaged atom weights (B, H, L, atoms) over the valid positions."""
    p = weights.mean(1)  # (B, L, atoms)
    entropy = -(p * p.clamp(min=1e-12).log()).sum(-1)  # (B, L)
    if mask is None:
        return entropy.mean()
    valid = mask.to(entropy.dtype)
    return (entropy * valid).sum() / valid.sum().clamp(min=1.0)


STEM = ("model.image_encoder.cnn.conv_stem.", "model.image_encoder.cnn.bn1.", "model.image_encoder.cnn.blocks.0.",
        "model.image_encoder.cnn.blocks.1.")  # fmt: skip


def trunk_groups_used(cfg: TrainConfig) -> bool:
    """Separate stem and trunk groups only when an option needs them (older runs resume as they were)."""
    return cfg.lr_trunk is not None or cfg.frozen_stem_epochs > 0


def parameter_groups(step: TrainingStep, cfg: TrainConfig) -> list[dict[str, Any]]:
    # The fine read-out's projections start at zero in a second stage, so they learn at the heads' rate.
    heads = ("model.text_encoder.lstm", "model.classifier.", "model.pgu.projections", "model.pgu.projection",
             "model.pgu.fine.", "criterion.")  # fmt: skip
    split_trunk = trunk_groups_used(cfg)
    groups: dict[str, list] = {"heads": [], "body": [], "stem": [], "trunk": []}
    for name, param in step.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith(heads):
            groups["heads"].append(param)
        elif split_trunk and name.startswith("model.image_encoder.cnn."):
            groups["stem" if name.startswith(STEM) else "trunk"].append(param)
        else:
            groups["body"].append(param)
    trunk_lr = cfg.lr_backbone if cfg.lr_trunk is None else cfg.lr_trunk
    rates = {"heads": cfg.lr, "body": cfg.lr_backbone, "stem": trunk_lr, "trunk": trunk_lr}
    names = ["heads", "body", "stem", "trunk"] if split_trunk else ["heads", "body"]
    return [{"params": groups[n], "lr": rates[n], "name": n} for n in names]


def lr_factor(step: int, epoch: int, cfg: TrainConfig) -> float:
    """Step decay x0.1 at the paper's milestones (scaled to the run's epochs), after a linear warm-up."""
    milestones = [round(m * cfg.epochs / cfg.decay_reference) for m in cfg.decay_epochs]
    factor = 0.1 ** sum(epoch >= m for m in milestones)
    if cfg.warmup_steps and step < cfg.warmup_steps:
        factor *= (step + 1) / cfg.warmup_steps
    return factor


def embedding_neighbours(bank: Tensor, k: int = 32, chunk: int = 1024) -> Tensor:
    """(identities, k): each identity's k nearest others by cosine of their embeddings (bank (N, E))."""
    x = F.normalize(bank, dim=1)
    rows = []
    for start in range(0, len(x), chunk):
        similarity = x[start : start + chunk] @ x.T
        similarity[torch.arange(len(similarity)), torch.arange(start, start + len(similarity))] = -float("inf")
        rows.append(similarity.topk(min(k, len(x) - 1), dim=1).indices)
    return torch.cat(rows)


def caption_neighbours(captions: list[str], labels: Tensor, k: int = 32) -> Tensor:
    """(identities, k): each identity's k nearest others by the word pairs of its captions.

    An identity's captions form one document of word bigrams ("red coat", "blue jeans": a colour
    bound to its garment); documents are compared by the cosine of their TF-IDF vectors
    (sublinear counts), so phrasings every description uses weigh little. Captions only, no
    attribute labels. On the default world a caption neighbour shares the top colour with 58%
    of identities (random 11%), top and bottom colour with 23% (2.5%).
    """
    pairs = []
    for caption in captions:
        words = re.findall(r"[a-z]+", caption.lower())
        pairs.append([f"{a} {b}" for a, b in zip(words, words[1:])])
    vocabulary = {p: i for i, p in enumerate(sorted({p for ps in pairs for p in ps}))}
    rows = torch.tensor([label for label, ps in zip(labels.tolist(), pairs) for _ in ps], dtype=torch.long)
    cols = torch.tensor([vocabulary[p] for ps in pairs for p in ps], dtype=torch.long)
    counts = torch.zeros(int(labels.max()) + 1, max(len(vocabulary), 1))
    counts.index_put_((rows, cols), torch.ones(len(rows)), accumulate=True)
    tf = torch.where(counts > 0, 1 + torch.log(counts.clamp(min=1)), counts)
    idf = torch.log(len(counts) / (counts > 0).sum(0).clamp(min=1))
    return embedding_neighbours(tf * idf, k)


def epoch_neighbours(
    cfg: TrainConfig, epoch: int, bank: Tensor, seen: Tensor, described_alike: Tensor | None
) -> Tensor | None:
    """This epoch's look-alike lists (identities, k), or None for plain identity sampling: before
    cfg.neighbours_from_epoch, and for embedding neighbours until every identity has an embedding."""
    if epoch < cfg.neighbours_from_epoch:
        return None
    if cfg.samples == "neighbours":
        return embedding_neighbours(bank) if seen.all() else None
    return described_alike


def neighbour_groups(neighbours: Tensor, group_size: int, g: torch.Generator) -> list[int]:
    """Identities in a random order, each followed by up to group_size - 1 of its unvisited neighbours."""
    taken = torch.zeros(len(neighbours), dtype=torch.bool)
    order = []
    for i in torch.randperm(len(neighbours), generator=g).tolist():
        if taken[i]:
            continue
        group = [i]
        for j in neighbours[i].tolist():
            if len(group) == group_size:
                break
            if not taken[j]:
                group.append(j)
                taken[j] = True
        taken[i] = True
        order += group
    return order


SAMPLES = ("captions", "images", "identities", "neighbours", "caption-neighbours")
MATCHES = ("identities", "descriptions")
TERMS_FROM = ("embedding", "parts")


def epoch_order(
    split: RetrievalSplit, cfg: TrainConfig, labels: Tensor, g: torch.Generator, neighbours: Tensor | None = None
) -> Tensor:
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
    if neighbours is not None:  # a neighbour kind, past its first epoch
        identities = neighbour_groups(neighbours, cfg.group_size, g)
    else:
        identities = torch.randperm(len(by_identity), generator=g).tolist()
    picks = []
    for i in identities:
        images = by_identity[i][torch.randperm(len(by_identity[i]), generator=g)]
        picks.append(images.repeat(cfg.instances)[: cfg.instances])  # fewer images: one repeats
    return random_caption(torch.cat(picks))


def start_from_checkpoint(model: LGUR, criterion: LGURLoss, cfg: TrainConfig) -> bool:
    """A second stage: the weights (identity classifier included, when there), SDM temperature and term
    classifier (its `*_terms.safetensors` beside it, when there) of cfg.init_from. -> whether the
    identity classifier still needs its first weights (imprint_classifier): a shipped checkpoint has none.

    The model is the checkpoint's (TrainConfig.model_config) with the run's overrides: a CNN trunk may
    change its input size (its learned positions are then resampled to the new grid), and weights the
    checkpoint lacks may only be the fine read-out's (pgu_fine: they start at zero, the model unchanged).
    """
    initial, card = load_checkpoint(cfg.init_from, cfg.text_encoder_path)
    weights = initial.state_dict()
    old_grid, new_grid = initial.config.image.grid, model.config.image.grid
    if old_grid != new_grid and model.config.image.kind != "cnn":
        raise ValueError(f"{cfg.init_from}: only a CNN trunk may change its input size in a second stage")
    if old_grid != new_grid:
        key = "image_encoder.position"
        weights[key] = resize_position_embedding(weights[key], old_grid, new_grid)
    same_model = f"{cfg.init_from}: a second stage starts from a checkpoint of the same model"
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as error:  # a shape differs
        raise ValueError(f"{same_model}: {str(error).splitlines()[-1].strip()}") from error
    allowed = ("pgu.fine.", "classifier.") if model.classifier is not None else ("pgu.fine.",)
    wrong = [k for k in missing if not k.startswith(allowed)] + list(unexpected)
    if wrong:
        raise ValueError(f"{same_model}; it differs in {', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}")
    scale = card.get("training_state", {}).get("logit_scale")
    if criterion.logit_scale is not None and scale is not None:
        criterion.logit_scale.data.fill_(scale)
    start = Path(cfg.init_from)
    terms = start.with_name(f"{start.stem}_terms.safetensors")  # a run's last_terms beside its last
    if criterion.term_classifier is not None and terms.is_file():
        try:
            criterion.term_classifier.load_state_dict(load_file(str(terms)))
        except RuntimeError:  # another vocabulary of terms
            log.warning("%s: its term classifier does not fit these data's terms; it starts afresh", terms)
    return any(k.startswith("classifier.") for k in missing)


@torch.no_grad()
def imprint_classifier(model: LGUR, split: RetrievalSplit, labels: Tensor, batch_size: int = 128) -> None:
    """The identity classifier's first weights from the model itself (weight imprinting, Qi et al.,
    CVPR 2018): each identity's mean part vector over its training images, unit length, scaled so that
    an image's logit for its own identity is about 10 (labels: (N_captions,) of split's captions)."""
    image_labels = torch.empty(len(split.images), dtype=torch.long)
    image_labels[split.caption_image] = labels
    was_training = model.training
    model.eval()
    parts = []
    device = next(model.parameters()).device
    for start in range(0, len(split.images), batch_size):
        batch = normalize(split.images[start : start + batch_size].to(device))
        parts.append(model.explain_images(batch, need_weights=False).parts.float().cpu())
    model.train(was_training)
    vectors = torch.cat(parts)  # (N, P, part_dim)
    count = model.classifier.weight.shape[-1]
    sums = torch.zeros(count, *vectors.shape[1:]).index_add_(0, image_labels, vectors)  # (C, P, part_dim)
    means = F.normalize(sums, dim=-1) * (10.0 / vectors.norm(dim=-1).mean(0))[None, :, None]
    weight = means.permute(1, 2, 0)  # (P, part_dim, C)
    if model.classifier.whole:
        weight = weight.flatten(0, 1).unsqueeze(0) / weight.shape[0] ** 0.5
    model.classifier.weight.copy_(weight.to(device))


@torch.no_grad()
def place_prototypes(
    model: LGUR,
    split: RetrievalSplit,
    heights: tuple[float, ...],
    width: float | tuple[float, ...],
    count: int = 512,
    batch: int = 128,
) -> tuple[float, ...]:
    """Give each image prototype one of `heights` for its row prior (PGU.set_rows) by a linear assignment
    to the prototypes' mean heights: where their last-layer maps lie on the first `count` training
    images. -> the heights in prototype order (also set in model.config)."""
    from scipy.optimize import linear_sum_assignment

    if len(heights) != model.config.num_prototypes:
        raise ValueError(f"prototype rows: {len(heights)} heights for {model.config.num_prototypes} prototypes")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    means = []
    for start in range(0, min(count, len(split.images)), batch):
        explained = model.explain_images(normalize(split.images[start : min(start + batch, count)].to(device)))
        maps = explained.prototype_attention[:, -1].mean(1).float().cpu()  # (B, P, N)
        means.append(maps @ position_heights(explained.prototype_shape))  # (B, P)
    model.train(was_training)
    mean_height = torch.cat(means).mean(0)  # (P,)
    cost = (mean_height[:, None] - torch.tensor(heights)[None, :]).abs()
    prototypes, slots = linear_sum_assignment(cost.numpy())
    placed = tuple(float(heights[s]) for _, s in sorted(zip(prototypes, slots)))
    model.set_prototype_rows(placed, width)
    return placed


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


def plot_curves(log_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses, epochs, val = [], [], [], []
    for line in log_path.read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "step":
            steps.append(row["step"])
            losses.append(row["loss/total"])
        elif row["kind"] == "epoch":
            epochs.append(row["step"])
            val.append((row["val/R@1"], row["val/mAP"]))
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=110)
    a.plot(steps, losses, lw=0.8)
    a.set_xlabel("step")
    a.set_ylabel("training loss")
    if val:
        b.plot(epochs, [v[0] for v in val], "o-", label="val R@1")
        b.plot(epochs, [v[1] for v in val], "s-", label="val mAP")
        b.legend()
    b.set_xlabel("step")
    b.set_ylabel("%")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


# -- setup -----------------------------------------------------------------------------------


@dataclass
class Texts:
    """Every text a training sample may read, as frozen features, and what the options add to them.

    Text k < len(captions) is caption k; with caption crops, crop j of caption i is text
    len(captions) + i * CROPS_PER_CAPTION + j. With swapped-caption negatives, text k's false copy
    is row k of `swapped`. With description matches, `terms[k]` are text k's person terms and
    `identity_terms[label]` those of all of an identity's captions.
    """

    features: TextFeatures
    crops: bool = False
    swapped: TextFeatures | None = None
    swapped_valid: Tensor | None = None
    terms: list[frozenset[str]] | None = None
    identity_terms: list[frozenset[str]] | None = None
    term_index: dict[str, int] | None = None  # term prediction: the predicted terms, in classifier order


CROPS_PER_CAPTION = 2
TERM_MIN_CAPTIONS = 20  # a term predicted must be in at least this many training captions


def caption_crop_texts(captions: list[str], seed: int) -> list[str]:
    """Option: CROPS_PER_CAPTION crops of each caption (a few of its clauses), in caption order."""
    rng = np.random.default_rng(seed)
    return [c for caption in captions for c in caption_crops(caption, CROPS_PER_CAPTION, rng)]


def swapped_texts(texts: list[str], seed: int) -> tuple[list[str], Tensor]:
    """Option: each text's false copy (two colours traded, a colour or a garment changed); "" and False
    where a text has nothing to swap."""
    rng = np.random.default_rng(seed + 1)
    swaps = [swapped_caption(t, rng) for t in texts]
    return [t or "" for t in swaps], torch.tensor([t is not None for t in swaps])


def description_term_sets(
    texts: list[str], captions: int, labels: Tensor, identities: int
) -> tuple[list[frozenset[str]], list[frozenset[str]]]:
    """Option: each text's person terms, and each identity's (over its full captions, texts[:captions])."""
    every = [description_terms(t) for t in texts]
    kept = person_terms(every[:captions], labels.tolist())
    terms = [t & kept for t in every]
    gathered: list[set[str]] = [set() for _ in range(identities)]
    for t, label in zip(terms, labels.tolist()):  # zip stops at the full captions
        gathered[label] |= t
    return terms, [frozenset(t) for t in gathered]


def training_texts(
    cfg: TrainConfig, model: LGUR, split: RetrievalSplit, labels: Tensor, cache: Path, bar: bool
) -> Texts:
    encoder, n = model.text_encoder, len(split.captions)
    texts = Texts(frozen_text_features(encoder, split.captions, cache, progress=bar))
    all_texts = list(split.captions)
    if cfg.caption_crops > 0 and cfg.crops_from_epoch < cfg.epochs:
        crops = caption_crop_texts(split.captions, cfg.seed)
        texts.features = texts.features.concat(frozen_text_features(encoder, crops, cache, progress=bar))
        texts.crops, all_texts = True, all_texts + crops
    if cfg.swaps_from_epoch is not None and cfg.swaps_from_epoch < cfg.epochs:
        swaps, texts.swapped_valid = swapped_texts(all_texts, cfg.seed)
        texts.swapped = frozen_text_features(encoder, swaps, cache, progress=bar)
    if cfg.matches == "descriptions" or cfg.term_prediction > 0:
        texts.terms, texts.identity_terms = description_term_sets(all_texts, n, labels, int(labels.max()) + 1)
    if cfg.term_prediction > 0:
        frequent = frequent_terms(texts.terms[:n], TERM_MIN_CAPTIONS)
        texts.term_index = {t: i for i, t in enumerate(frequent)}
    return texts


def check_options(cfg: TrainConfig) -> None:
    if cfg.prototype_diversity and not cfg.use_pgu:
        raise ValueError("--prototype-diversity needs PGU (there are no prototypes with --no-pgu)")
    if cfg.swaps_from_epoch is not None and not cfg.sdm:
        raise ValueError("swapped-caption negatives are candidates of the SDM loss: give --sdm > 0")
    if cfg.matches not in MATCHES:
        raise ValueError(f"unknown matches {cfg.matches!r}: {', '.join(MATCHES)}")
    if cfg.terms_from not in TERMS_FROM:
        raise ValueError(f"unknown terms_from {cfg.terms_from!r}: {', '.join(TERMS_FROM)}")
    if cfg.terms_from == "parts" and not cfg.use_pgu:
        raise ValueError("--terms-from parts needs PGU (there are no part vectors with --no-pgu)")
    if cfg.prototype_person and (not cfg.person_from or not cfg.use_pgu):
        raise ValueError("--prototype-person needs PGU and --person-from, a checkpoint with a detail detector")
    if cfg.prototype_rows and not cfg.use_pgu:
        raise ValueError("--prototype-rows needs PGU (there are no prototypes with --no-pgu)")
    if cfg.diversity_on_person and not (cfg.prototype_person and cfg.prototype_diversity):
        raise ValueError("--diversity-on-person needs --prototype-diversity and --prototype-person (the person map)")


@dataclass
class Run:
    """Everything one training run holds: its data, model, optimiser and resumable state."""

    cfg: TrainConfig
    out: Path
    cache: Path
    device: torch.device
    rank: int
    world: int
    splits: dict[str, list[Record]]
    format_report: Any
    identities: int
    train: RetrievalSplit
    val: RetrievalSplit
    labels: Tensor  # (captions,) training label of each caption
    texts: Texts
    val_text: TextFeatures
    model: LGUR
    criterion: LGURLoss
    step_module: nn.Module
    optimizer: torch.optim.Optimizer
    base_lrs: list[float]
    pad: int
    vocabulary: list[str]
    state: dict[str, Any] = field(
        default_factory=lambda: {"epoch": 0, "step": 0, "best": -1.0, "best_epoch": -1, "seconds": 0.0}
    )

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def log(self, row: dict[str, Any]) -> None:
        if self.main:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def card(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The card of a checkpoint this run writes."""
        cfg, splits = self.cfg, self.splits
        card = {
            "training": {"config": dataclasses.asdict(cfg), "identities": self.identities, **(extra or {})},
            "data": {"path": str(cfg.data), "format_report": self.format_report, "train_images": len(splits["train"])},
            "vocabulary": self.vocabulary,
        }
        if cfg.init_from and self.model.details is not None:  # a second stage keeps its detector's record
            card["details"] = read_card(cfg.init_from).get("details", {})
        return card


def setup(cfg: TrainConfig, progress: bool) -> Run:
    """Processes, data, model, frozen text features, losses and optimiser; resumed if RUN/last is there."""
    check_options(cfg)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
    bar = progress and rank == 0

    records, report = read_dataset(cfg.data)
    splits = split_records(records, cfg.seed)
    if not splits.get("train"):
        raise ValueError(f"{cfg.data}: no training entries ({report.summary()})")
    identities = sorted({r.identity for r in splits["train"]})
    label_of = {pid: i for i, pid in enumerate(identities)}

    torch.manual_seed(cfg.seed)  # initial weights only; every later draw has its own generator
    model_config = cfg.model_config()
    model = LGUR(model_config, num_identities=len(identities)).to(device)
    size = model_config.image.img_size
    train_split = build_split(splits["train"], size, bar)
    val_split = build_split(splits["val"], size, bar)
    labels = torch.tensor([label_of[int(i)] for i in train_split.caption_ids])
    texts = training_texts(cfg, model, train_split, labels, cache, bar)
    val_text = frozen_text_features(model.text_encoder, val_split.captions, cache, progress=bar)

    terms = len(texts.term_index or {})
    part_terms = (model_config.num_prototypes, model_config.part_dim) if cfg.terms_from == "parts" else None
    criterion = LGURLoss(
        cfg.margin, cfg.seed, cfg.prototype_diversity, cfg.sdm, cfg.temperature, cfg.term_prediction, terms,
        model_config.embedding_dim, part_terms, cfg.diversity_pairs,
        model.prototype_grid[0] if cfg.diversity_rows else None,
    ).to(device)  # fmt: skip
    person_map = None
    if cfg.prototype_person:
        teacher = load_checkpoint(cfg.person_from, cfg.text_encoder_path)[0].to(device).eval().requires_grad_(False)
        if teacher.details is None or teacher.image_encoder.grid != model.image_encoder.grid:
            grid = model.image_encoder.grid
            raise ValueError(f"{cfg.person_from}: the teacher needs a detail detector on the same {grid} grid")
        if cfg.person_fine and not model.config.pgu_fine:
            raise ValueError("--person-fine teaches maps on the fine grid: it needs pgu_fine (--set pgu_fine=true)")
        read = teacher.fine_person_map if cfg.person_fine else teacher.person_map
        person_map = functools.partial(read, saturation=cfg.person_saturation)
    training_step = TrainingStep(
        model, criterion, person_map, cfg.prototype_person, cfg.diversity_on_person, tuple(cfg.frozen), cfg.atom_entropy
    )
    optimizer = torch.optim.Adam(parameter_groups(training_step, cfg))
    step_module: nn.Module = training_step
    if distributed:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device] if device.type == "cuda" else None
        )
    run = Run(
        cfg, out, cache, device, rank, world, splits, report.summary(), len(identities), train_split, val_split,
        labels, texts, val_text, model, criterion, step_module, optimizer, [g["lr"] for g in optimizer.param_groups],
        pad=max(1, round(cfg.pad * size[0] / 384)), vocabulary=caption_vocabulary(train_split.captions),
    )  # fmt: skip
    resume_or_start(run)
    return run


def resume_or_start(run: Run) -> None:
    """Resume from RUN/last (weights, optimiser, state), or start a second stage from cfg.init_from."""
    cfg, last = run.cfg, run.out / "last.safetensors"
    resuming = last.is_file() and (run.out / "last_optimizer.safetensors").is_file()
    if cfg.init_from and not resuming:
        needs_classifier = start_from_checkpoint(run.model, run.criterion, cfg)
        if cfg.prototype_rows:  # before imprinting: the prior changes the part vectors
            placed = place_prototypes(run.model, run.train, cfg.prototype_rows, cfg.prototype_row_width)
            if run.main:
                log.info("prototype rows: %s", ", ".join(f"P{p + 1} {h:.2f}" for p, h in enumerate(placed)))
        if needs_classifier:
            imprint_classifier(run.model, run.train, run.labels)
        if run.main:
            log.info("second stage from %s", cfg.init_from)
    if resuming:
        resumed, last_card = load_checkpoint(last, cfg.text_encoder_path)
        if resumed.config.prototype_rows:  # placed when the run started (place_prototypes)
            run.model.set_prototype_rows(resumed.config.prototype_rows, resumed.config.prototype_row_width)
        run.model.load_state_dict(resumed.state_dict())
        load_optimizer_state(run.optimizer, run.out / "last_optimizer.safetensors")
        run.state = last_card["training_state"]
        if run.criterion.logit_scale is not None:
            run.criterion.logit_scale.data.fill_(run.state["logit_scale"])
        if run.criterion.term_classifier is not None:
            run.criterion.term_classifier.load_state_dict(load_file(str(run.out / "last_terms.safetensors")))
        if run.main:
            log.info("resumed from %s at epoch %d", last, run.state["epoch"])


# -- one epoch -------------------------------------------------------------------------------


@dataclass
class Neighbours:
    """Option: look-alike identities for neighbour batches: by captions (fixed), or by the latest
    training embedding of each identity (the bank is rebuilt after a resume)."""

    described_alike: Tensor | None
    bank: Tensor
    seen: Tensor

    @classmethod
    def of(cls, run: Run) -> Neighbours:
        alike = caption_neighbours(run.train.captions, run.labels) if run.cfg.samples == "caption-neighbours" else None
        return cls(alike, torch.zeros(run.identities, run.model.config.embedding_dim),
                   torch.zeros(run.identities, dtype=torch.bool))  # fmt: skip

    def share(self, run: Run) -> None:
        """Each rank saw its own shard of identities: gather every rank's embeddings."""
        shared = torch.cat([self.bank * self.seen[:, None], self.seen[:, None].float()], dim=1).to(run.device)
        dist.all_reduce(shared)
        self.bank = shared[:, :-1].cpu() / shared[:, -1:].cpu().clamp(min=1)
        self.seen = shared[:, -1].cpu() > 0


def batch_texts(run: Run, idx: Tensor, epoch: int, draws: torch.Generator) -> Tensor:
    """Which text each sample reads: its caption, or (option) with probability caption_crops a crop of it."""
    cfg = run.cfg
    if not (run.texts.crops and epoch >= cfg.crops_from_epoch):
        return idx
    use = torch.rand(len(idx), generator=draws) < cfg.caption_crops
    which = torch.randint(0, CROPS_PER_CAPTION, (len(idx),), generator=draws)
    return torch.where(use, len(run.train.captions) + idx * CROPS_PER_CAPTION + which, idx)


def swapped_batch(run: Run, text: Tensor, epoch: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """Option: the false copies of the batch's texts, from cfg.swaps_from_epoch on."""
    texts = run.texts
    if texts.swapped is None or epoch < run.cfg.swaps_from_epoch:
        return None
    features, mask = texts.swapped.batch(text)
    return features.to(run.device), mask.to(run.device), texts.swapped_valid[text].to(run.device)


def description_match(run: Run, text: Tensor, labels: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """Option: (B, B) image i matches text j if same identity or described by it; and the same-identity part."""
    texts = run.texts
    if run.cfg.matches != "descriptions":
        return None, None
    described = described_by([texts.terms[t] for t in text.tolist()], [texts.identity_terms[i] for i in labels])
    same = same_identity(labels)
    return same | described, same


def term_targets(run: Run, text: Tensor, labels: Tensor) -> tuple[Tensor, Tensor] | None:
    """Option: (B, K) multi-hot targets of term prediction: the images' (their identity's terms), the texts'."""
    index = run.texts.term_index
    if index is None:
        return None

    def multi_hot(term_sets: list[frozenset[str]]) -> Tensor:
        out = torch.zeros(len(term_sets), len(index))
        for row, terms in enumerate(term_sets):
            out[row, [index[t] for t in terms if t in index]] = 1.0
        return out

    texts = run.texts
    images = multi_hot([texts.identity_terms[i] for i in labels.tolist()])
    return images.to(run.device), multi_hot([texts.terms[t] for t in text.tolist()]).to(run.device)


def train_one_epoch(run: Run, epoch: int, neighbours: Neighbours, progress: bool) -> bool:
    """One pass over the epoch's batches; -> True when cfg.max_minutes ran out."""
    from tqdm import tqdm

    cfg, state = run.cfg, run.state
    epoch_start = time.perf_counter()
    run.step_module.train()
    torch.manual_seed(cfg.seed * 65_537 + epoch * 97 + run.rank)  # dropout: reproducible after a resume
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    if run.distributed and cfg.samples == "neighbours":
        neighbours.share(run)
    alike = epoch_neighbours(cfg, epoch, neighbours.bank, neighbours.seen, neighbours.described_alike)
    order = epoch_order(run.train, cfg, run.labels, g, alike)
    if run.world > 1:  # equal shards of whole batches, so identity groups stay together
        whole = len(order) // (cfg.batch_size * run.world) * cfg.batch_size * run.world
        order = order[:whole].view(-1, run.world, cfg.batch_size)[:, run.rank].flatten()
    step = run.step_module.module if run.distributed else run.step_module
    step.person_weight = cfg.prototype_person if epoch >= cfg.person_from_epoch else 0.0
    run.criterion.generator.manual_seed(cfg.seed * 7919 + epoch * 131 + run.rank)
    aug = torch.Generator().manual_seed(cfg.seed * 104_729 + epoch * 31 + run.rank)
    crop_draws = torch.Generator().manual_seed(cfg.seed * 15_485_863 + epoch * 53 + run.rank)
    batches = len(order) // cfg.batch_size
    bar = tqdm(range(batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (progress and run.main))
    stop = False
    for b in bar:
        idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        images = run.train.images[run.train.caption_image[idx]]
        images = normalize(augment(images, run.pad, aug, cfg.framing)).to(run.device)
        text = batch_texts(run, idx, epoch, crop_draws)
        features, mask = run.texts.features.batch(text)
        swapped = swapped_batch(run, text, epoch)
        for group, base in zip(run.optimizer.param_groups, run.base_lrs):
            frozen = group["name"] == "stem" and epoch < cfg.frozen_stem_epochs
            group["lr"] = 0.0 if frozen else base * lr_factor(state["step"], epoch, cfg)
        labels = run.labels[idx]
        match, same = description_match(run, text, labels)
        losses, embeddings = run.step_module(
            images, features.to(run.device), mask.to(run.device), labels.to(run.device), swapped,
            None if match is None else match.to(run.device), term_targets(run, text, labels),
        )  # fmt: skip
        if cfg.samples == "neighbours":
            neighbours.bank[labels], neighbours.seen[labels] = embeddings.float().cpu(), True
        run.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        run.optimizer.step()
        state["step"] += 1
        if state["step"] % 20 == 0 or b == batches - 1:
            row = {"kind": "step", "epoch": epoch, "step": state["step"], "lr": run.optimizer.param_groups[0]["lr"]}
            row |= {f"loss/{k}": round(v.item(), 5) for k, v in losses.items()}
            if match is not None:  # texts that describe other people in the batch, per text
                row["matches/extra"] = round((match.sum().item() - same.sum().item()) / len(idx), 3)
            run.log(row)
            bar.set_postfix(loss=f"{losses['total'].item():.3f}")
        if cfg.max_minutes and (state["seconds"] + time.perf_counter() - epoch_start) / 60 > cfg.max_minutes:
            stop = True
            break
    state["seconds"] += time.perf_counter() - epoch_start
    state["epoch"] = epoch + 1
    if run.criterion.logit_scale is not None:
        state["logit_scale"] = run.criterion.logit_scale.item()
    return stop


def validate_and_save(run: Run, epoch: int) -> None:
    """Validate on val, keep the best (R@1 + mAP) as RUN/best, save the resumable RUN/last."""
    state = run.state
    metrics = evaluate_split(run.model, run.val, run.val_text)["standard"]
    row = {"kind": "epoch", "epoch": epoch, "step": state["step"], "seconds": round(state["seconds"], 1)}
    run.log(row | {f"val/{k}": round(v, 3) for k, v in metrics.items() if k != "cmc"})
    print(f"epoch {epoch + 1}: val R@1 {metrics['R@1']:.2f} mAP {metrics['mAP']:.2f}", flush=True)
    if metrics["R@1"] + metrics["mAP"] > state["best"]:
        state["best"], state["best_epoch"] = metrics["R@1"] + metrics["mAP"], epoch
        save_checkpoint(
            run.model, run.out / "best.safetensors", run.card({"epoch": epoch, "val": metrics | {"cmc": None}})
        )
    save_checkpoint(
        run.model, run.out / "last.safetensors", run.card() | {"training_state": state}, include_classifier=True
    )
    if run.criterion.term_classifier is not None:  # before the optimiser state, which marks a resumable run
        atomic_write_bytes(run.out / "last_terms.safetensors", save(run.criterion.term_classifier.state_dict()))
    save_optimizer_state(run.optimizer, run.out / "last_optimizer.safetensors")
    plot_curves(run.out / "log.jsonl", run.out / "curves.png")


def test_best(run: Run) -> dict[str, Any]:
    """The best-on-val checkpoint on the test splits (and the card's average caption atoms), once."""
    best, best_card = load_checkpoint(run.out / "best.safetensors", run.cfg.text_encoder_path)
    scores = score_test_splits(
        best, run.cfg.data, run.splits, run.cache, run.out / "cmc.png", best_card.get("vocabulary")
    )
    average = text_atom_average(best.eval(), [c for r in run.splits["val"] for c in r.captions])
    record_in_card(run.out / "best.safetensors", best_card | scores | ({"atom_average": average} if average else {}))
    return scores["metrics"]


# -- the run ---------------------------------------------------------------------------------


def train(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    started = time.perf_counter()
    run = setup(cfg, progress)
    neighbours = Neighbours.of(run)
    first_epoch = run.state["epoch"]
    end = min(cfg.epochs, cfg.stop_after or cfg.epochs)  # --stop-after: the schedule's epoch to end at
    out_of_time = False
    for epoch in range(first_epoch, end):
        out_of_time = train_one_epoch(run, epoch, neighbours, progress)
        if run.main:
            validate_and_save(run, epoch)
        if run.distributed:
            dist.barrier()
        if out_of_time:
            break
    if end < cfg.epochs and not out_of_time:  # stopped on purpose: the best is tested when the run ends
        stopped = max(end, first_epoch)
        return {"run": str(run.out), "stopped_after_epoch": stopped, "resume": "raise --stop-after to go on"}

    result: dict[str, Any] = {"run": str(run.out), "best_epoch": run.state["best_epoch"]}
    result["train_seconds"] = run.state["seconds"]
    if run.main:
        if cfg.final_test:
            result["metrics"] = test_best(run)
        result["total_seconds"] = time.perf_counter() - started
        atomic_write_bytes(run.out / "result.json", json.dumps(result, indent=2).encode())
    if run.distributed:
        dist.destroy_process_group()
    return result
