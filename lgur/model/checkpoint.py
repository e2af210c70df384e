"""Checkpoints: safetensors weights plus a JSON card.

The card holds the model config, the identity of the frozen text encoder (with a
fingerprint of its weights), the training data and metrics, and the sha256 of the
weights file. Loading verifies all of it and never unpickles anything.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from ..files import atomic_output, atomic_write_bytes, sha256_file
from .config import LGURConfig
from .lgur import LGUR
from .serving import parameter_counts, trainable_state_dict

log = logging.getLogger(__name__)
FORMAT = "lgur-checkpoint"
FORMAT_VERSION = 1
STORAGE_DTYPES = ("float32", "float16", "int8")
SCALE_SUFFIX = ":scale"  # int8 storage: `key` holds the codes, `key:scale` one float32 scale per row


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what is wrong."""


def row_count(shape: torch.Size | tuple[int, ...]) -> int:
    """Rows that get one int8 scale each: per output channel of a convolution kernel (its last
    dimensions are only the kernel's width), else per row of the last dimension (per output unit
    of a Linear)."""
    if len(shape) == 4:
        return shape[0]
    return math.prod(shape[:-1])


def quantize_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per row (see row_count)."""
    rows = tensor.float().reshape(row_count(tensor.shape), -1)
    scale = rows.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    codes = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes.reshape(tensor.shape), scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows = codes.float().reshape(len(scale), -1)
    return (rows * scale[:, None]).reshape(codes.shape)


def storage_state(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """The tensors as stored on disk. int8 applies to matrices (ndim >= 2); vectors stay float16."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        if not tensor.is_floating_point() or dtype == "float32":
            out[key] = tensor
        elif dtype == "int8" and tensor.ndim >= 2:
            out[key], out[key + SCALE_SUFFIX] = quantize_rows(tensor)
        else:
            out[key] = tensor.half()
    return out


def restore_state(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Undo storage_state: dequantize int8 matrices; every other tensor is returned as stored."""
    out = {}
    for key, tensor in state.items():
        if key.endswith(SCALE_SUFFIX):
            if key[: -len(SCALE_SUFFIX)] not in state:
                raise CheckpointError(f"{name}: scale {key} has no int8 tensor beside it")
            continue
        if tensor.dtype == torch.int8:
            scale = state.get(key + SCALE_SUFFIX)
            rows = row_count(tensor.shape) if tensor.ndim >= 2 else -1
            if scale is None or scale.shape != (rows,) or not scale.is_floating_point():
                raise CheckpointError(f"{name}: int8 tensor {key} lacks a valid per-row scale ({key}{SCALE_SUFFIX})")
            tensor = dequantize_rows(tensor, scale)
        out[key] = tensor
    return out


def card_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


def image_weights_card(weights: str | None) -> dict[str, Any]:
    """Where the image trunk's initial (ImageNet) weights came from: package, version, sha256, licence."""
    if not weights:
        return {}
    from .weights import packaged_weights

    return {"image_weights": {"initialised_from": packaged_weights(weights).card()}}


def save_checkpoint(
    model: LGUR,
    path: str | Path,
    card: dict[str, Any] | None = None,
    dtype: str = "float32",
    include_classifier: bool = False,
) -> Path:
    """Write `path` (.safetensors) and its card `path.json`, each atomically; returns the weights path.

    dtype is the storage precision ("float32", "float16", or "int8": per-row symmetric codes
    for matrices, float16 vectors); the model always computes in float32 after loading.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {path.name}")
    state = storage_state(trainable_state_dict(model, include_classifier), dtype)
    atomic_write_bytes(path, save(state, metadata={"format": FORMAT}))
    text = model.text_encoder
    full_card = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "num_identities": model.classifier.weight.shape[-1] if model.classifier is not None else 0,
        "includes_classifier": include_classifier and model.classifier is not None,
        "dtype": dtype,
        "text_encoder": {"name": model.config.text.name, "source": text.source, "fingerprint": text.fingerprint},
        "parameters": parameter_counts(model),
        **image_weights_card(model.config.image.weights),
        **(card or {}),
        "weights_sha256": sha256_file(path),
    }
    atomic_write_bytes(card_path(path), json.dumps(full_card, indent=2).encode())
    return path


def save_derived(model: LGUR, out: str | Path, card: dict[str, Any], updates: dict[str, Any]) -> Path:
    """Write a checkpoint derived from one loaded with `card` (train-details, fit-foreground): the same
    storage precision and classifier, the card's own entries carried over (what save_checkpoint
    computes is computed again) with `updates` on top."""
    computed = (
        "format",
        "format_version",
        "config",
        "num_identities",
        "includes_classifier",
        "dtype",
        "parameters",
        "text_encoder",
        "weights_sha256",
    )
    kept = {k: v for k, v in card.items() if k not in computed} | updates
    return save_checkpoint(
        model, out, kept, dtype=card.get("dtype", "float32"), include_classifier=bool(card.get("includes_classifier"))
    )


def check_allowed(path: Path, allowed_dirs: list[str | Path] | None) -> None:
    """Refuse a path that resolves (links followed) outside every allowed folder."""
    if allowed_dirs is None:
        return
    real = path.resolve()
    roots = [Path(d).resolve() for d in allowed_dirs]
    if not any(real == root or root in real.parents for root in roots):
        raise CheckpointError(
            f"{path} is outside the folders models may be loaded from ({', '.join(str(r) for r in roots)})"
        )


def read_card(path: str | Path, allowed_dirs: list[str | Path] | None = None) -> dict[str, Any]:
    path = Path(path)
    check_allowed(path, allowed_dirs)
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"{path.name}: only .safetensors checkpoints are accepted (pickled files such as .pt/.pth/.bin are "
            "never loaded, since unpickling can run arbitrary code)"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    card_file = card_path(path)
    if not card_file.is_file():
        raise CheckpointError(f"checkpoint {path.name} has no card: expected {card_file.name} beside it")
    try:
        card = json.loads(card_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"card {card_file.name} is not valid JSON: {error}") from error
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise CheckpointError(f"{card_file.name} is not an LGUR checkpoint card (format != {FORMAT!r})")
    if card.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{card_file.name} has format version {card['format_version']}, newer than this code")
    return card


def load_checkpoint(
    path: str | Path,
    text_encoder_path: str | None = None,
    device: str | torch.device = "cpu",
    allowed_dirs: list[str | Path] | None = None,
) -> tuple[LGUR, dict[str, Any]]:
    """Load a checkpoint written by save_checkpoint, verifying integrity, encoder and shapes.

    allowed_dirs: if given, the file must lie inside one of these folders (links resolved).
    """
    path = Path(path)
    card = read_card(path, allowed_dirs)
    if sha256_file(path) != card.get("weights_sha256"):
        raise CheckpointError(f"{path.name} does not match its card (truncated, corrupt or replaced weights file)")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path.name} is not a readable safetensors file: {error}") from error
    state = restore_state(state, path.name)

    config = LGURConfig.from_dict(card["config"])
    if text_encoder_path:
        config.text.path = text_encoder_path
    num_identities = card.get("num_identities", 0) if card.get("includes_classifier") else 0
    model = LGUR(config, num_identities=num_identities, load_pretrained=False)

    expected_encoder = card.get("text_encoder", {})
    actual = model.text_encoder.fingerprint
    if expected_encoder.get("fingerprint") != actual:
        raise CheckpointError(
            f"text encoder differs: the checkpoint was trained with {expected_encoder.get('name')!r} "
            f"(fingerprint {str(expected_encoder.get('fingerprint'))[:12]}), but the encoder found here "
            f"({model.text_encoder.source}: {model.text_encoder.location}) has fingerprint {actual[:12]}"
        )
    expected = trainable_state_dict(model, include_classifier=bool(num_identities))
    problems = [f"missing {k} {tuple(v.shape)}" for k, v in expected.items() if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k}: file has {tuple(state[k].shape)}, model expects {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"{path.name} does not fit its configured model: {shown}")
    dtype = next(iter(expected.values())).dtype
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, strict=False)
    return model.to(device).eval(), card


def checkpoint_fingerprint(card: dict[str, Any]) -> str:
    """The identity of a checkpoint's weights (as recorded in its card, and verified on load)."""
    return card["weights_sha256"]


