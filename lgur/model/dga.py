"""Dictionary-based Granularity Alignment (DGA).

Both modalities are rewritten in the atoms of one shared dictionary, so that fine
visual patches and coarse words end up in the same vocabulary. Images are also
weighted by a learned foreground score, and (training only) reconstructed from the
paired caption's words.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .layers import CrossAttention, FeedForward


class ReconstructionBlock(nn.Module):
    """R(X, M): queries X rebuilt from memory M by pre-norm cross-attention and a feed-forward.

    One LayerNorm normalises both X and M (they live in the same space); residuals add back X.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = CrossAttention(dim, heads, head_dim, dropout)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim, dropout)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        memory_mask: Tensor | None = None,
        need_weights: bool = False,
        sharpness: float = 1.0,
        top_k: int = 0,
    ) -> tuple[Tensor, Tensor | None]:
        attended, weights = self.attention(
            self.norm(x), self.norm(memory), memory_mask, need_weights, None, sharpness, top_k
        )
        x = x + attended
        return x + self.ffn(self.ffn_norm(x)), weights


@dataclass
class Reconstruction:
    features: Tensor  # (B, L, D) reconstructed features (images: foreground-weighted)
    weights: Tensor | None  # (B, H, L, M) attention over the memory (atoms or words), per head
    foreground: Tensor | None = None  # (B, L) per-patch foreground weight m, images only


class DGA(nn.Module):
    def __init__(
        self,
        dim: int,
        num_atoms: int,
        heads: int,
        head_dim: int,
        ffn_dim: int,
        dropout: float,
        atom_sharpness: float = 1.0,
        atom_top_k: int = 0,
    ) -> None:
        """atom_sharpness: multiplies the attention logits over the atoms (not over the words of the
        guidance); atom_top_k > 0: each head rebuilds a patch or word from its k strongest atoms only. Both
        so that each patch and word is rebuilt from a few atoms rather than from all of them."""
        super().__init__()
        self.atom_sharpness, self.atom_top_k = atom_sharpness, atom_top_k
        self.dictionary = nn.Parameter(torch.randn(num_atoms, dim) * 0.02)  # the shared atoms
        self.reconstruction = ReconstructionBlock(dim, heads, head_dim, ffn_dim, dropout)
        self.foreground = nn.Linear(dim, 1)  # learned without supervision

    def foreground_weights(self, patches: Tensor) -> Tensor:
        return torch.sigmoid(self.foreground(patches)).squeeze(-1)  # (B, N)

    def reconstruct_image(self, patches: Tensor, need_weights: bool = False) -> Reconstruction:
        """R(V, D) * m: patches (B, N, D) rebuilt from the atoms, weighted by foreground."""
        rebuilt, weights = self.reconstruction(
            patches, self.dictionary, None, need_weights, self.atom_sharpness, self.atom_top_k
        )
        m = self.foreground_weights(patches)
        return Reconstruction(rebuilt * m.unsqueeze(-1), weights, m)

    def reconstruct_text(self, tokens: Tensor, mask: Tensor, need_weights: bool = False) -> Reconstruction:
        """R(T, D): tokens (B, T, D) rebuilt from the atoms; padded rows are zeroed."""
        rebuilt, weights = self.reconstruction(
            tokens, self.dictionary, None, need_weights, self.atom_sharpness, self.atom_top_k
        )
        valid = mask.to(rebuilt.dtype)
        if weights is not None:
            weights = weights * valid[:, None, :, None]
        return Reconstruction(rebuilt * valid.unsqueeze(-1), weights)

    def guide_image(self, patches: Tensor, tokens: Tensor, mask: Tensor, need_weights: bool = False) -> Reconstruction:
        """Cross-modality guidance R(V, T) * m: patches rebuilt from the paired caption's words."""
        rebuilt, weights = self.reconstruction(patches, tokens, mask, need_weights)
        m = self.foreground_weights(patches)
        return Reconstruction(rebuilt * m.unsqueeze(-1), weights, m)
