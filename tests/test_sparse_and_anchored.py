"""A dictionary read through a few atoms, and prototype priors placed in the person rather than the frame."""

from __future__ import annotations

import copy

import pytest
import torch

from lgur.model.layers import CrossAttention
from lgur.model.lgur import LGUR
from lgur.model.pgu import PGU
from tests.conftest import random_images, tiny_config


def test_top_k_attention_reads_k_entries_and_matches_the_fused_path() -> None:
    torch.manual_seed(0)
    attention = CrossAttention(16, 2, 8).eval()
    x, memory = torch.randn(3, 5, 16), torch.randn(40, 16)
    out, weights = attention(x, memory, need_weights=True, top_k=4)
    assert ((weights > 0).sum(-1) == 4).all()  # per head and query
    fast, none = attention(x, memory, top_k=4)
    assert none is None and torch.allclose(out, fast, atol=1e-6)
    full, _ = attention(x, memory)
    assert not torch.allclose(full, fast, atol=1e-3)  # the other 36 atoms count without top-k


def test_sharpness_sharpens_the_atom_weights() -> None:
    torch.manual_seed(0)
    attention = CrossAttention(16, 2, 8).eval()
    x, memory = torch.randn(2, 5, 16), torch.randn(40, 16)
    soft = attention(x, memory, need_weights=True)[1]
    sharp = attention(x, memory, need_weights=True, sharpness=8.0)[1]
    assert sharp.amax(-1).mean() > soft.amax(-1).mean()


def test_model_atoms_are_top_k_and_sharper() -> None:
    torch.manual_seed(0)
    model = LGUR(tiny_config(atom_top_k=3, atom_sharpness=4.0)).eval()
    weights = model.explain_images(random_images(model, 2)).dictionary_weights  # (B, H, N, atoms)
    assert ((weights > 0).sum(-1) <= 3).all()
    ids, mask = model.tokenize(["a man in a red coat"])
    words = model.explain_texts(mask, ids).dictionary_weights
    assert ((words > 0).sum(-1) <= 3).all()


def _pgu(anchor: str) -> PGU:
    torch.manual_seed(0)
    rows = (0.1, 0.3, 0.5, 0.9)
    return PGU(16, 4, 2, 2, 8, 32, 8, 0.0, grid=(12, 4), rows=rows, row_width=(0.0, 0.05), anchor=anchor).eval()


def test_a_prior_anchored_to_the_person_moves_and_scales_with_it() -> None:
    pgu = _pgu("person")
    features = torch.zeros(2, 48, 16)  # no content: where the maps go is the prior's doing
    extent = torch.tensor([[0.0, 0.6], [0.4, 1.0]])  # the same person, at the top and at the bottom
    maps = pgu(features, need_weights=True, image=True, extent=extent).attention[-1].mean(1)  # (B, P, L)
    heights = ((torch.arange(12) + 0.5) / 12).repeat_interleave(4)
    centroid = (maps * heights).sum(-1)  # (B, P)
    assert torch.allclose(centroid[1] - centroid[0], torch.full((4,), 0.4), atol=0.05)
    with pytest.raises(ValueError, match="extent"):
        pgu(features, need_weights=True, image=True)
    fixed = _pgu("image")(features, need_weights=True, image=True, extent=extent).attention[-1].mean(1)
    assert torch.allclose(fixed[0], fixed[1])  # anchored to the frame: the same place in both


def test_person_extent_from_the_foreground_weight() -> None:
    model = copy.deepcopy(LGUR(tiny_config())).eval()  # an 8x4 grid
    model.config.foreground_fitted = True  # m counts as learned
    m = torch.full((1, 8, 4), 0.2)
    m[0, 2:6] = 0.9  # the person in rows 2-5
    assert torch.allclose(model.person_extent(m.flatten(1)), torch.tensor([[2 / 8, 6 / 8]]))