# -- optimiser state (resuming a run) ------------------------------------------------------------


def save_optimizer_state(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Optimiser state as safetensors (+ JSON scalars in its metadata): resumable without pickle."""
    state = optimizer.state_dict()
    tensors = {f"{pid}.{k}": v.contiguous() for pid, s in state["state"].items() for k, v in s.items()}
    groups = [dict(g) for g in state["param_groups"]]
    with atomic_output(path) as tmp:
        tmp.write_bytes(save(tensors, metadata={"param_groups": json.dumps(groups)}))


def load_optimizer_state(optimizer: torch.optim.Optimizer, path: Path) -> None:
    with safe_open(str(path), "pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def resolve_checkpoint(
    value: str | Path | None,
    hub_repo: str | None = None,
    hub_file: str | None = None,
    hub_revision: str | None = None,
    default: Path | None = None,
) -> Path:
    """Which checkpoint the app or a command uses: a local path (else `default`, the shipped one), or a
    file fetched from a Hugging Face Hub repository (with its card), at a pinned revision (a commit
    hash) when given. Raises ValueError or OSError saying what failed."""
    if default is None:
        from ..files import DEFAULT_CHECKPOINT as default
    if not hub_repo:
        return Path(value) if value else default
    from huggingface_hub import hf_hub_download

    name = hub_file or "lgur_cpu.safetensors"
    if not name.endswith(".safetensors") or name.startswith(("/", "..")) or "/../" in name:
        raise ValueError(f"the hub file must be a .safetensors path inside the repository, got {name!r}")
    if not hub_revision:
        log.warning("fetching %s from %s unpinned: pass --hub-revision COMMIT to pin it", name, hub_repo)
    try:
        path = Path(hf_hub_download(hub_repo, name, revision=hub_revision))
        hf_hub_download(hub_repo, str(Path(name).with_suffix(".json")), revision=hub_revision)
    except Exception as error:  # the hub client raises many types (HTTP, validation, offline)
        raise OSError(f"could not fetch {name} from {hub_repo}: {type(error).__name__}: {error}") from None
    return path
