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


def triplet_ranking_loss(a: Tensor, b: Tensor, labels: Tensor, margin: float, generator: torch.Generator) -> Tensor:
    """Bidirectional ranking loss between paired unit vectors a[i] <-> b[i], (B, E) each; a pair of the
    same identity is never a negative."""
    sim = a @ b.t()
    negative = ~same_identity(labels)
    return _one_way_triplet(sim, negative, margin, generator) + _one_way_triplet(
        sim.t(), negative.t(), margin, generator
    )


def similarity_distribution_matching(a: Tensor, b: Tensor, labels: Tensor, logit_scale: Tensor) -> Tensor:
    """SDM (IRRA, Jiang et al. CVPR 2023), both directions: KL divergence from the softmax over
    every in-batch similarity to the distribution of true matches (same identity, uniform).
    a, b: (B, E) unit vectors, a[i] paired with b[i]; logit_scale: log of 1 / temperature."""
    scale = logit_scale.exp()
    logits = (a @ b.t()) * scale
    match = same_identity(labels).to(logits.dtype)

    def one_way(x: Tensor, match: Tensor) -> Tensor:
        target = torch.log(match / match.sum(dim=1, keepdim=True) + 1e-8)
        log_p = x.log_softmax(dim=1)
        return (log_p.exp() * (log_p - target)).sum(dim=1).mean()

    backward = one_way(logits.t(), match.t())
    return one_way(logits, match) + backward


class TermClassifier(nn.Linear):
    """Term prediction from a branch's retrieval embedding: one linear classifier over the terms."""

    def forward(self, parts: Parts) -> Tensor:
        """-> (B, K) term logits."""
        embedding = parts.embedding
        return super().forward(embedding * embedding.shape[1] ** 0.5)  # unit rows -> unit-variance inputs


def term_prediction_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy from the softmax over terms to the sample's terms, uniform (weak supervision by
    words, as Joulin et al. ECCV 2016). logits: (B, K) (a term classifier's); targets: (B, K) multi-hot.
    Rows without a term are skipped."""
    count = targets.sum(dim=1)
    loss = -(targets * logits.log_softmax(dim=1)).sum(dim=1) / count.clamp(min=1)
    keep = count > 0
    return loss[keep].mean() if keep.any() else logits.sum() * 0.0


def atom_entropy(weights: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean entropy (nats) of the heads-averaged atom weights (B, H, L, atoms) over the valid positions."""
    p = weights.mean(1)  # (B, L, atoms)
    entropy = -(p * p.clamp(min=1e-12).log()).sum(-1)  # (B, L)
    if mask is None:
        return entropy.mean()
    valid = mask.to(entropy.dtype)
    return (entropy * valid).sum() / valid.sum().clamp(min=1.0)


def outside_person(attention: Tensor, person: Tensor) -> Tensor:
    """The prototypes' attention mass (B, H, P, N) outside the person (B, N) (a map in [0, 1], 1 on the
    person), heads averaged, summed over positions and averaged over prototypes and images."""
    return (attention.mean(1) * (1.0 - person)[:, None, :]).sum(-1).mean()


def word_map_divergence(guidance: Tensor, detail_maps: Tensor, word_rows: Tensor) -> Tensor:
    """KL(detector || words): how far each phrase word's guidance map is from the detail detector's map
    of its phrase, averaged over the words that name one. guidance: (B, N, T) what each word gives each
    patch; detail_maps: (B, N, K) the detector's pooling weights (sum 1 over N); word_rows: (B, T) the
    phrase row of each token, -1 for none."""
    b, t = torch.nonzero(word_rows >= 0, as_tuple=True)
    if len(b) == 0:
        return guidance.sum() * 0.0
    words = guidance[b, :, t]  # (W, N)
    words = words / words.sum(-1, keepdim=True).clamp_min(1e-8)
    target = detail_maps[b, :, word_rows[b, t].long()]  # (W, N)
    return (target * (target.clamp_min(1e-8).log() - words.clamp_min(1e-8).log())).sum(-1).mean()


class LGURLoss(nn.Module):
    """Identity losses on every branch plus ranking losses on the paper's four pairs (weights 1).

    Terms that are not in the paper, each on when its weight is > 0:
    - diversity: the overlap of the prototypes' last-layer attention on the dictionary branches
      (the ones shown and searched);
    - sdm: the similarity distribution matching loss on the cross-modal pairs (guided image vs raw
      text, dictionary image vs dictionary text), with a learned temperature from `temperature`;
    - term_prediction (with `terms` terms and embeddings of `embedding_dim`): predicting the
      captions' person terms from every branch's embedding, one linear classifier for both
      modalities; `term_targets` in forward: (image targets, text targets), (B, terms) multi-hot;
    - person: the drawn image maps' attention outside the person (`person` in forward, a teacher's
      map (B, N)), the last layer's;
    - atoms: the entropy of DGA's atom weights per patch and per word (`text_mask` in forward);
    - word_maps: each phrase word's guidance map against the detail detector's map of its phrase
      (`word_maps` in forward: the detector's maps (B, N, K) and each token's phrase row (B, T)).
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
        person: float = 0.0,
        atoms: float = 0.0,
        word_maps: float = 0.0,
    ) -> None:
        super().__init__()
        self.margin = margin
        self.diversity = diversity
        self.sdm = sdm
        self.term_prediction = term_prediction
        self.person, self.atoms, self.word_maps = person, atoms, word_maps
        self.generator = torch.Generator().manual_seed(seed)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature))) if sdm > 0 else None
        self.term_classifier = TermClassifier(embedding_dim, terms) if term_prediction > 0 and terms else None

    def forward(
        self,
        out: TrainOutputs,
        labels: Tensor,
        classifier: IdentityClassifier,
        term_targets: tuple[Tensor, Tensor] | None = None,
        person: Tensor | None = None,
        text_mask: Tensor | None = None,
        word_maps: tuple[Tensor, Tensor] | None = None,
    ) -> dict[str, Tensor]:
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
            losses[f"rank/{left}-{right}"] = triplet_ranking_loss(
                branches[left].embedding, branches[right].embedding, labels, self.margin, self.generator
            )
        if self.logit_scale is not None:
            scale = self.logit_scale.clamp(max=math.log(100.0))  # temperature >= 0.01
            for left, right in pairs[:2]:  # the cross-modal pairs
                losses[f"sdm/{left}-{right}"] = self.sdm * similarity_distribution_matching(
                    branches[left].embedding, branches[right].embedding, labels, scale
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
                losses[f"diversity/{name}"] = self.diversity * prototype_overlap(parts.attention[-1]).mean()
        total = sum(losses.values())
        if self.person > 0 and person is not None:  # the maps drawn: the retrieval branch's last layer
            drawn = out.image_dictionary if out.image_dictionary is not None else out.image
            losses["person/image"] = self.person * outside_person(drawn.attention[-1], person)
            total = total + losses["person/image"]
        if self.atoms > 0 and out.image_atoms is not None:
            entropies = atom_entropy(out.image_atoms) + atom_entropy(out.text_atoms, text_mask)
            losses["atoms"] = self.atoms * 0.5 * entropies
            total = total + losses["atoms"]
        if self.word_maps > 0 and word_maps is not None and out.guidance is not None:
            losses["word_maps"] = self.word_maps * word_map_divergence(out.guidance, *word_maps)
            total = total + losses["word_maps"]
        losses["total"] = total
        return losses
