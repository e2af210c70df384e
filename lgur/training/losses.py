"""LGUR objectives: per-prototype identity classification and a bidirectional
semi-hard triplet ranking loss, on the pairs of branches named in the paper.

Negative sampling draws from an explicit torch.Generator, never the global RNG,
so a seeded run is reproducible.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.lgur import IdentityClassifier, TrainOutputs
from ..model.pgu import Parts, prototype_overlap


def identity_loss(classifier: IdentityClassifier, parts: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of each prototype's identity classifier (or of the one over all parts).
    parts: (B, P, part_dim)."""
    logits = classifier(parts)  # (B, P, C)
    return F.cross_entropy(logits.flatten(0, 1), labels.repeat_interleave(logits.shape[1]))


def _one_way_triplet(sim: Tensor, negative: Tensor, margin: float, generator: torch.Generator) -> Tensor:
    """Anchors are rows, row i's positive is column i; one random semi-hard negative per anchor
    among the columns that `negative` (B, B) allows (never a same-identity one)."""
    positive = sim.diagonal().unsqueeze(1)  # (B, 1)
    violation = margin - positive + sim  # > 0: the negative is inside the margin
    semi_hard = negative & (violation > 0) & (sim < positive)
    # Prefer a semi-hard negative; else any negative inside the margin; else no loss.
    candidates = torch.where(semi_hard.any(dim=1, keepdim=True), semi_hard, negative & (violation > 0))
    noise = torch.rand(sim.shape, generator=generator).to(sim.device)
    choice = noise.masked_fill(~candidates, -1.0).argmax(dim=1)  # a random candidate per row
    chosen = violation.gather(1, choice.unsqueeze(1)).squeeze(1)
    return torch.where(candidates.any(dim=1), chosen.clamp(min=0), torch.zeros_like(chosen)).mean()


def same_identity(labels: Tensor) -> Tensor:
    """(B, B) bool: which in-batch pairs are matches when only identities are known."""
    return labels[:, None] == labels[None, :]


def triplet_ranking_loss(
    a: Tensor, b: Tensor, labels: Tensor, margin: float, generator: torch.Generator, match: Tensor | None = None
) -> Tensor:
    """Bidirectional ranking loss between paired unit vectors a[i] <-> b[i], (B, E) each.
    match: optional (B, B) bool, a[i] matches b[j] (default: same identity); never a negative."""
    sim = a @ b.t()
    negative = ~(same_identity(labels) if match is None else match)
    return _one_way_triplet(sim, negative, margin, generator) + _one_way_triplet(
        sim.t(), negative.t(), margin, generator
    )


def similarity_distribution_matching(
    a: Tensor,
    b: Tensor,
    labels: Tensor,
    logit_scale: Tensor,
    negatives: Tensor | None = None,
    match: Tensor | None = None,
) -> Tensor:
    """SDM (IRRA, Jiang et al. CVPR 2023), both directions: KL divergence from the softmax over
    every in-batch similarity to the distribution of true matches (same identity, uniform).

    a, b: (B, E) unit vectors, a[i] paired with b[i]; logit_scale: log of 1 / temperature.
    negatives: optional (B, E) unit vectors, negatives[i] a false description of a[i] (NaN rows:
    none); each is one more candidate, never a match, in row i of the a -> b direction.
    match: optional (B, B) bool, a[i] matches b[j], instead of same identity (must hold the diagonal).
    """
    scale = logit_scale.exp()
    logits = (a @ b.t()) * scale
    match = (same_identity(labels) if match is None else match).to(logits.dtype)

    def one_way(x: Tensor, match: Tensor) -> Tensor:
        target = torch.log(match / match.sum(dim=1, keepdim=True) + 1e-8)
        log_p = x.log_softmax(dim=1)
        return (log_p.exp() * (log_p - target)).sum(dim=1).mean()

    backward = one_way(logits.t(), match.t())
    if negatives is not None:
        extra = (a * negatives.nan_to_num()).sum(dim=1, keepdim=True) * scale  # (B, 1)
        extra = extra.masked_fill(negatives[:, :1].isnan(), -1e4)  # no negative: no candidate
        logits = torch.cat([logits, extra], dim=1)
        match = torch.cat([match, torch.zeros_like(extra)], dim=1)
    return one_way(logits, match) + backward


