"""Training: `python -m lgur train --preset cpu --data DIR --out RUN_DIR`.

Reads top to bottom: setup (setup.py: data, model, losses, optimiser, resumed state) -> epochs
(train_one_epoch, then validate on *val* and keep the best) -> test the best. Seeded and resumable at
epoch boundaries; every random draw comes from a generator seeded by (seed, epoch, rank). Runs on
several processes with `torchrun` (DistributedDataParallel: gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save

from ..data.dataset import augment, normalize
from ..eval.evaluate import evaluate_split, record_in_card, score_test_splits
from ..files import atomic_write_bytes
from ..model.checkpoint import load_checkpoint, save_checkpoint, save_optimizer_state
from ..search.atoms import text_atom_average
from .config import TrainConfig
from .sampling import batch_texts, epoch_order, term_targets
from .setup import Run, setup


def lr_factor(step: int, epoch: int, cfg: TrainConfig) -> float:
    """Step decay x0.1 at the paper's milestones (scaled to the run's epochs), after a linear warm-up."""
    milestones = [round(m * cfg.epochs / cfg.decay_reference) for m in cfg.decay_epochs]
    factor = 0.1 ** sum(epoch >= m for m in milestones)
    if cfg.warmup_steps and step < cfg.warmup_steps:
        factor *= (step + 1) / cfg.warmup_steps
    return factor


def plot_curves(log_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses, epochs, val = [], [], [], []
    for line in log_path.read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "step":
            steps.append(row["step"])
            losses.append(row["loss/total"])
        elif row["kind"] == "epoch":
            epochs.append(row["step"])
            val.append((row["val/R@1"], row["val/mAP"]))
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=110)
    a.plot(steps, losses, lw=0.8)
    a.set_xlabel("step")
    a.set_ylabel("training loss")
    if val:
        b.plot(epochs, [v[0] for v in val], "o-", label="val R@1")
        b.plot(epochs, [v[1] for v in val], "s-", label="val mAP")
        b.legend()
    b.set_xlabel("step")
    b.set_ylabel("%")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def train_one_epoch(run: Run, epoch: int, progress: bool) -> bool:
    """One pass over the epoch's batches; -> True when cfg.max_minutes ran out."""
    from tqdm import tqdm

    cfg, state = run.cfg, run.state
    epoch_start = time.perf_counter()
    run.step_module.train()
    torch.manual_seed(cfg.seed * 65_537 + epoch * 97 + run.rank)  # dropout: reproducible after a resume
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    order = epoch_order(run.train, cfg, run.labels, g)
    if run.world > 1:  # equal shards of whole batches, so identity groups stay together
        whole = len(order) // (cfg.batch_size * run.world) * cfg.batch_size * run.world
        order = order[:whole].view(-1, run.world, cfg.batch_size)[:, run.rank].flatten()
    run.criterion.person = cfg.prototype_person if epoch >= cfg.person_from_epoch else 0.0
    run.criterion.generator.manual_seed(cfg.seed * 7919 + epoch * 131 + run.rank)
    aug = torch.Generator().manual_seed(cfg.seed * 104_729 + epoch * 31 + run.rank)
    crop_draws = torch.Generator().manual_seed(cfg.seed * 15_485_863 + epoch * 53 + run.rank)
    batches = len(order) // cfg.batch_size
    bar = tqdm(range(batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (progress and run.main))
    stop = False
    for b in bar:
        idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        images = run.train.images[run.train.caption_image[idx]]
        images = normalize(augment(images, run.pad, aug, cfg.framing)).to(run.device)
        text = batch_texts(run.texts, cfg, idx, epoch, crop_draws)
        features, mask = run.texts.features.batch(text)
        for group, base in zip(run.optimizer.param_groups, run.base_lrs):
            group["lr"] = base * lr_factor(state["step"], epoch, cfg)
        labels = run.labels[idx]
        targets = term_targets(run.texts, text, labels)
        if targets is not None:
            targets = (targets[0].to(run.device), targets[1].to(run.device))
        word_rows = None
        if run.texts.word_rows is not None:
            word_rows = run.texts.word_rows[text, : mask.shape[1]].to(run.device)
        losses = run.step_module(
            images, features.to(run.device), mask.to(run.device), labels.to(run.device), targets, word_rows
        )
        run.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        run.optimizer.step()
        state["step"] += 1
        if state["step"] % 20 == 0 or b == batches - 1:
            row = {"kind": "step", "epoch": epoch, "step": state["step"], "lr": run.optimizer.param_groups[0]["lr"]}
            row |= {f"loss/{k}": round(v.item(), 5) for k, v in losses.items()}
            run.log(row)
            bar.set_postfix(loss=f"{losses['total'].item():.3f}")
        if cfg.max_minutes and (state["seconds"] + time.perf_counter() - epoch_start) / 60 > cfg.max_minutes:
            stop = True
            break
    state["seconds"] += time.perf_counter() - epoch_start
    state["epoch"] = epoch + 1
    if run.criterion.logit_scale is not None:
        state["logit_scale"] = run.criterion.logit_scale.item()
    return stop


def validate_and_save(run: Run, epoch: int) -> None:
    """Validate on val, keep the best (R@1 + mAP) as RUN/best, save the resumable RUN/last."""
    state = run.state
    metrics = evaluate_split(run.model, run.val, run.val_text)["standard"]
    row = {"kind": "epoch", "epoch": epoch, "step": state["step"], "seconds": round(state["seconds"], 1)}
    run.log(row | {f"val/{k}": round(v, 3) for k, v in metrics.items() if k != "cmc"})
    print(f"epoch {epoch + 1}: val R@1 {metrics['R@1']:.2f} mAP {metrics['mAP']:.2f}", flush=True)
    if metrics["R@1"] + metrics["mAP"] > state["best"]:
        state["best"], state["best_epoch"] = metrics["R@1"] + metrics["mAP"], epoch
        save_checkpoint(
            run.model, run.out / "best.safetensors", run.card({"epoch": epoch, "val": metrics | {"cmc": None}})
        )
    save_checkpoint(
        run.model, run.out / "last.safetensors", run.card() | {"training_state": state}, include_classifier=True
    )
    if run.criterion.term_classifier is not None:  # before the optimiser state, which marks a resumable run
        atomic_write_bytes(run.out / "last_terms.safetensors", save(run.criterion.term_classifier.state_dict()))
    save_optimizer_state(run.optimizer, run.out / "last_optimizer.safetensors")
    plot_curves(run.out / "log.jsonl", run.out / "curves.png")


def test_best(run: Run) -> dict[str, Any]:
    """The best-on-val checkpoint on the test splits (and the card's average caption atoms), once."""
    best, best_card = load_checkpoint(run.out / "best.safetensors", run.cfg.text_encoder_path)
    scores = score_test_splits(
        best, run.cfg.data, run.splits, run.cache, run.out / "cmc.png", best_card.get("vocabulary")
    )
    average = text_atom_average(best.eval(), [c for r in run.splits["val"] for c in r.captions])
    record_in_card(run.out / "best.safetensors", best_card | scores | ({"atom_average": average} if average else {}))
    return scores["metrics"]


def train(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    started = time.perf_counter()
    run = setup(cfg, progress)
    first_epoch = run.state["epoch"]
    end = min(cfg.epochs, cfg.stop_after or cfg.epochs)  # --stop-after: the schedule's epoch to end at
    out_of_time = False
    for epoch in range(first_epoch, end):
        out_of_time = train_one_epoch(run, epoch, progress)
        if run.main:
            validate_and_save(run, epoch)
        if run.distributed:
            dist.barrier()
        if out_of_time:
            break
    if end < cfg.epochs and not out_of_time:  # stopped on purpose: the best is tested when the run ends
        stopped = max(end, first_epoch)
        return {"run": str(run.out), "stopped_after_epoch": stopped, "resume": "raise --stop-after to go on"}

    result: dict[str, Any] = {"run": str(run.out), "best_epoch": run.state["best_epoch"]}
    result["train_seconds"] = run.state["seconds"]
    if run.main:
        if cfg.final_test:
            result["metrics"] = test_best(run)
        result["total_seconds"] = time.perf_counter() - started
        atomic_write_bytes(run.out / "result.json", json.dumps(result, indent=2).encode())
    if run.distributed:
        dist.destroy_process_group()
    return result
