"""The LGUR model: shapes, attention, padding, gradients, learning."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from lgur.model.config import preset
from lgur.model.lgur import LGUR
from lgur.model.person import fine_person_map, person_map
from lgur.training.losses import LGURLoss, identity_loss, triplet_ranking_loss
from tests.conftest import CAPTIONS, random_images, tiny_config


@pytest.mark.parametrize("name", ["cpu", "paper"])
def test_preset_shapes(name: str) -> None:
    config = preset(name)
    config.image.pretrained = False
    config.text.allow_random_init = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LGUR(config, num_identities=3).eval()
    rows, cols = model.image_encoder.grid
    assert (rows, cols) == ((24, 8) if name == "paper" else (16, 6))
    assert rows * cols >= 96
    n, p, layers = rows * cols, config.num_prototypes, config.pgu_layers
    ids, mask = model.tokenize(CAPTIONS[:2])
    with torch.no_grad():
        image = model.explain_images(random_images(model, 2))
        text = model.explain_texts(mask, ids)
        out = model.train()(random_images(model, 2), mask, ids)
    assert image.embedding.shape == text.embedding.shape == (2, config.embedding_dim)
    assert image.parts.shape == (2, p, config.part_dim)
    assert image.prototype_attention.shape == (2, layers, config.pgu_heads, p, n)
    assert image.dictionary_weights.shape == (2, config.reconstruction_heads, n, config.num_atoms)
    assert image.foreground.shape == (2, n)
    assert text.prototype_attention.shape == (2, layers, config.pgu_heads, p, ids.shape[1])
    assert text.dictionary_weights.shape == (2, config.reconstruction_heads, ids.shape[1], config.num_atoms)
    assert out.image_dictionary.vectors.shape == out.text.vectors.shape == (2, p, config.part_dim)
    if name == "paper":
        assert (config.num_atoms, config.num_prototypes, config.embedding_dim) == (400, 6, 3072)
        assert model.image_encoder.vit.num_prefix_tokens == 2  # class + distillation, both dropped
        assert len(model.image_encoder.vit.blocks) == 11


def test_attention_rows_sum_to_one(tiny_model: LGUR) -> None:
    ids, mask = tiny_model.tokenize(CAPTIONS)
    images = random_images(tiny_model, 3)
    with torch.no_grad():
        image = tiny_model.explain_images(images)
        text = tiny_model.explain_texts(mask, ids)
        guidance = tiny_model.guidance_attention(images, ids, mask)
    ones = lambda t: torch.ones_like(t)  # noqa: E731
    assert torch.allclose(image.prototype_attention.sum(-1), ones(image.prototype_attention.sum(-1)), atol=1e-5)
    assert torch.allclose(image.dictionary_weights.sum(-1), ones(image.dictionary_weights.sum(-1)), atol=1e-5)
    assert torch.allclose(text.prototype_attention.sum(-1), ones(text.prototype_attention.sum(-1)), atol=1e-5)
    assert torch.allclose(guidance.sum(-1), ones(guidance.sum(-1)), atol=1e-5)
    weighted = tiny_model.guidance_attention(images, ids, mask, weighted=True)  # rows sum to m
    torch.testing.assert_close(weighted.sum(-1), image.foreground[:, None, :].expand_as(weighted.sum(-1)))
    # Dictionary weights of real words sum to 1; padded positions carry none.
    row_sums = text.dictionary_weights.sum(-1)  # (B, H, T)
    valid = mask[:, None, :].expand_as(row_sums)
    assert torch.allclose(row_sums[valid], torch.ones(int(valid.sum())), atol=1e-5)
    assert row_sums[~valid].abs().max() == 0
    assert ((image.foreground > 0) & (image.foreground < 1)).all()


def test_padding_changes_nothing(tiny_model: LGUR) -> None:
    short = CAPTIONS[1]
    ids_alone, mask_alone = tiny_model.tokenize([short])
    ids_batch, mask_batch = tiny_model.tokenize([short, CAPTIONS[2]])  # short gets padded
    assert ids_batch.shape[1] > ids_alone.shape[1]
    t = ids_alone.shape[1]
    images = random_images(tiny_model, 2)
    with torch.no_grad():
        alone = tiny_model.explain_texts(mask_alone, ids_alone)
        padded = tiny_model.explain_texts(mask_batch, ids_batch)
        guide_alone = tiny_model.guidance_attention(images[:1], ids_alone, mask_alone)
        guide_padded = tiny_model.guidance_attention(images, ids_batch, mask_batch)
    assert torch.allclose(alone.embedding[0], padded.embedding[0], atol=1e-5)
    assert torch.allclose(alone.prototype_attention[0], padded.prototype_attention[0, ..., :t], atol=1e-5)
    assert padded.prototype_attention[0, ..., t:].abs().max() == 0
    assert torch.allclose(alone.dictionary_weights[0], padded.dictionary_weights[0, :, :t], atol=1e-5)
    assert padded.dictionary_weights[0, :, t:].abs().max() == 0
    assert torch.allclose(guide_alone[0], guide_padded[0, ..., :t], atol=1e-5)
    assert guide_padded[0, ..., t:].abs().max() == 0
    # Whatever sits in the padded slots must not matter either.
    garbage = ids_batch.clone()
    garbage[0, t:] = 1999
    with torch.no_grad():
        other = tiny_model.explain_texts(mask_batch, garbage)
    assert torch.allclose(other.embedding[0], padded.embedding[0], atol=1e-5)


def test_embeddings_are_unit_norm_and_match_explanations(tiny_model: LGUR) -> None:
    ids, mask = tiny_model.tokenize(CAPTIONS)
    images = random_images(tiny_model, 3)
    with torch.no_grad():
        image, text = tiny_model.embed_images(images), tiny_model.embed_texts(ids, mask)
        explained = tiny_model.explain_images(images)
    for emb in (image, text):
        assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    # The fused fast path and the explicit path used for explanations agree.
    assert torch.allclose(image, explained.embedding, atol=1e-5)


def test_gradients_reach_trainable_parameters_only() -> None:
    torch.manual_seed(0)
    model = LGUR(tiny_config(dropout=0.0), num_identities=3).train()
    ids, mask = model.tokenize(CAPTIONS)
    # One step first: the CNN's residual branches start closed (zero-initialised last norm), so
    # their first convolutions get gradient only once a step has opened them.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(2):
        optimizer.zero_grad()
        out = model(random_images(model, 3), mask, ids)
        losses = LGURLoss(margin=10.0)(out, torch.tensor([0, 1, 2]), model.classifier)  # big margin: all active
        losses["total"].backward()
        if step == 0:
            optimizer.step()
    for name, param in model.named_parameters():
        if name.startswith("text_encoder.backbone."):
            assert not param.requires_grad and param.grad is None, name
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert not model.text_encoder.backbone.training  # frozen encoder: dropout stays off


@pytest.mark.parametrize("use_dga,use_pgu", [(True, True), (False, False)])
def test_tiny_batch_overfits(use_dga: bool, use_pgu: bool) -> None:
    torch.manual_seed(0)
    model = LGUR(tiny_config(dropout=0.0, use_dga=use_dga, use_pgu=use_pgu), num_identities=3).train()
    ids, mask = model.tokenize(CAPTIONS)
    images = random_images(model, 3)
    labels = torch.tensor([0, 1, 2])
    criterion = LGURLoss(seed=0)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    features = model.text_encoder.backbone_features(ids, mask)  # cached frozen outputs
    history = []
    for _ in range(40):
        loss = criterion(model(images, mask, backbone_features=features), labels, model.classifier)["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.2 * history[0], history[::10]


def test_triplet_loss_is_seeded_and_respects_identities() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    labels = torch.arange(8)
    torch.manual_seed(123)  # the global RNG must not matter
    first = triplet_ranking_loss(a, b, labels, 0.3, torch.Generator().manual_seed(7))
    torch.manual_seed(456)
    second = triplet_ranking_loss(a, b, labels, 0.3, torch.Generator().manual_seed(7))
    assert first == second and first > 0
    # Perfectly separated pairs give no loss; a batch of one identity has no negatives at all.
    separated = torch.eye(8, 16)  # positives at cosine 1, negatives at 0: outside the margin
    assert triplet_ranking_loss(separated, separated, labels, 0.3, torch.Generator()) == 0
    assert triplet_ranking_loss(separated, separated, labels, 1.5, torch.Generator()) > 0
    same = torch.zeros(8, dtype=torch.long)
    assert triplet_ranking_loss(a, b, same, 0.3, torch.Generator()) == 0


def test_prototype_overlap_and_the_diversity_option() -> None:
    from lgur.model.pgu import prototype_overlap

    same = torch.full((2, 3, 4, 10), 0.1)  # (B, H, P, L): every prototype reads every position alike
    disjoint = torch.zeros(2, 3, 4, 10)
    for p in range(4):
        disjoint[:, :, p, 2 * p : 2 * p + 2] = 0.5
    assert torch.allclose(prototype_overlap(same), torch.ones(2))
    assert torch.equal(prototype_overlap(disjoint), torch.zeros(2))
    two_pairs = torch.zeros(1, 1, 4, 4)
    two_pairs[0, 0, :2, 0], two_pairs[0, 0, 2:, 3] = 1.0, 1.0
    assert torch.allclose(prototype_overlap(two_pairs), torch.tensor([1 / 3]))
    # Off by default (the paper's objective); when on, it is a logged term that lowers the overlap.
    torch.manual_seed(0)
    model = LGUR(tiny_config(dropout=0.0), num_identities=3).train()
    ids, mask = model.tokenize(CAPTIONS)
    images, labels = random_images(model, 3), torch.tensor([0, 1, 2])
    features = model.text_encoder.backbone_features(ids, mask)
    assert not any(
        k.startswith("diversity")
        for k in LGURLoss()(model(images, mask, backbone_features=features), labels, model.classifier)
    )
    with pytest.raises(ValueError, match="need_weights"):
        LGURLoss(diversity=1.0)(model(images, mask, backbone_features=features), labels, model.classifier)
    criterion = LGURLoss(seed=0, diversity=1.0)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    overlaps = []
    for _ in range(15):
        losses = criterion(model(images, mask, backbone_features=features, need_weights=True), labels, model.classifier)
        overlaps.append(losses["diversity/image"].item())
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
    assert overlaps[-1] < overlaps[0] - 0.05, overlaps


def test_attention_bias_is_a_log_prior_over_the_memory() -> None:
    from lgur.model.layers import CrossAttention

    torch.manual_seed(0)
    attention = CrossAttention(dim=8, heads=2, head_dim=4).eval()
    x, memory = torch.randn(3, 5, 8), torch.randn(3, 7, 8)
    prior = torch.rand(3, 7) + 0.05  # e.g. foreground weights m
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[1, 5:] = False
    _, plain = attention(x, memory, valid, need_weights=True)
    out, biased = attention(x, memory, valid, need_weights=True, memory_bias=prior.log())
    expected = plain * prior[:, None, None, :]
    expected = expected / expected.sum(-1, keepdim=True)  # softmax(logits + log m) = w * m, renormalised
    assert torch.allclose(biased, expected, atol=1e-6)
    assert (biased[1, ..., 5:] == 0).all()  # masked positions stay masked
    fused, _ = attention(x, memory, valid, need_weights=False, memory_bias=prior.log())
    assert torch.allclose(out, fused, atol=1e-5)  # the fused path agrees


def test_foreground_prior_changes_only_the_image_side() -> None:
    torch.manual_seed(0)
    plain = LGUR(tiny_config()).eval()
    with_prior = LGUR(tiny_config(pgu_foreground=True)).eval()
    with_prior.load_state_dict(plain.state_dict())  # the option adds no weights
    assert with_prior.learns_foreground and not plain.learns_foreground
    # m fitted after training (lgur.training.foreground) means something too; a model without DGA has no m
    assert LGUR(tiny_config(foreground_fitted=True)).learns_foreground
    assert not LGUR(tiny_config(foreground_fitted=True, use_dga=False)).learns_foreground
    images = random_images(plain, 2)
    ids, mask = plain.tokenize(CAPTIONS[:2])
    with torch.no_grad():
        assert torch.equal(plain.embed_texts(ids, mask), with_prior.embed_texts(ids, mask))
        a, b = plain.explain_images(images), with_prior.explain_images(images)
    assert not torch.allclose(a.embedding, b.embedding)

    def foreground_mass(e) -> torch.Tensor:  # prototypes' attention mass weighted by m
        return (e.prototype_attention[:, -1].mean(1) * e.foreground[:, None, :]).sum(-1).mean()

    assert foreground_mass(b) > foreground_mass(a)

    # Without the prior, m only scales the memory before the decoder's pre-norm, which cancels it
    # (as in the authors' code): moving every m changes no image embedding. With it, it does.
    for model, moves in ((plain, False), (with_prior, True)):
        with torch.no_grad():
            before = model.embed_images(images)
            model.dga.foreground.bias += 2.0
            after = model.embed_images(images)
        assert torch.allclose(before, after, atol=1e-4) != moves


def test_image_atom_histogram_weights_patches_by_m_only_where_m_is_learned() -> None:
    torch.manual_seed(0)
    plain = LGUR(tiny_config()).eval()
    with_prior = LGUR(tiny_config(pgu_foreground=True)).eval()
    with_prior.load_state_dict(plain.state_dict())
    images = random_images(plain, 2)
    with torch.no_grad():
        a, b = plain.explain_images(images), with_prior.explain_images(images)
    weights, m = a.dictionary_weights.mean(1), a.foreground  # (B, N, atoms), (B, N): the same in both
    assert torch.allclose(a.atom_histogram, weights.mean(1))  # untrained m: a plain mean over patches
    expected = (weights * m[..., None]).sum(1) / m.sum(1, keepdim=True)
    assert torch.allclose(b.atom_histogram, expected, atol=1e-6)
    assert not torch.allclose(a.atom_histogram, b.atom_histogram)


def test_tokenizer_calls_from_two_threads_never_overlap() -> None:
    """The app builds the atom atlas's word table in a background thread while searches run; a fast
    tokenizer keeps padding/truncation settings in shared state, so calls must not interleave."""
    import threading
    import time

    from lgur.model.encoders import TextEncoder

    encoder = TextEncoder(tiny_config().text, 32)
    inside, overlaps = [0], []

    class Recording:  # stands in for the tokenizer: notes whether another call is in progress
        def __call__(self, texts, **options):
            inside[0] += 1
            overlaps.append(inside[0] > 1)
            time.sleep(0.001)
            inside[0] -= 1
            return {"input_ids": [[0]] * len(texts)}

    encoder.tokenizer = Recording()
    calls = [lambda: encoder.encode(["a man"], padding=True), lambda: encoder.encode(["a man"], truncation=False)]
    threads = [threading.Thread(target=lambda c=c: [c() for _ in range(50)]) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(overlaps) == 100 and not any(overlaps)


def test_whole_identity_classifier_is_one_linear_map_over_the_concatenated_parts() -> None:
    torch.manual_seed(0)
    per_part = LGUR(tiny_config(), num_identities=5)
    whole = LGUR(tiny_config(identity_classifier="whole"), num_identities=5)
    parts = torch.randn(3, per_part.config.num_prototypes, per_part.config.part_dim)
    labels = torch.tensor([0, 4, 2])
    assert per_part.classifier(parts).shape == (3, per_part.config.num_prototypes, 5)
    logits = whole.classifier(parts)
    assert logits.shape == (3, 1, 5)
    weight = whole.classifier.weight[0]  # (P * part_dim, identities)
    torch.testing.assert_close(logits[:, 0], parts.flatten(1) @ weight)
    torch.testing.assert_close(
        identity_loss(whole.classifier, parts, labels), F.cross_entropy(parts.flatten(1) @ weight, labels)
    )
    with pytest.raises(ValueError, match="identity_classifier"):
        LGUR(tiny_config(identity_classifier="per-word"))


def test_prototype_register_is_one_more_memory_slot_and_the_maps_cover_the_real_positions() -> None:
    torch.manual_seed(0)
    model = LGUR(tiny_config(pgu_register=True)).eval()
    assert model.pgu.register is not None and LGUR(tiny_config()).pgu.register is None
    images = random_images(model, 2)
    ids_alone, mask_alone = model.tokenize(CAPTIONS[1:2])
    ids, mask = model.tokenize(CAPTIONS[1:3])  # the first one padded
    with torch.no_grad():
        image, text = model.explain_images(images), model.explain_texts(mask, ids)
        alone = model.explain_texts(mask_alone, ids_alone)
        # the fused path and the explicit one agree with the register too
        assert torch.allclose(model.embed_images(images), image.embedding, atol=1e-5)
        assert torch.allclose(model.embed_texts(ids, mask), text.embedding, atol=1e-5)
        parts = model.pgu(torch.randn(2, 5, model.config.dim), None, need_weights=True)
    n = model.image_encoder.grid[0] * model.image_encoder.grid[1]
    assert image.prototype_attention.shape[-1] == n  # the register is not drawn
    assert torch.allclose(image.prototype_attention.sum(-1), torch.ones(()), atol=1e-5)
    t = ids_alone.shape[1]
    assert text.prototype_attention[0, ..., t:].abs().max() == 0  # padding stays unread
    assert torch.allclose(alone.embedding[0], text.embedding[0], atol=1e-5)
    # what it took, per layer: (B, H, P), strictly between 0 and 1
    assert len(parts.register_attention) == model.config.pgu_layers
    share = parts.register_attention[-1]
    assert share.shape == (2, model.config.pgu_heads, model.config.num_prototypes)
    assert ((share > 0) & (share < 1)).all()
    # it changes the embedding: a prototype's reading now includes the register's value
    with torch.no_grad():
        before = model.embed_images(images)
        model.pgu.register.copy_(torch.randn_like(model.pgu.register))  # not a constant: the memory is layer-normalised
        assert not torch.allclose(before, model.embed_images(images), atol=1e-4)


def test_the_person_penalty_moves_the_drawn_prototype_attention_onto_the_person() -> None:
    from lgur.training.setup import TrainingStep

    torch.manual_seed(0)
    model = LGUR(tiny_config(), num_identities=3)
    n = model.image_encoder.grid[0] * model.image_encoder.grid[1]
    person = torch.zeros(3, n)
    person[:, : n // 2] = 1.0  # the teacher: the person is the top half
    step = TrainingStep(model, LGURLoss(seed=0, person=1.0), lambda images: person)
    images = random_images(model, 3)
    ids, mask = model.tokenize(CAPTIONS)
    features = model.text_encoder.backbone_features(ids, mask)
    labels = torch.tensor([0, 1, 2])

    def outside() -> torch.Tensor:
        with torch.no_grad():
            return step(images, features, mask, labels)["person/image"]

    model.eval()  # no dropout: the same forward before and after
    before = outside()
    optimizer = torch.optim.Adam(model.pgu.parameters(), lr=1e-2)
    for _ in range(5):
        optimizer.zero_grad()
        step(images, features, mask, labels)["person/image"].backward()
        optimizer.step()
    assert 0 < outside() < 0.8 * before  # less of the drawn attention outside the person


def test_the_fine_read_out_starts_as_the_patch_grid_and_can_then_read_inside_a_patch() -> None:
    from tests.test_details import _lite0_model

    coarse = _lite0_model(detail_stage=True, detail_stage_blocks=2)
    fine = _lite0_model(detail_stage=True, detail_stage_blocks=2, pgu_fine=True)
    missing, unexpected = fine.load_state_dict(coarse.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("pgu.fine.") for k in missing)
    images = torch.randn(3, 3, 64, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = coarse.explain_images(images), fine.explain_images(images)
    rows, cols = a.grid
    assert b.grid == a.grid and b.prototype_grid == b.prototype_shape == (2 * rows, 2 * cols)
    assert a.prototype_grid is None and a.prototype_shape == a.grid
    # Zero projections: the patch grid's attention spread evenly over each patch's four positions, the same
    # embedding and detail logits.
    torch.testing.assert_close(fine.pgu.fine.upsample(a.prototype_attention) / 4, b.prototype_attention)
    torch.testing.assert_close(b.embedding, a.embedding)
    torch.testing.assert_close(b.detail_logits, a.detail_logits)
    # Learned projections: the four positions of a patch differ, the maps still sum to 1, and what the
    # prototypes read there changes the embedding.
    for linear in [*fine.pgu.fine.keys, *fine.pgu.fine.values]:
        torch.nn.init.normal_(linear.weight, std=0.5)
    with torch.no_grad():
        c = fine.explain_images(images)
    quarters = c.prototype_attention.unflatten(-1, (rows, 2, cols, 2))
    assert not torch.allclose(quarters[..., 0, :, 0], quarters[..., 1, :, 1])
    torch.testing.assert_close(c.prototype_attention.sum(-1), torch.ones(c.prototype_attention.shape[:-1]))
    assert not torch.allclose(c.embedding, a.embedding)
    # The training forward reads the same fine maps (every branch's image side).
    fine.train()
    ids, mask = fine.tokenize(CAPTIONS[:3])
    out = fine(images, mask, ids, need_weights=True)
    assert out.image_dictionary.attention[-1].shape[-1] == 4 * rows * cols == out.image.attention[-1].shape[-1]
    assert out.text.attention[-1].shape[-1] == mask.shape[1]


def test_the_fine_read_out_needs_a_trunk_with_a_map_at_half_the_stride() -> None:
    with pytest.raises(ValueError, match="pgu_fine needs"):
        LGUR(tiny_config(pgu_fine=True), load_pretrained=False)


def test_the_row_prior_holds_each_prototype_near_its_height_and_leaves_the_words_alone(tmp_path) -> None:
    from lgur.model.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = LGUR(tiny_config(), num_identities=3).eval()
    images = random_images(model, 4)
    ids, mask = model.tokenize(CAPTIONS[:2])
    rows, cols = model.image_encoder.grid
    height = ((torch.arange(rows) + 0.5) / rows).repeat_interleave(cols)  # each patch's height

    def mean_heights() -> torch.Tensor:  # (P,) where each prototype's last-layer map lies
        with torch.no_grad():
            maps = model.explain_images(images).prototype_attention[:, -1].mean(1)  # (B, P, N)
        return (maps @ height).mean(0)

    def words() -> torch.Tensor:
        with torch.no_grad():
            return model.embed_texts(ids, mask)

    plain_heights, plain_words = mean_heights(), words()
    wanted = (0.05, 0.95, 0.05, 0.95, 0.5, 0.5)
    model.pgu.set_rows(wanted, 0.1)
    placed = mean_heights()
    assert (placed[[0, 2]] < 0.2).all() and (placed[[1, 3]] > 0.8).all()  # plain maps lie mid-height
    assert ((placed - torch.tensor(wanted)).abs() < (plain_heights - torch.tensor(wanted)).abs()).all()
    assert torch.equal(words(), plain_words)  # the captions' words have no rows
    model.config.prototype_rows, model.config.prototype_row_width = wanted, 0.1
    loaded, _ = load_checkpoint(save_checkpoint(model, tmp_path / "rows.safetensors", {}))
    assert loaded.config.prototype_rows == wanted and torch.equal(loaded.pgu.row_prior, model.pgu.row_prior)
    model.set_prototype_rows(wanted, (0.0, 0.1))  # the first layer free, the drawn one placed
    with torch.no_grad():
        first, last = model.explain_images(images).prototype_attention[:, :2].mean(2).unbind(1)  # (B, P, N)
    assert torch.allclose((last @ height).mean(0), placed, atol=0.1)
    assert ((first @ height).mean(0) - plain_heights).abs().max() < 0.02  # the first layer reads as without
    loaded, _ = load_checkpoint(save_checkpoint(model, tmp_path / "layers.safetensors", {}))
    assert loaded.config.prototype_row_width == (0.0, 0.1) and torch.equal(loaded.pgu.row_prior, model.pgu.row_prior)
    model.pgu.set_rows(())  # off again: the model it was
    assert torch.allclose(mean_heights(), plain_heights)
    with pytest.raises(ValueError, match="one or one per layer"):
        model.pgu.set_rows(wanted, (0.1, 0.1, 0.1))
    with pytest.raises(ValueError, match="one height per prototype"):
        model.pgu.set_rows((0.1, 0.9))
    with pytest.raises(ValueError, match="heights in"):
        model.pgu.set_rows((0.1, 0.2, 0.3, 0.4, 0.5, 1.5))


def test_the_fine_person_map_tells_the_half_of_a_patch_that_holds_the_person() -> None:
    class PatchMeans(torch.nn.Module):  # a detector as sure of the person as a patch is bright
        def __init__(self, patch: int) -> None:
            super().__init__()
            self.patch = patch

        def forward(self, images: torch.Tensor) -> tuple[None, torch.Tensor]:
            means = F.avg_pool2d(images[:, :1], self.patch).flatten(1)  # (B, N)
            return None, torch.logit(means.clamp(1e-4, 1 - 1e-4))[..., None]  # (B, N, 1 phrase)

    model = LGUR(tiny_config(), num_identities=3).eval()
    (rows, cols), (h, w) = model.image_encoder.grid, model.config.image.img_size
    patch = h // rows
    model.details = PatchMeans(patch)
    model.detail_tokens = lambda images: images  # the detector reads the pixels themselves
    images = torch.zeros(1, 3, h, w)
    r, c = 5, 3  # one bright cell, half a patch on each side: the bottom-right quarter of patch (2, 1)
    images[..., r * patch // 2 : (r + 1) * patch // 2, c * patch // 2 : (c + 1) * patch // 2] = 1.0
    coarse = person_map(model, images).reshape(rows, cols)
    assert coarse[2, 1] == 1.0 and (coarse > 0.01).sum() == 1  # the whole patch, all four of its cells
    fine = fine_person_map(model, images).reshape(2 * rows, 2 * cols)
    assert fine[r, c] == 1.0 and (fine > 0.01).sum() == 1  # the cell alone: its three neighbours in the patch
    # each lie in some shifted patch without the bright cell
