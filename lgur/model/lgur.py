"""LGUR: encoders -> DGA -> PGU -> part embeddings.

Training runs four branches (guided image, raw text, dictionary image, dictionary
text); retrieval uses the dictionary branch of both modalities. The explain_*
methods return the same embeddings together with every attention the explorer draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import LGURConfig
from .details import DetailDetector, DetailStage
from .dga import DGA
from .encoders import TextEncoder, build_image_encoder
from .pgu import PGU, GlobalPooling, Parts


@dataclass
class TrainOutputs:
    """Part vectors (B, P, part_dim) of each branch; the DGA branches are None without DGA."""

    image: Parts  # guided image R(V, T) * m with DGA, raw patches without
    text: Parts  # raw text
    image_dictionary: Parts | None = None  # R(V, D) * m
    text_dictionary: Parts | None = None  # R(T, D)
    image_atoms: Tensor | None = None  # (B, H, N, atoms) R(V, D)'s attention over the atoms, when asked
    text_atoms: Tensor | None = None  # (B, H, T, atoms) R(T, D)'s, zero on padding
    guidance: Tensor | None = None  # (B, N, T) what each word contributes to each patch, heads averaged, times m


@dataclass
class ImageExplanation:
    embedding: Tensor  # (B, E) L2-normalised, dictionary branch
    parts: Tensor  # (B, P, part_dim)
    prototype_attention: Tensor | None  # (B, layers, H, P, N) over the patch grid (or prototype_grid)
    dictionary_weights: Tensor | None  # (B, H, N, atoms)
    foreground: Tensor | None  # (B, N) foreground weight m per patch
    grid: tuple[int, int]  # (rows, cols) of the patch grid, N = rows * cols
    patch_features: Tensor | None = None  # (B, N, D) the image encoder's output, before DGA
    foreground_learned: bool = False  # does m mean anything (LGUR.learns_foreground)?
    detail_logits: Tensor | None = None  # (B, K) the detail detector's phrase logits (None: no detector)
    prototype_grid: tuple[int, int] | None = None  # the prototype maps' grid when finer than `grid` (pgu_fine)

    @property
    def prototype_shape(self) -> tuple[int, int]:
        """(rows, cols) of prototype_attention's last axis."""
        return self.prototype_grid or self.grid

    @property
    def atom_histogram(self) -> Tensor | None:
        """(B, atoms): the patches' atom weights (heads averaged), mean over patches, weighted by
        the foreground weight m where the model learns it (elsewhere m is untrained noise)."""
        if self.dictionary_weights is None:
            return None
        weights = self.dictionary_weights.mean(1)  # (B, N, atoms)
        if not self.foreground_learned or self.foreground is None:
            return weights.mean(1)
        fg = self.foreground  # (B, N)
        return (weights * fg.unsqueeze(-1)).sum(1) / fg.sum(1, keepdim=True).clamp(min=1e-6)


@dataclass
class TextExplanation:
    embedding: Tensor  # (B, E)
    parts: Tensor  # (B, P, part_dim)
    prototype_attention: Tensor | None  # (B, layers, H, P, T), zero on padding
    dictionary_weights: Tensor | None  # (B, H, T, atoms), zero on padding
    mask: Tensor  # (B, T) True = real token

    @property
    def atom_histogram(self) -> Tensor | None:
        """(B, atoms): the words' atom weights (heads averaged), mean over real tokens."""
        if self.dictionary_weights is None:
            return None
        valid = self.mask.to(self.dictionary_weights.dtype)
        return self.dictionary_weights.mean(1).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)


def _stack_attention(parts: Parts) -> Tensor | None:
    return None if parts.attention is None else torch.stack(parts.attention, dim=1)


class IdentityClassifier(nn.Module):
    """One bias-free identity classifier per prototype, shared by both modalities (paper); or,
    with whole=True, one classifier over the concatenated parts (not in the paper)."""

    def __init__(self, num_parts: int, part_dim: int, num_identities: int, whole: bool = False) -> None:
        super().__init__()
        self.whole = whole
        rows, width = (1, num_parts * part_dim) if whole else (num_parts, part_dim)
        self.weight = nn.Parameter(torch.randn(rows, width, num_identities) * width**-0.5)

    def forward(self, parts: Tensor) -> Tensor:
        if self.whole:
            parts = parts.flatten(1).unsqueeze(1)  # (B, 1, P * part_dim)
        return torch.einsum("bpe,pec->bpc", parts, self.weight)  # (B, P or 1, identities)


