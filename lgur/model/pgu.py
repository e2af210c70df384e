"""Prototype-based Granularity Unification (PGU).

A few learned prototypes, shared by both modalities, are the queries of a small
cross-attention decoder: each reads one "part" out of an image's patches or a
caption's words, so both modalities are summarised at the same granularity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import CrossAttention, FeedForward, masked_mean


def position_heights(grid: tuple[int, int]) -> Tensor:
    """(rows, cols) -> (rows * cols,) each grid position's height in the image, 0 top, 1 bottom (centres)."""
    rows, cols = grid
    return ((torch.arange(rows) + 0.5) / rows).repeat_interleave(cols)


def gaussian_rows(distance: Tensor, widths: tuple[float, ...]) -> Tensor:
    """(..., P, L) distances to each prototype's height -> (layers, ..., P, L) the log-prior of each layer's
    width, -(distance / width)^2 / 2, zero for a free layer (width 0)."""
    return torch.stack([-0.5 * (distance / w) ** 2 if w > 0 else torch.zeros_like(distance) for w in widths])


def prototype_overlap(attention: Tensor) -> Tensor:
    """Mean cosine similarity between different prototypes' attention maps, per sample -> (B,).

    attention: (B, H, P, L) of one decoder layer (zero on padding). 0 when every prototype
    reads disjoint positions, 1 when all read the same ones."""
    maps = F.normalize(attention.mean(dim=1), dim=-1)  # (B, P, L), heads averaged
    gram = maps @ maps.transpose(1, 2)  # (B, P, P)
    p = gram.shape[-1]
    return (gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(dim=1)) / (p * (p - 1))


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
        self,
        queries: Tensor,
        memory: Tensor,
        mask: Tensor | None,
        need_weights: bool,
        bias: Tensor | None = None,
        refine: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """refine: the memory's keys and values (B, H, L, d) -> those the prototypes attend to (FineMemory)."""
        keys, values = self.attention.keys_values(self.memory_norm(memory))
        if refine is not None:
            keys, values = refine(keys, values)
        attended, weights = self.attention.attend(self.query_norm(queries), keys, values, mask, need_weights, bias)
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


