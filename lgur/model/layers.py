"""Attention building blocks shared by DGA and PGU.

Attention weights are part of the product (they are what the explorer draws), so
the cross-attention can return them; the fast path uses fused attention instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CrossAttention(nn.Module):
    """Multi-head attention of queries x over a memory, with an optional key mask."""

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.dropout = dropout

    def _split(self, t: Tensor) -> Tensor:
        # (..., L, H*d) -> (..., H, L, d)
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(-3, -2)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        memory_mask: Tensor | None = None,
        need_weights: bool = False,
        memory_bias: Tensor | None = None,
        sharpness: float = 1.0,
        top_k: int = 0,
    ) -> tuple[Tensor, Tensor | None]:
        """x: (B, N, D); memory: (B, M, D) or (M, D) shared by the batch; memory_mask: (B, M), True = valid;
        memory_bias: (B, M) added to every query's attention logits (e.g. a log prior over positions), or
        (B or 1, 1, N, M) to each query's own; sharpness: multiplies the scaled dot products; top_k > 0:
        each query attends to its k strongest memory entries only (per head).

        Returns the output (B, N, D) and, if asked, the weights (B, H, N, M).
        """
        k, v = self.keys_values(memory)
        if k.dim() == 3:  # a shared memory (the dictionary): projected once, broadcast
            k, v = k.unsqueeze(0).expand(x.shape[0], -1, -1, -1), v.unsqueeze(0).expand(x.shape[0], -1, -1, -1)
        return self.attend(x, k, v, memory_mask, need_weights, memory_bias, sharpness, top_k)

    def keys_values(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """memory (B, M, D) -> keys and values (B, H, M, d); a shared memory (M, D) -> (H, M, d)."""
        return self._split(self.to_k(memory)), self._split(self.to_v(memory))

    def attend(
        self,
        x: Tensor,
        k: Tensor,
        v: Tensor,
        memory_mask: Tensor | None = None,
        need_weights: bool = False,
        memory_bias: Tensor | None = None,
        sharpness: float = 1.0,
        top_k: int = 0,
    ) -> tuple[Tensor, Tensor | None]:
        """Queries x (B, N, D) over keys and values (B, H, M, d) -> as forward."""
        q = self._split(self.to_q(x))  # (B, H, N, d)
        mask = None if memory_mask is None else memory_mask[:, None, None, :]  # (B, 1, 1, M)
        if memory_bias is not None:  # an additive mask: the bias, -inf where masked
            bias = (memory_bias if memory_bias.dim() == 4 else memory_bias[:, None, None, :]).to(q.dtype)
            mask = bias if mask is None else torch.where(mask, bias, float("-inf"))
        drop = self.dropout if self.training else 0.0
        if need_weights or 0 < top_k < k.shape[-2]:
            logits = (q @ k.transpose(-2, -1)) * (sharpness * self.head_dim**-0.5)
            if mask is not None and mask.dtype == torch.bool:
                logits = logits.masked_fill(~mask, float("-inf"))
            elif mask is not None:
                logits = logits + mask
            if 0 < top_k < logits.shape[-1]:  # all but the k strongest out (ties at the k-th stay in)
                kth = logits.topk(top_k, dim=-1).values[..., -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            weights = logits.softmax(dim=-1)
            out = F.dropout(weights, drop, self.training) @ v
            weights = weights if need_weights else None
        else:
            weights = None
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=drop, scale=sharpness * self.head_dim**-0.5
            )
        out = out.transpose(1, 2).flatten(2)  # (B, N, H*d)
        return self.to_out(out), weights


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over dim 1 of (B, L, D), counting only valid positions (mask (B, L), True = valid)."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