class LGUR(nn.Module):
    def __init__(self, config: LGURConfig, num_identities: int = 0, load_pretrained: bool = True) -> None:
        super().__init__()
        self.config = config
        c = config
        self.image_encoder = build_image_encoder(c.image, c.dim, load_pretrained)
        self.text_encoder = TextEncoder(c.text, c.dim)
        self.dga = (
            DGA(
                c.dim,
                c.num_atoms,
                c.reconstruction_heads,
                c.reconstruction_head_dim,
                c.reconstruction_ffn_dim,
                c.dropout,
                c.atom_sharpness,
                c.atom_top_k,
            )
            if c.use_dga
            else None
        )
        fine_channels = getattr(self.image_encoder, "fine_channels", 0) if c.pgu_fine else 0
        if c.pgu_fine and not (c.use_pgu and fine_channels):
            raise ValueError(f"pgu_fine needs PGU and a CNN trunk with a map at half the stride ({c.image.timm_name})")
        if c.use_pgu:
            self.pgu = PGU(
                c.dim,
                c.num_prototypes,
                c.pgu_layers,
                c.pgu_heads,
                c.pgu_head_dim,
                c.pgu_ffn_dim,
                c.part_dim,
                c.dropout,
                c.pgu_register,
                fine_channels,
                self.image_encoder.grid,
                c.prototype_rows,
                c.prototype_row_width,
                c.prototype_anchor,
            )
        else:
            self.pgu = GlobalPooling(c.dim, c.part_dim)
        num_parts = c.num_prototypes if c.use_pgu else 1
        if c.identity_classifier not in ("parts", "whole"):
            raise ValueError(f"identity_classifier must be 'parts' or 'whole', not {c.identity_classifier!r}")
        whole = c.identity_classifier == "whole"
        self.classifier = IdentityClassifier(num_parts, c.part_dim, num_identities, whole) if num_identities else None
        self.details = (
            DetailDetector(c.dim, len(c.detail_terms), c.detail_hidden, c.detail_sharpness) if c.detail_terms else None
        )
        self.detail_stage = (
            DetailStage(self.image_encoder, c.detail_stage_blocks) if c.detail_terms and c.detail_stage else None
        )
        self.batch_norms_folded = False  # lgur.model.serving.fold_for_serving

    # -- features -------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        return self.text_encoder.tokenize(texts)

    def word_features(self, mask: Tensor, ids: Tensor | None = None, backbone_features: Tensor | None = None) -> Tensor:
        """Word features (B, T, dim) from token ids, or from cached frozen-encoder outputs."""
        if backbone_features is None:
            if ids is None:
                raise ValueError("give token ids or cached backbone features")
            backbone_features = self.text_encoder.backbone_features(ids, mask)
        return self.text_encoder.forward_features(backbone_features, mask)

    # -- training -------------------------------------------------------------------------
    def forward(
        self,
        images: Tensor,
        mask: Tensor,
        ids: Tensor | None = None,
        backbone_features: Tensor | None = None,
        need_weights: bool = False,
        need_atoms: bool = False,
        need_guidance: bool = False,
    ) -> TrainOutputs:
        """images (B, 3, H, W) paired with captions (mask (B, T), ids or cached features).

        need_weights: also return each branch's prototype attention (for the diversity term);
        need_atoms: also the dictionary branches' attention over the atoms (for the atom entropy);
        need_guidance: also the guided branch's word maps, as guidance_attention(weighted=True) draws them.
        """
        if self.config.pgu_fine:
            patches, (fine,) = self.image_encoder.forward_with_stage_inputs(images, (self.image_encoder.fine_blocks,))
        else:
            patches, fine = self.image_encoder(images), None  # (B, N, D)
        words = self.word_features(mask, ids, backbone_features)  # (B, T, D)
        if self.dga is None:
            text, _ = self.text_branches(words, mask, need_weights)
            return TrainOutputs(image=self.pgu(patches, None, need_weights, fine=fine, image=True), text=text)
        text = self.pgu(words, mask, need_weights)
        text_rebuilt = self.dga.reconstruct_text(words, mask, need_atoms)
        text_dictionary = self.pgu(text_rebuilt.features, mask, need_weights)
        guided = self.dga.guide_image(patches, words, mask, need_guidance)
        guidance = None
        if need_guidance:
            guidance = guided.weights.mean(1) * guided.foreground[:, :, None]  # (B, N, T)
        image_dictionary = self.dga.reconstruct_image(patches, need_atoms)
        bias = self._foreground_bias(image_dictionary.foreground)
        # where the person is places the prototypes' prior
        extent = self.person_extent(image_dictionary.foreground) if self.anchored_to_person else None
        return TrainOutputs(
            image=self.pgu(guided.features, None, need_weights, bias, fine, image=True, extent=extent),
            text=text,
            image_dictionary=self.pgu(
                image_dictionary.features, None, need_weights, bias, fine, image=True, extent=extent
            ),
            text_dictionary=text_dictionary,
            image_atoms=image_dictionary.weights,
            text_atoms=text_rebuilt.weights,
            guidance=guidance,
        )

    def _foreground_bias(self, foreground: Tensor | None) -> Tensor | None:
        """log m as the prototypes' attention prior over patches (pgu_foreground), else None."""
        if not self.config.pgu_foreground or foreground is None:
            return None
        return foreground.clamp(min=1e-4).log()

    def text_branches(self, words: Tensor, mask: Tensor, need_weights: bool = False) -> tuple[Parts, Parts | None]:
        """Word features (B, T, D) -> parts of the raw text branch and of the dictionary branch (None without DGA)."""
        text = self.pgu(words, mask, need_weights)
        if self.dga is None:
            return text, None
        return text, self.pgu(self.dga.reconstruct_text(words, mask).features, mask, need_weights)

    # -- retrieval and explanations (dictionary branch) -------------------------------------
    def encode_images(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(B, 3, H, W) -> the image encoder's tokens (B, N, dim); the tokens the detail detector
        reads: the same, or its own stage's (DetailStage); and the trunk's map at half the patch
        stride for the prototypes' fine read-out (pgu_fine; else None). The trunk runs once."""
        counts = [self.detail_stage.blocks] if self.detail_stage is not None else []
        if self.config.pgu_fine:
            counts.append(self.image_encoder.fine_blocks)
        if not counts:
            encoded = self.image_encoder(images)
            return encoded, encoded, None
        encoded, stage_inputs = self.image_encoder.forward_with_stage_inputs(images, tuple(counts))
        detail_tokens = encoded if self.detail_stage is None else self.detail_stage(stage_inputs[0])
        return encoded, detail_tokens, stage_inputs[-1] if self.config.pgu_fine else None

    def detail_tokens(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> the tokens the detail detector reads (encode_images' second output), running
        only as much of the trunk as they need: with its own stage, not the trunk's last groups."""
        if self.detail_stage is None:
            return self.image_encoder(images)
        return self.detail_stage(self.image_encoder.stage_input(images, self.detail_stage.blocks))

    def explain_images(self, images: Tensor, need_weights: bool = True) -> ImageExplanation:
        encoded, detail_tokens, fine = self.encode_images(images)
        patches = encoded
        dictionary_weights = foreground = None
        if self.dga is not None:
            rebuilt = self.dga.reconstruct_image(patches, need_weights)
            patches, dictionary_weights, foreground = rebuilt.features, rebuilt.weights, rebuilt.foreground
        extent = self.person_extent(foreground) if self.anchored_to_person else None
        parts = self.pgu(
            patches, None, need_weights, self._foreground_bias(foreground), fine, image=True, extent=extent
        )
        details = self.details(detail_tokens)[0] if self.details is not None else None
        return ImageExplanation(
            parts.embedding,
            parts.vectors,
            _stack_attention(parts),
            dictionary_weights,
            foreground,
            self.image_encoder.grid,
            encoded if need_weights else None,
            self.learns_foreground,
            details,
            self.prototype_grid if fine is not None else None,
        )

    def explain_texts(
        self,
        mask: Tensor,
        ids: Tensor | None = None,
        backbone_features: Tensor | None = None,
        need_weights: bool = True,
    ) -> TextExplanation:
        words = self.word_features(mask, ids, backbone_features)
        dictionary_weights = None
        if self.dga is not None:
            rebuilt = self.dga.reconstruct_text(words, mask, need_weights)
            words, dictionary_weights = rebuilt.features, rebuilt.weights
        parts = self.pgu(words, mask, need_weights)
        attention = _stack_attention(parts)
        if attention is not None:
            attention = attention * mask[:, None, None, None, :].to(attention.dtype)
        return TextExplanation(parts.embedding, parts.vectors, attention, dictionary_weights, mask)

    def embed_images(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, E) unit-norm retrieval embeddings."""
        return self.explain_images(images, need_weights=False).embedding

    def embed_texts(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Token ids and mask (B, T) -> (B, E) unit-norm retrieval embeddings."""
        return self.explain_texts(mask, ids, need_weights=False).embedding

    def find_details(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) -> the detail detector's phrase probabilities (B, K) and where each phrase was
        seen (B, N, K): its pooling weights over the patches."""
        if self.details is None:
            raise ValueError("this model has no detail detector (python -m lgur train-details adds one)")
        logits, patches = self.details(self.detail_tokens(images))
        return torch.sigmoid(logits), self.details.where(patches)

    def set_prototype_rows(
        self, rows: tuple[float, ...], width: float | tuple[float, ...], anchor: str | None = None
    ) -> None:
        """The image prototypes' row prior (LGURConfig.prototype_rows, PGU.set_rows), in the config too."""
        anchor = anchor or self.config.prototype_anchor
        self.pgu.set_rows(rows, width, anchor)
        self.config.prototype_rows, self.config.prototype_row_width = tuple(rows), width
        self.config.prototype_anchor = anchor

    @property
    def anchored_to_person(self) -> bool:
        """Is the prototypes' row prior placed in the person (LGURConfig.prototype_anchor)?"""
        return bool(self.config.prototype_rows) and self.config.prototype_anchor == "person"

    @torch.no_grad()
    def person_extent(self, foreground: Tensor | None) -> Tensor:
        """(B, N) DGA's foreground weight m -> (B, 2) the person's top and bottom (fractions of the height):
        the first and last rows whose strongest m is at least halfway from the image's weakest row to its
        strongest (m is fitted to where the detail detector sees the person: lgur.training.foreground)."""
        if foreground is None or not self.learns_foreground:
            raise ValueError("a prior anchored to the person needs a learned foreground weight m (train-details)")
        rows, cols = self.image_encoder.grid
        profile = foreground.unflatten(-1, (rows, cols)).amax(-1)  # (B, R)
        low, high = profile.amin(-1, keepdim=True), profile.amax(-1, keepdim=True)
        person = profile - low >= 0.5 * (high - low)
        index = torch.arange(rows, device=profile.device)
        top = torch.where(person, index, rows).amin(-1)
        bottom = torch.where(person, index, -1).amax(-1) + 1
        return torch.stack([top, bottom], -1).float() / rows

    @property
    def prototype_grid(self) -> tuple[int, int]:
        """(rows, cols) of the image prototypes' maps: the patch grid, or twice it with pgu_fine."""
        return self.pgu.fine.grid if self.config.pgu_fine else self.image_encoder.grid

    @property
    def learns_foreground(self) -> bool:
        """Does DGA's foreground weight m mean anything? With the foreground prior (pgu_foreground)
        training shapes it; otherwise m scales PGU's memory before its pre-norm, which cancels it, so
        it stays untrained unless fitted after training (foreground_fitted, lgur.training.foreground), and
        explanations should not be weighted by it."""
        return self.dga is not None and (self.config.pgu_foreground or self.config.foreground_fitted)

    def guidance_attention(self, images: Tensor, ids: Tensor, mask: Tensor, weighted: bool = False) -> Tensor:
        """Cross-modality guidance for (image, caption) pairs: which words each patch reads.

        Returns (B, H, N, T); padded words get zero weight. weighted: each patch's row times its
        foreground weight m, as the guided features are R(V, T) * m: what each word contributes
        to each patch, so a patch the model discounts shows little (rows then sum to m).
        """
        if self.dga is None:
            raise ValueError("this model has no DGA module, so no cross-modality guidance")
        patches = self.image_encoder(images)
        words = self.word_features(mask, ids)
        guided = self.dga.guide_image(patches, words, mask, need_weights=True)
        weights = guided.weights  # masked softmax over words
        return weights * guided.foreground[:, None, :, None] if weighted else weights
