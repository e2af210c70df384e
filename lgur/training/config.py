"""Training configuration: one dataclass, and named recipes that state only what differs from it.

Every field is a `python -m lgur train` option (cli.py builds them from the fields and their
`help`), so a run is the same whether it is started from the command line or from Python.
"""

from __future__ import annotations

import json
from dataclasses import Field, dataclass, field, fields
from typing import Any

from ..model.checkpoint import read_card
from ..model.config import LGURConfig, preset

SAMPLES = ("captions", "images", "identities")


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A field that is also a command-line option (its help text; `cli` False: Python only)."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


def flag(option: Field) -> str:
    """The command-line flag of a config field: its metadata's `flag`, else --its-name."""
    return option.metadata.get("flag", "--" + option.name.replace("_", "-"))


@dataclass
class TrainConfig:
    data: str = field(
        metadata={"help": "dataset folder (CUHK-PEDES, ICFG-PEDES, RSTPReid or synthetic)", "required": True}
    )
    out: str = field(metadata={"help": "run folder: checkpoints, logs, curves", "required": True})
    preset: str = option("cpu", "the model's preset and its training recipe", cli=False)
    epochs: int = option(60, "epochs of the schedule")
    batch_size: int = option(64, "samples per batch")
    lr: float = option(1e-3, "learning rate of the BiLSTM, the part projections and the classifiers")
    lr_backbone: float = option(1e-4, "learning rate of the image encoder, DGA and PGU")
    decay_epochs: tuple[int, ...] = option((20, 40, 50), "x0.1 at these epochs of --decay-reference")
    decay_reference: int = option(60, "the schedule's length that --decay-epochs are given for")
    warmup_steps: int = option(0, "steps of linear learning-rate warm-up")
    margin: float = option(0.3, "margin of the triplet ranking loss")
    seed: int = option(0, "seed of every random draw (weights, batches, augmentation, negatives)")
    pad: int = option(10, "augmentation padding at 384-pixel height; scaled with the input size")
    samples: str = option(
        "captions",
        "an epoch visits every caption (the paper), every image (one random caption each), or every identity "
        "with --instances images each, side by side in one batch (so a batch holds positives)",
        choices=SAMPLES,
    )
    instances: int = option(2, "images per identity in a batch, with --samples identities")
    # Not in the paper (each measured: docs/EXPERIMENTS.md):
    sdm: float = option(0.0, "weight of the similarity distribution matching loss (IRRA, CVPR 2023)")
    temperature: float = option(0.07, "initial (learned) temperature of the SDM loss")
    prototype_diversity: float = option(0.0, "weight of the prototypes' attention overlap penalty")
    caption_crops: float = option(
        0.0, "share of samples whose caption is cut to a few of its clauses (a shorter true description)"
    )
    crops_from_epoch: int = option(0, "first epoch (0-based) that uses caption crops")
    term_prediction: float = option(
        0.0,
        "weight of predicting the captions' person terms (words and pairs that recur for one identity) from "
        "each branch's embedding, one linear classifier for both modalities",
    )
    prototype_person: float = option(
        0.0,
        "weight of the prototypes' attention outside the person as --person-from's detail detector sees it "
        "(lgur.model.person)",
    )
    person_from: str | None = option(None, "the teacher of --prototype-person: a checkpoint with a detail detector")
    person_saturation: float = option(
        1.0, "the teacher's person map is 1 wherever it is this sure relative to its surest patch"
    )
    person_from_epoch: int = option(0, "first epoch (0-based) of --prototype-person")
    person_fine: bool = option(False, "the teacher's person map at the fine grid (with pgu_fine)")
    prototype_rows: tuple[float, ...] | None = option(
        None, "heights (0 top, 1 bottom) of the image prototypes' row prior, handed out by where they read"
    )
    prototype_row_width: float | tuple[float, ...] = option(
        0.1, "width of the row prior: one, or one per decoder layer (0: that layer free)"
    )
    atom_entropy: float = option(0.0, "weight of the entropy of DGA's atom weights per patch and per word")
    word_maps: float = option(
        0.0,
        "weight of the divergence of each phrase word's guidance map (the patches that read it) from the "
        "detail detector's map of its phrase (a model with a detail detector and DGA)",
    )
    framing: float = option(0.0, "share of training images reframed as a person detector frames its crops")
    init_from: str | None = option(
        None,
        "a second stage: start from this checkpoint (a run's last.safetensors, or a shipped one: its identity "
        "classifier is then imprinted) and its model, with a fresh optimiser and schedule",
    )
    frozen: tuple[str, ...] = option(
        (),
        "modules of the model held fixed, weights and batch-norm statistics (image_encoder,dga.foreground,...)",
        flag="--freeze",
    )
    max_minutes: float | None = option(None, "stop early; the best-on-val model is still tested")
    final_test: bool = option(True, "test the best-on-val model when the run ends", cli=False)
    stop_after: int | None = option(
        None, "end the run after this epoch of the schedule (the same command resumes to the same place)"
    )
    use_dga: bool = option(True, "DGA (the ablation leaves it out)", cli=False)
    use_pgu: bool = option(True, "PGU (the ablation leaves it out)", cli=False)
    text_encoder_path: str | None = option(None, "a local copy of the text encoder", cli=False)
    image_pretrained_path: str | None = option(None, "a local file of the image trunk's pretrained weights", cli=False)
    cache_dir: str | None = option(None, "folder of cached frozen text features (default RUN/cache)", flag="--cache")
    threads: int | None = option(None, "CPU threads (torch.set_num_threads)")
    model_overrides: dict[str, Any] = option({}, "model settings, e.g. pgu_fine=true", cli=False)

    def model_config(self) -> LGURConfig:
        # A second stage builds the model its checkpoint holds (a detail detector included), then the overrides.
        config = LGURConfig.from_dict(read_card(self.init_from)["config"]) if self.init_from else preset(self.preset)
        config.use_dga, config.use_pgu = self.use_dga, self.use_pgu
        if self.text_encoder_path:
            config.text.path = self.text_encoder_path
        if self.image_pretrained_path:
            config.image.pretrained_path = self.image_pretrained_path
        for key, value in self.model_overrides.items():
            target = config
            *parents, leaf = key.split(".")
            for p in parents:
                target = getattr(target, p)
            if not hasattr(target, leaf):
                raise ValueError(f"unknown model setting {key!r}")
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass  # a plain string
            setattr(target, leaf, tuple(value) if isinstance(value, list) else value)
        if self.prototype_rows and not self.init_from:  # from scratch: in the order given
            config.prototype_rows, config.prototype_row_width = tuple(self.prototype_rows), self.prototype_row_width
        return config

    def check(self) -> None:
        if self.samples not in SAMPLES:
            raise ValueError(f"unknown sampling {self.samples!r}: {', '.join(SAMPLES)}")
        if self.prototype_diversity and not self.use_pgu:
            raise ValueError("--prototype-diversity needs PGU (there are no prototypes with --no-pgu)")
        if self.prototype_person and (not self.person_from or not self.use_pgu):
            raise ValueError("--prototype-person needs PGU and --person-from, a checkpoint with a detail detector")
        if self.word_maps and not (self.use_dga and self.init_from):
            raise ValueError("--word-maps needs DGA and --init-from, a checkpoint with a detail detector")
        if self.prototype_rows and not self.use_pgu:
            raise ValueError("--prototype-rows needs PGU (there are no prototypes with --no-pgu)")


