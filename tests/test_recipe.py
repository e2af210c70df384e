"""The CPU recipe's parts beyond the paper: CNN trunk, identity sampling, SDM loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lgur.data.dataset import (
    RetrievalSplit,
    caption_crops,
    description_terms,
    person_terms,
    swapped_caption,
)
from lgur.model.config import ImageEncoderConfig
from lgur.model.encoders import CNNEncoder, build_image_encoder
from lgur.model.pgu import Parts
from lgur.training.config import SAMPLES, TrainConfig
from lgur.training.losses import (
    TermClassifier,
    similarity_distribution_matching,
    term_prediction_loss,
)
from lgur.training.sampling import epoch_order


def test_cnn_encoder_gives_the_configured_grid() -> None:
    config = ImageEncoderConfig(kind="cnn", timm_name="resnet18", img_size=(64, 24), patch_size=8, pretrained=False)
    encoder = build_image_encoder(config, dim=32)
    assert isinstance(encoder, CNNEncoder) and encoder.grid == (8, 3)
    tokens = encoder(torch.randn(2, 3, 64, 24))
    assert tokens.shape == (2, 24, 32)
    with pytest.raises(ValueError, match="strides"):
        build_image_encoder(ImageEncoderConfig(kind="cnn", timm_name="resnet18", patch_size=12, pretrained=False), 32)
    with pytest.raises(ValueError, match="kind"):
        build_image_encoder(ImageEncoderConfig(kind="rnn"), 32)


def test_cnn_encoder_adds_a_deeper_stage_upsampled_to_its_grid() -> None:
    config = ImageEncoderConfig(
        kind="cnn", timm_name="resnet18", img_size=(64, 24), patch_size=8, context_stride=16, pretrained=False
    )
    encoder = build_image_encoder(config, dim=32).eval()
    assert encoder.grid == (8, 3) and encoder.context_proj.in_features == 256  # resnet18's stride-16 stage
    images = torch.randn(2, 3, 64, 24)
    with torch.no_grad():
        tokens = encoder(images)
        fine, coarse = encoder.cnn(images * encoder.input_scale + encoder.input_shift)
        context = encoder.context_proj(coarse.permute(0, 2, 3, 1))  # (2, 4, 2, 32)
        # each stride-16 cell feeds the 2x2 stride-8 cells under it (rows 0-1 <- 0, ...; cols 2 <- 1)
        expected = encoder.proj(fine.permute(0, 2, 3, 1)) + context.repeat_interleave(2, 1)[:, :, [0, 0, 1]]
    assert tokens.shape == (2, 24, 32)
    assert torch.allclose(tokens, expected.flatten(1, 2) + encoder.position, atol=1e-5)
    with pytest.raises(ValueError, match="coarser"):
        build_image_encoder(
            ImageEncoderConfig(kind="cnn", timm_name="resnet18", patch_size=16, context_stride=8, pretrained=False), 32
        )


def _brute_force_sdm(
    a: torch.Tensor,
    b: torch.Tensor,
    labels: torch.Tensor,
    scale: float,
    negatives: list | None = None,
    match: list[list[bool]] | None = None,
) -> float:
    total = 0.0
    for way, (x, y) in enumerate(((a, b), (b, a))):
        rows = []
        for i in range(len(x)):
            logits = [scale * float(x[i] @ y[j]) for j in range(len(y))]
            if match is None:
                matches = [labels[j] == labels[i] for j in range(len(y))]
            else:  # match[i][j]: a[i] matches b[j]
                matches = [match[i][j] if way == 0 else match[j][i] for j in range(len(y))]
            if way == 0 and negatives is not None and negatives[i] is not None:  # one more, never a match
                logits.append(scale * float(x[i] @ negatives[i]))
                matches.append(False)
            z = math.log(sum(math.exp(v) for v in logits))
            positives = sum(int(m) for m in matches)
            kl = 0.0
            for v, m in zip(logits, matches):
                p = math.exp(v - z)
                q = (1.0 / positives if m else 0.0) + 1e-8
                kl += p * ((v - z) - math.log(q))
            rows.append(kl)
        total += sum(rows) / len(rows)
    return total


def test_position_embedding_resampling() -> None:
    from lgur.model.encoders import resize_position_embedding

    rows = torch.arange(4.0).repeat_interleave(3)  # value = row index on a 4x3 grid
    position = torch.stack([rows, torch.ones(12)], dim=1)[None]  # (1, 12, 2)
    assert torch.equal(resize_position_embedding(position, (4, 3), (4, 3)), position)
    bigger = resize_position_embedding(position, (4, 3), (8, 6)).reshape(8, 6, 2)
    assert torch.allclose(bigger[..., 1], torch.ones(8, 6))  # a constant stays constant
    assert (bigger[1:, :, 0] >= bigger[:-1, :, 0]).all() and bigger[0, 0, 0] == 0 and bigger[-1, 0, 0] == 3
    assert torch.allclose(bigger[:, 0, 0], bigger[:, 5, 0])  # no change across the columns


def test_sdm_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    scale = torch.tensor(math.log(10.0), dtype=torch.float64)
    got = similarity_distribution_matching(a, b, labels, scale).item()
    assert got == pytest.approx(_brute_force_sdm(a, b, labels, 10.0), rel=1e-6)
    # perfectly separated identities at a sharp temperature: almost no loss
    e = torch.eye(3, dtype=torch.float64)[labels]
    assert similarity_distribution_matching(e, e, labels, torch.tensor(math.log(100.0))).item() < 0.05


def test_term_prediction_matches_brute_force_and_skips_texts_without_terms() -> None:
    g = torch.Generator().manual_seed(3)
    classifier = TermClassifier(4, 5).double()
    e = F.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=1)
    targets = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.float64)
    logits = F.linear(e * 2.0, classifier.weight, classifier.bias).detach()  # unit rows x sqrt(E)
    want = []
    for row, terms in ((0, [0, 2]), (2, [3])):  # row 1 names nothing: skipped, not a zero loss
        log_p = logits[row] - torch.logsumexp(logits[row], 0)
        want.append(-sum(log_p[t] for t in terms) / len(terms))
    got = term_prediction_loss(classifier(Parts(e[:, None], None)), targets)  # one part: e itself
    assert got.detach().item() == pytest.approx(float(sum(want) / 2), rel=1e-9)
    got.backward()
    assert classifier.weight.grad.abs().sum() > 0
    # an embedding that predicts its terms costs less than one that predicts others
    sharp = TermClassifier(4, 5, bias=False).double()
    with torch.no_grad():
        sharp.weight.copy_(torch.eye(5, 4, dtype=torch.float64) * 5)
    one_hot = Parts(torch.eye(4, dtype=torch.float64)[:1, None], None)
    right = term_prediction_loss(sharp(one_hot), torch.tensor([[1.0, 0, 0, 0, 0]], dtype=torch.float64))
    wrong = term_prediction_loss(sharp(one_hot), torch.tensor([[0, 1.0, 0, 0, 0]], dtype=torch.float64))
    assert right < wrong - 1


def test_description_terms_keep_each_colour_on_its_thing() -> None:
    terms = description_terms("A man wearing a red jacket, blue jeans. He carries a black backpack.")
    assert {"man", "red jacket", "blue jeans", "black backpack", "he"} <= terms
    assert not {"a", "wearing", "carries", "jeans he", "jacket blue"} & terms  # no pair across a comma
    swapped = description_terms("a man in a blue jacket and red jeans")
    assert {"blue jacket", "red jeans"} <= swapped and not {"red jacket", "blue jeans"} & swapped


def test_person_terms_keep_what_recurs_for_one_identity() -> None:
    # Each identity is described twice in its own colour; the street or the park changes per photo.
    colours = ["red", "blue", "green", "black", "white", "pink", "grey", "brown"]
    captions, identities = [], []
    for i, colour in enumerate(colours):
        for scene in ("street", "park"):
            captions.append(f"a person in a {colour} coat walking in a {scene}")
            identities.append(i)
    kept = person_terms([description_terms(c) for c in captions], identities)
    assert {"red coat", "blue coat", "red", "blue"} <= kept
    assert not {"street", "park", "walking"} & kept  # about the photo, not the person
    assert "coat" not in kept  # everyone's: recurs no more than chance


def _split(images_per_identity: list[int], captions_per_image: int = 2) -> RetrievalSplit:
    image_ids, caption_image, caption_ids = [], [], []
    for identity, n in enumerate(images_per_identity):
        for _ in range(n):
            image_ids.append(identity)
            caption_image += [len(image_ids) - 1] * captions_per_image
            caption_ids += [identity] * captions_per_image
    return RetrievalSplit(
        records=[None] * len(image_ids),
        images=torch.zeros(len(image_ids), 3, 1, 1, dtype=torch.uint8),
        image_ids=torch.tensor(image_ids),
        captions=[""] * len(caption_ids),
        caption_ids=torch.tensor(caption_ids),
        caption_image=torch.tensor(caption_image),
    )


def test_identity_sampling_puts_instances_side_by_side() -> None:
    split = _split([3, 2, 1, 2, 3])
    cfg = TrainConfig(data="", out="", samples="identities", instances=2)
    order = epoch_order(split, cfg, split.caption_ids, torch.Generator().manual_seed(0))
    assert len(order) == 5 * 2
    ids = split.caption_ids[order].view(-1, 2)
    assert torch.all(ids[:, 0] == ids[:, 1])  # each identity's instances are neighbours
    assert sorted(ids[:, 0].tolist()) == [0, 1, 2, 3, 4]  # every identity once per epoch
    images = split.caption_image[order].view(-1, 2)
    several = [row for row, i in zip(images, ids[:, 0]) if i != 2]  # identity 2 has one image only
    assert all(row[0] != row[1] for row in several)  # two different images when there are two
    again = epoch_order(split, cfg, split.caption_ids, torch.Generator().manual_seed(0))
    assert torch.equal(order, again)


@pytest.mark.parametrize("samples, length", [("captions", 22), ("images", 11)])
def test_caption_and_image_sampling_cover_the_split(samples: str, length: int) -> None:
    split = _split([3, 2, 1, 2, 3])
    order = epoch_order(split, TrainConfig(data="", out="", samples=samples), split.caption_ids, torch.Generator())
    assert len(order) == length
    if samples == "images":
        assert sorted(split.caption_image[order].tolist()) == list(range(11))  # one caption of each image


def test_swapped_caption_is_false_but_uses_the_same_kind_of_words() -> None:
    rng = np.random.default_rng(0)
    caption = "A man in a red jacket and blue jeans, with black boots and a grey backpack."
    kinds = set()
    for _ in range(200):
        swapped = swapped_caption(caption, rng)
        assert swapped is not None and swapped != caption
        before, after = caption.split(), swapped.split()
        assert len(after) == len(before)
        changed = [(x, y) for x, y in zip(before, after) if x != y]
        if len(changed) == 2 and sorted(x for x, _ in changed) == sorted(y for _, y in changed):
            kinds.add("trade")  # two colours traded places
        elif changed[0][0] in ("red", "blue", "black", "grey"):
            kinds.add("colour")
        else:
            assert changed[0][0].strip(",.") in ("jacket", "jeans", "boots", "backpack")
            kinds.add("garment")
    assert kinds == {"trade", "colour", "garment"}
    # synonyms are not a change: grey and gray are never traded, and "navy blue" is one colour
    for _ in range(50):
        swapped = swapped_caption("a grey coat and gray trousers", rng)
        assert swapped != "a gray coat and grey trousers"
        out = swapped_caption("a navy blue coat", rng)
        assert ("navy blue" in out) != out.endswith(" coat")  # the colour as a whole, or the garment
    assert swapped_caption("a man walking on the street", rng) is None
    assert swapped_caption(caption, np.random.default_rng(3)) == swapped_caption(caption, np.random.default_rng(3))


def test_caption_crops_are_ordered_subsets_of_clauses() -> None:
    caption = "A woman in a red coat, black trousers and white sneakers. She carries a brown handbag."
    clauses = ["A woman in a red coat", "black trousers", "white sneakers", "She carries a brown handbag"]
    crops = caption_crops(caption, 50, np.random.default_rng(0))
    assert len(crops) == 50
    for crop in crops:
        parts = crop.split(", ")
        assert 1 <= len(parts) <= 3 and all(p in clauses for p in parts)
        assert [clauses.index(p) for p in parts] == sorted(clauses.index(p) for p in parts)  # order kept
    assert len(set(crops)) > 5  # varied
    assert caption_crops("a man in black", 2, np.random.default_rng(0)) == ["a man in black"] * 2
    assert crops == caption_crops(caption, 50, np.random.default_rng(0))  # seeded


def test_experiments_share_the_recipe_run_with_the_ablation(tmp_path) -> None:
    from lgur.training.ablation import OPTIONS, experiments_table, run_experiments, run_folder

    assert run_folder(tmp_path, "CPU recipe") == run_folder(tmp_path, "full LGUR")  # trained once for both
    assert len({run_folder(tmp_path, name) for name in OPTIONS}) == len(OPTIONS)
    with pytest.raises(ValueError, match="unknown experiments"):
        run_experiments("data", str(tmp_path), "gallery", only=["with magic"])
    row = {
        "epochs": 3,
        "train_minutes": 12.4,
        "prototype_overlap": None,
        "pointing_game": 41.25,
        "metrics": {"test": {"R@1": 30.0, "mAP": 33.3}, "test-paraphrase": {"R@1": 2.5}},
        "query_bench": {"precision@10": 28.75},
    }
    line = experiments_table({"without SDM": row}).splitlines()[-1]
    assert line == "| without SDM | 3 epochs, 12 min | 30.00 | 33.30 | 2.50 | 28.8% | - | - | 41.2% |"
    row |= {"distinct_regions": 2, "background_share": [0.886, 0.12, 0.3]}
    line = experiments_table({"without SDM": row}).splitlines()[-1]
    assert "| 2 of 3; 89% | 41.2% |" in line


def test_the_trunk_table_changes_one_setting_of_cpu_lite0_each(tmp_path) -> None:
    from lgur.training.ablation import LITE0, TERMS, TRUNK_OPTIONS, run_experiments, run_folder
    from lgur.training.config import recipe

    folders = {run_folder(tmp_path, name) for name in TRUNK_OPTIONS}
    assert len(folders) == len(TRUNK_OPTIONS) and all(f.parent == tmp_path / "trunk" for f in folders)
    reference = TRUNK_OPTIONS[LITE0]
    assert all(options["preset"] == "cpu-lite0" for options in TRUNK_OPTIONS.values())
    names = list(TRUNK_OPTIONS)

    def changes(options: dict, base: dict) -> int:  # the teacher's checkpoint goes with its weight: one option
        return sum(options.get(k) != base.get(k) for k in options | base if k != "person_from")

    for i, name in enumerate(names[1:], 1):  # one change each against an earlier row: the reference, terms, ...
        assert any(changes(TRUNK_OPTIONS[name], TRUNK_OPTIONS[n]) == 1 for n in names[:i]), name
    assert changes(TRUNK_OPTIONS[TERMS], reference) == 1 and names[0] == LITE0
    random = recipe("cpu-lite0", data="d", out="o", model_overrides={"image.weights": None}).model_config()
    assert random.image.weights is None and random.image.timm_name == "tf_efficientnet_lite0"  # the same trunk
    with pytest.raises(ValueError, match="unknown experiments"):
        run_experiments("data", str(tmp_path), "gallery", only=["CPU recipe"], table="trunk")


def test_the_command_line_offers_every_training_option_with_its_help() -> None:
    import dataclasses

    from lgur import cli

    parser = cli.build_parser()
    for samples in SAMPLES:
        assert parser.parse_args(["train", "--data", "d", "--out", "o", "--samples", samples]).samples == samples
    args = parser.parse_args(
        [
            "train",
            "--data",
            "d",
            "--out",
            "o",
            "--freeze",
            "image_encoder,dga.foreground",
            "--prototype-row-width",
            "0,0.045",
            "--framing",
            "0.5",
            "--person-fine",
        ]
    )
    assert args.frozen == ("image_encoder", "dga.foreground") and args.prototype_row_width == (0.0, 0.045)
    assert args.framing == 0.5 and args.person_fine is True and args.epochs is None  # None: the recipe's value
    assert (
        parser.parse_args(["train", "--data", "d", "--out", "o", "--prototype-row-width", "0.1"]).prototype_row_width
        == 0.1
    )
    offered = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)}
    assert set(args.config_fields) == offered
    assert all(f.metadata.get("help") for f in dataclasses.fields(TrainConfig))
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--data", "d", "--out", "o", "--samples", "neighbours"])
