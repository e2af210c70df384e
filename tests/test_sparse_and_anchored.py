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


def test_the_word_map_term_trains_the_maps_the_page_draws() -> None:
    from types import SimpleNamespace

    from lgur.training.losses import word_map_divergence
    from lgur.training.sampling import phrase_word_rows

    torch.manual_seed(0)
    model = LGUR(tiny_config()).eval()
    images = random_images(model, 2)
    ids, mask = model.tokenize(["a man in black shoes", "a woman with a red backpack"])
    with torch.no_grad():
        out = model(images, mask, ids, need_guidance=True)
        drawn = model.guidance_attention(images, ids, mask, weighted=True).mean(1)  # what the page draws
    assert torch.allclose(out.guidance, drawn, atol=1e-6)

    terms = ("black shoes", "backpack", "red backpack", "man", "shoes")
    reader = SimpleNamespace(config=SimpleNamespace(detail_terms=terms), text_encoder=model.text_encoder)
    rows = phrase_word_rows(reader, ["a man in black shoes", "a woman with a red backpack, a dress"])[
        :, : mask.shape[1]
    ]
    tokens = model.text_encoder.tokenizer.convert_ids_to_tokens(ids[0])
    named = {tokens[t]: terms[int(r)] for t, r in enumerate(rows[0]) if r >= 0}
    assert named == {"man": "man", "shoes": "black shoes"}  # a word takes the longest phrase it ends
    assert {terms[int(r)] for r in rows[1] if r >= 0} == {"red backpack"}

    # the divergence: zero where the word maps are the detector's, positive elsewhere, and it trains them
    guidance = torch.rand(2, 32, mask.shape[1], requires_grad=True)
    rows = rows[:, : mask.shape[1]]
    same = torch.zeros(2, 32, len(terms))
    for b, t in torch.nonzero(rows >= 0).tolist():
        same[b, :, rows[b, t]] = guidance[b, :, t].detach() / guidance[b, :, t].detach().sum()
    assert word_map_divergence(guidance, same, rows).abs() < 1e-5
    other = torch.softmax(torch.randn(2, 32, len(terms)), dim=1)
    loss = word_map_divergence(guidance, other, rows)
    loss.backward()
    assert loss > 0.05 and guidance.grad.abs().sum() > 0
    assert word_map_divergence(guidance, other, torch.full_like(rows, -1)) == 0