class TermClassifier(nn.Linear):
    """Term prediction from a branch's retrieval embedding: one linear classifier over the terms."""

    def forward(self, parts: Parts) -> Tensor:
        """-> (B, K) term logits."""
        embedding = parts.embedding
        return super().forward(embedding * embedding.shape[1] ** 0.5)  # unit rows -> unit-variance inputs


class PartTermClassifier(nn.Module):
    """Term prediction from the part vectors (option): each prototype has its own linear classifier
    over the terms and a term is said when some part says it: the terms' probabilities are the
    softmax over all (part, term) pairs summed over the parts (multiple-instance learning). So a
    detail ("white sneakers") has to be read by one part, which the retrieval embedding then
    carries, and a part that reads the background predicts nothing a caption names."""

    def __init__(self, parts: int, part_dim: int, terms: int) -> None:
        super().__init__()
        bound = part_dim**-0.5  # nn.Linear's initialisation, per part
        self.weight = nn.Parameter(torch.empty(parts, part_dim, terms).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(parts, terms).uniform_(-bound, bound))

    def forward(self, parts: Parts) -> Tensor:
        """-> (B, K) term logits: per part (B, P, K), log-sum-exp over the parts."""
        vectors = parts.vectors
        unit = F.normalize(vectors, dim=-1) * vectors.shape[-1] ** 0.5  # unit-variance inputs
        return (torch.einsum("bpd,pdk->bpk", unit, self.weight) + self.bias).logsumexp(dim=1)


