"""Prototype-based Granularity Unification (PGU).

A few learned prototypes, shared by both modalities, are the queries of a small
cross-attention decoder: each reads one "part" out of an image's patches or a
caption's words, so both modalities are summarised at the same granularity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import CrossAttention, FeedForward, masked_mean


class PrototypeDecoderLayer(nn.Module):
    """Pre-norm cross-attention of the prototypes over the features, then a feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim)
        self.memory_norm = nn.LayerNorm(dim)
        self.attention = CrossAttention(dim, heads, head_dim, dropout)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim, dropout)

    def forward(
        self, queries: Tensor, memory: Tensor, mask: Tensor | None, need_weights: bool, bias: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        attended, weights = self.attention(
            self.query_norm(queries), self.memory_norm(memory), mask, need_weights, memory_bias=bias
        )
        queries = queries + attended
        return queries + self.ffn(self.ffn_norm(queries)), weights


@dataclass
class Parts:
    vectors: Tensor  # (B, P, part_dim) one vector per prototype
    attention: list[Tensor] | None  # per layer: (B, H, P, L) prototype attention over the features
    # per layer: (B, H, P) the attention each prototype gave the register (with a register, else None)
    register_attention: list[Tensor] | None = None

    @property
    def embedding(self) -> Tensor:
        """The retrieval embedding: the parts concatenated, L2-normalised. (B, P * part_dim)"""
        return F.normalize(self.vectors.flatten(1), dim=-1)


class PGU(nn.Module):
    def __init__(
        self,
        dim: int,
        num_prototypes: int,
        layers: int,
        heads: int,
        head_dim: int,
        ffn_dim: int,
        part_dim: int,
        dropout: float,
        register: bool = False,
    ) -> None:
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, dim) * 0.02)  # (P, D)
        # Not in the paper: one learned memory slot appended to every image's patches and caption's words,
        # so a prototype that finds nothing to read there can attend to it instead of to the background
        # (the attention sinks of Darcet et al., "Vision Transformers Need Registers", ICLR 2024).
        self.register = nn.Parameter(torch.randn(1, dim) * 0.02) if register else None
        self.layers = nn.ModuleList(
            PrototypeDecoderLayer(dim, heads, head_dim, ffn_dim, dropout) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        # One bias-free projection per prototype, shared by both modalities: (P, D, part_dim).
        self.projections = nn.Parameter(torch.randn(num_prototypes, dim, part_dim) * dim**-0.5)

    def forward(
        self, features: Tensor, mask: Tensor | None = None, need_weights: bool = False, bias: Tensor | None = None
    ) -> Parts:
        """features: (B, L, D); mask: (B, L), True = valid (None for image patches); bias: (B, L) added to
        the prototypes' attention logits (the log foreground weight, with pgu_foreground)."""
        batch = features.shape[0]
        if self.register is not None:  # (B, L, D) -> (B, L + 1, D), the register last
            features = torch.cat([features, self.register.expand(batch, 1, -1)], dim=1)
            if mask is not None:
                mask = F.pad(mask, (0, 1), value=True)
            if bias is not None:
                bias = F.pad(bias, (0, 1), value=0.0)
        queries = self.prototypes.unsqueeze(0).expand(batch, -1, -1)
        attention = []
        for layer in self.layers:
            queries, weights = layer(queries, features, mask, need_weights, bias)
            attention.append(weights)
        vectors = torch.einsum("bpd,pde->bpe", self.norm(queries), self.projections)
        if not need_weights:
            return Parts(vectors, None)
        if self.register is None:
            return Parts(vectors, attention)
        # What the maps draw: each prototype's attention over the real positions, renormalised to sum to 1.
        over_features = [w[..., :-1] / w[..., :-1].sum(-1, keepdim=True).clamp(min=1e-12) for w in attention]
        return Parts(vectors, over_features, [w[..., -1] for w in attention])


class GlobalPooling(nn.Module):
    """The ablation without PGU: masked mean pooling and one projection (a single 'part')."""

    def __init__(self, dim: int, part_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.projection = nn.Linear(dim, part_dim, bias=False)

    def forward(
        self, features: Tensor, mask: Tensor | None = None, need_weights: bool = False, bias: Tensor | None = None
    ) -> Parts:
        pooled = masked_mean(features, mask)  # (B, D)
        return Parts(self.projection(self.norm(pooled)).unsqueeze(1), None)