# Training recipes: what differs from TrainConfig's defaults (the paper's). The paper fine-tunes a
# pretrained DeiT at 1e-4; the CPU preset's trunk starts from scratch, so its encoder and the DGA/PGU
# modules learn at a higher rate, with warm-up.
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    "cpu": {
        "epochs": 26,
        "lr_backbone": 5e-4,
        "warmup_steps": 300,
        "decay_epochs": (40, 52),  # late decays: the encoder learns from scratch
        "samples": "identities",
        "sdm": 1.0,
        "prototype_diversity": 2.0,
        "caption_crops": 0.5,  # after two epochs of full captions, half the samples as crops
        "crops_from_epoch": 2,
    },
    "cpu-vit": {"epochs": 8, "lr_backbone": 5e-4, "warmup_steps": 300, "samples": "images"},
}
# The ImageNet-pretrained trunk converges in fewer epochs.
RECIPES["cpu-lite0"] = {**RECIPES["cpu"], "epochs": 16, "term_prediction": 1.0}


def recipe(name: str, **overrides: Any) -> TrainConfig:
    """The recipe `name` (a model preset), with the overrides that are not None."""
    values = {**RECIPES.get(name, {}), **{k: v for k, v in overrides.items() if v is not None}}
    return TrainConfig(preset=name, **values)


def train_flag(name: str) -> str:
    """The `train` command's flag for TrainConfig's field `name`."""
    return flag(next(f for f in fields(TrainConfig) if f.name == name))