def term_prediction_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy from the softmax over terms to the sample's terms, uniform (weak supervision by
    words, as Joulin et al. ECCV 2016). logits: (B, K) (a term classifier's); targets: (B, K) multi-hot.
    Rows without a term are skipped."""
    count = targets.sum(dim=1)
    loss = -(targets * logits.log_softmax(dim=1)).sum(dim=1) / count.clamp(min=1)
    keep = count > 0
    return loss[keep].mean() if keep.any() else logits.sum() * 0.0


DIVERSITY_PAIRS = ("all", "nearest")


class LGURLoss(nn.Module):
    """Identity losses on every branch plus ranking losses on the paper's four pairs (weights 1).

    Options that are not in the paper:
    - diversity > 0: that weight times the overlap of the prototypes' last-layer attention on the
      dictionary branches (the ones shown and searched); `image_person` in forward: (B, N) where the
      person is, the image maps' overlap is measured there only; diversity_pairs "nearest": each
      prototype's overlap with its nearest other (default "all": the mean over all pairs);
      diversity_rows: the image grid's rows, to compare the image maps' row profiles only;
    - sdm > 0: that weight times the similarity distribution matching loss on the cross-modal
      pairs (guided image vs raw text, dictionary image vs dictionary text), with a learned
      temperature starting at `temperature`; with `negatives`, each image's SDM row also holds
      a false caption of its own (swapped attributes), so it must tell its description from a
      near copy;
    - `match` in forward: which texts describe which images beyond same identity (a crop "black
      jeans" is true of everyone in black jeans), for the cross-modal SDM targets and triplets;
    - term_prediction > 0 (with `terms` terms and embeddings of `embedding_dim`): that weight times
      the term prediction loss of every branch, one classifier shared by both modalities: linear on
      the embedding (TermClassifier), or with `part_terms` = (prototypes, part_dim) a PartTermClassifier on the part
      vectors; `term_targets` in forward: (image targets, text targets), (B, terms) multi-hot each.
    """

    def __init__(
        self,
        margin: float = 0.3,
        seed: int = 0,
        diversity: float = 0.0,
        sdm: float = 0.0,
        temperature: float = 0.07,
        term_prediction: float = 0.0,
        terms: int = 0,
        embedding_dim: int = 0,
        part_terms: tuple[int, int] | None = None,
        diversity_pairs: str = "all",
        diversity_rows: int | None = None,
    ) -> None:
        super().__init__()
        if diversity_pairs not in DIVERSITY_PAIRS:
            raise ValueError(f"unknown diversity pairs {diversity_pairs!r}: {', '.join(DIVERSITY_PAIRS)}")
        self.diversity_nearest = diversity_pairs == "nearest"
        self.diversity_rows = diversity_rows
        self.margin = margin
        self.diversity = diversity
        self.sdm = sdm
        self.term_prediction = term_prediction
        self.generator = torch.Generator().manual_seed(seed)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature))) if sdm > 0 else None
        self.term_classifier: TermClassifier | PartTermClassifier | None = None
        if term_prediction > 0 and terms:
            self.term_classifier = (
                TermClassifier(embedding_dim, terms) if part_terms is None else PartTermClassifier(*part_terms, terms)
            )

    def forward(
        self,
        out: TrainOutputs,
        labels: Tensor,
        classifier: IdentityClassifier,
        negatives: dict[str, Tensor] | None = None,
        match: Tensor | None = None,
        term_targets: tuple[Tensor, Tensor] | None = None,
        image_person: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """negatives (SDM only): branch name ("text", "text_dictionary") -> (B, E) embeddings of a
        false caption for each sample (NaN rows: none), as extra candidates for the images.
        match: optional (B, B) bool, image i is described by text j, for the cross-modal pairs
        (SDM targets and triplet negatives); default: same identity."""
        cross_modal = {("image", "text"), ("image_dictionary", "text_dictionary")}
        losses: dict[str, Tensor] = {}
        branches = {"image": out.image, "text": out.text}
        pairs = [("image", "text")]  # guided (or raw) image vs raw text
        if out.image_dictionary is not None:
            branches |= {"image_dictionary": out.image_dictionary, "text_dictionary": out.text_dictionary}
            pairs += [
                ("image_dictionary", "text_dictionary"),
                ("text", "text_dictionary"),
                ("image", "image_dictionary"),
            ]
        for name, parts in branches.items():
            losses[f"id/{name}"] = identity_loss(classifier, parts.vectors, labels)
        for left, right in pairs:
            pair_match = match if (left, right) in cross_modal else None
            losses[f"rank/{left}-{right}"] = triplet_ranking_loss(
                branches[left].embedding, branches[right].embedding, labels, self.margin, self.generator, pair_match
            )
        if self.logit_scale is not None:
            scale = self.logit_scale.clamp(max=math.log(100.0))  # temperature >= 0.01
            for left, right in pairs[:2]:  # the cross-modal pairs
                losses[f"sdm/{left}-{right}"] = self.sdm * similarity_distribution_matching(
                    branches[left].embedding,
                    branches[right].embedding,
                    labels,
                    scale,
                    None if negatives is None else negatives[right],
                    match,
                )
        if self.term_classifier is not None and term_targets is not None:
            for name, parts in branches.items():
                targets = term_targets[0] if name.startswith("image") else term_targets[1]
                logits = self.term_classifier(parts)
                losses[f"terms/{name}"] = self.term_prediction * term_prediction_loss(logits, targets)
        if self.diversity > 0:
            dictionary = out.image_dictionary is not None
            shown = [out.image_dictionary, out.text_dictionary] if dictionary else [out.image, out.text]
            for name, parts in zip(("image", "text"), shown, strict=True):
                if parts.attention is None:
                    raise ValueError("the diversity term needs prototype attention (PGU, need_weights=True)")
                weights, rows = (image_person, self.diversity_rows) if name == "image" else (None, None)
                losses[f"diversity/{name}"] = (
                    self.diversity
                    * prototype_overlap(parts.attention[-1], weights, self.diversity_nearest, rows).mean()
                )
        losses["total"] = sum(losses.values())
        return losses