class FineMemory(nn.Module):
    """Not in the paper: the image prototypes attend at twice the patch grid's resolution.

    At each fine position the keys and values are those of the patch it lies in (nearest
    upsampling) plus a projection of the trunk's feature map there (at half the patch stride), so a
    prototype can settle on the shoe inside a patch that is half floor. The projections start at
    zero: then the attention is the patch grid's, spread evenly over each patch's four positions,
    and the part vectors are unchanged.
    """

    def __init__(self, channels: int, inner: int, layers: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.keys = nn.ModuleList(nn.Linear(channels, inner, bias=False) for _ in range(layers))
        self.values = nn.ModuleList(nn.Linear(channels, inner, bias=False) for _ in range(layers))
        for linear in [*self.keys, *self.values]:
            nn.init.zeros_(linear.weight)
        rows, cols = grid
        self.grid = (2 * rows, 2 * cols)
        fine_rows = torch.arange(2 * rows).repeat_interleave(2 * cols) // 2
        fine_cols = torch.arange(2 * cols).repeat(2 * rows) // 2
        self.register_buffer("patch_of", fine_rows * cols + fine_cols, persistent=False)  # (4N,) fine -> patch

    def upsample(self, x: Tensor, dim: int = -1) -> Tensor:
        """Patch-grid values (..., N, ...) -> the fine grid's (..., 4N, ...) along `dim`, nearest."""
        return x.index_select(dim, self.patch_of)

    def refine(self, keys: Tensor, values: Tensor, tokens: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """keys, values (B, H, N, d) of the patches; tokens (B, 4N, C) normalised trunk features -> (B, H, 4N, d)."""
        heads, head_dim = keys.shape[1], keys.shape[-1]

        def split(t: Tensor) -> Tensor:  # (B, 4N, H*d) -> (B, H, 4N, d)
            return t.unflatten(-1, (heads, head_dim)).transpose(1, 2)

        return (
            self.upsample(keys, -2) + split(self.keys[layer](tokens)),
            self.upsample(values, -2) + split(self.values[layer](tokens)),
        )


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
        fine_channels: int = 0,
        grid: tuple[int, int] | None = None,
        rows: tuple[float, ...] = (),
        row_width: float | tuple[float, ...] = 0.1,
        anchor: str = "image",
    ) -> None:
        """fine_channels, grid: with fine_channels > 0, image prototypes may attend at twice the patch
        grid's (rows, cols) resolution to a trunk feature map of that many channels (FineMemory).
        rows, row_width: each image prototype's height in the image and the prior's width (set_rows)."""
        super().__init__()
        if fine_channels and (register or grid is None):
            raise ValueError("the fine read-out needs the patch grid, and does not combine with a register")
        self.grid = grid
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, dim) * 0.02)  # (P, D)
        # Not in the paper: one learned memory slot appended to every image's patches and caption's words,
        # so a prototype that finds nothing to read there can attend to it instead of to the background
        # (the attention sinks of Darcet et al., "Vision Transformers Need Registers", ICLR 2024).
        self.register = nn.Parameter(torch.randn(1, dim) * 0.02) if register else None
        self.layers = nn.ModuleList(
            PrototypeDecoderLayer(dim, heads, head_dim, ffn_dim, dropout) for _ in range(layers)
        )
        self.fine = FineMemory(fine_channels, heads * head_dim, layers, grid) if fine_channels else None
        self.norm = nn.LayerNorm(dim)
        # One bias-free projection per prototype, shared by both modalities: (P, D, part_dim).
        self.projections = nn.Parameter(torch.randn(num_prototypes, dim, part_dim) * dim**-0.5)
        self.register_buffer("row_prior", None, persistent=False)
        self.register_buffer("row_heights", None, persistent=False)
        self.set_rows(rows, row_width, anchor)

    def set_rows(self, rows: tuple[float, ...], width: float | tuple[float, ...] = 0.1, anchor: str = "image") -> None:
        """Not in the paper: prototype p prefers the image's rows near height rows[p] (0 top, 1 bottom).

        A Gaussian log-prior over the rows of its map, -((y - rows[p]) / width)^2 / 2, is added to its
        attention logits over image positions (the words are not placed). Pedestrian crops stand
        upright, so a prototype held near the head cannot settle on the torso beside another: re-id's
        horizontal stripes (PCB, Sun et al., ECCV 2018), made soft. width: one for every layer, or one
        per layer, 0 leaving that layer free. () removes it.

        anchor "person": rows and widths are fractions of the person's extent in each image (0 the top of
        the person, 1 their feet; the extent given to forward), so the prior moves and scales with the
        person instead of holding a map at a height of the frame.
        """
        if anchor not in ("image", "person"):
            raise ValueError(f"a prototype row prior is anchored to the image or the person, not {anchor!r}")
        self.anchor = anchor
        if not rows:
            self.row_prior = self.row_heights = None
            return
        widths = (width,) * len(self.layers) if isinstance(width, (int, float)) else tuple(width)
        if len(rows) != len(self.prototypes) or self.grid is None:
            raise ValueError(f"prototype rows: one height per prototype ({len(self.prototypes)}), and the image grid")
        if len(widths) != len(self.layers) or min(widths) < 0 or max(widths) <= 0:
            raise ValueError(f"prototype row width: one or one per layer ({len(self.layers)}), >= 0, not {width}")
        if not all(0.0 <= r <= 1.0 for r in rows):
            raise ValueError(f"prototype rows are heights in [0, 1], not {rows}")
        self.row_widths = widths
        y = position_heights(self.fine.grid if self.fine is not None else self.grid)  # (L,)
        self.row_heights = torch.tensor(rows).to(self.prototypes.device)  # (P,)
        distance = y[None, :] - torch.tensor(rows)[:, None]  # (P, L)
        self.row_prior = gaussian_rows(distance, widths).to(self.prototypes.device)  # (layers, P, L)

    def person_prior(self, extent: Tensor) -> Tensor:
        """extent (B, 2): the person's top and bottom (fractions of the height) -> (layers, B, 1, P, L) the
        row prior placed in each image's person (anchor "person")."""
        y = position_heights(self.fine.grid if self.fine is not None else self.grid).to(extent)  # (L,)
        top, height = extent[:, :1], (extent[:, 1:] - extent[:, :1]).clamp(min=0.05)  # (B, 1)
        centre = top + self.row_heights.to(extent)[None, :] * height  # (B, P)
        distance = (y[None, None, :] - centre[..., None]) / height[..., None]  # (B, P, L) in person heights
        return gaussian_rows(distance, self.row_widths)[:, :, None]

    def forward(
        self,
        features: Tensor,
        mask: Tensor | None = None,
        need_weights: bool = False,
        bias: Tensor | None = None,
        fine: Tensor | None = None,
        image: bool = False,
        extent: Tensor | None = None,
    ) -> Parts:
        """extent: (B, 2) the person's top and bottom in each image, for a prior anchored to the person.
        features: (B, L, D); mask: (B, L), True = valid (None for image patches); bias: (B, L) added to
        the prototypes' attention logits (the log foreground weight, with pgu_foreground); fine: image
        patches only, (B, C, 2 rows, 2 cols) the trunk's feature map at half the patch stride, read
        with the fine read-out (the attention is then over the fine grid, (B, H, P, 4L)); image: the
        features are image patches (the row prior applies, set_rows)."""
        batch = features.shape[0]
        refine = None
        if fine is not None:
            if self.fine is None:
                raise ValueError("this PGU has no fine read-out")
            tokens = self.fine.norm(fine.flatten(2).transpose(1, 2))  # (B, 4L, C)
            bias = None if bias is None else self.fine.upsample(bias)
        layer_bias = [bias] * len(self.layers)
        if image and self.row_prior is not None:  # (B, L) and (layers, P, L) -> per layer (B or 1, 1, P, L)
            if self.anchor == "person" and extent is None:
                raise ValueError("a prior anchored to the person needs the person's extent in each image")
            prior = self.person_prior(extent) if self.anchor == "person" else self.row_prior[:, None, None]
            layer_bias = list(prior if bias is None else bias[None, :, None, None, :] + prior)
        if self.register is not None:  # (B, L, D) -> (B, L + 1, D), the register last
            features = torch.cat([features, self.register.expand(batch, 1, -1)], dim=1)
            if mask is not None:
                mask = F.pad(mask, (0, 1), value=True)
            layer_bias = [None if b is None else F.pad(b, (0, 1), value=0.0) for b in layer_bias]
        queries = self.prototypes.unsqueeze(0).expand(batch, -1, -1)
        attention = []
        for i, layer in enumerate(self.layers):
            if fine is not None:
                refine = partial(self.fine.refine, tokens=tokens, layer=i)
            queries, weights = layer(queries, features, mask, need_weights, layer_bias[i], refine)
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
        self,
        features: Tensor,
        mask: Tensor | None = None,
        need_weights: bool = False,
        bias: Tensor | None = None,
        fine: Tensor | None = None,  # PGU's signature; the fine read-out needs PGU (never given here)
        image: bool = False,
        extent: Tensor | None = None,
    ) -> Parts:
        pooled = masked_mean(features, mask)  # (B, D)
        return Parts(self.projection(self.norm(pooled)).unsqueeze(1), None)
