"""The one training loop every job here uses (stage 1, stage 2, the VQA heads), and what it is made of:
seeding, weight-decay groups, AdamW, the warm-up + cosine schedule, and the files kept beside a
checkpoint (CKPT.history.json, CKPT.curve.png)."""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from vqa_search.core.atomic import atomic_path, write_json
from vqa_search.core.encode import autocast
from vqa_search.core.errors import UserError
from vqa_search.core.plots import pyplot

log = logging.getLogger("vqa_search")


class TrainConfig(Protocol):
    """What `fit` reads from a job's config dataclass (which also goes into the history file whole)."""

    epochs: int  # at most
    patience: int  # epochs without a better val score before stopping
    lr: float  # peak learning rate, for groups that set none of their own
    weight_decay: float  # what `weight_decay_groups` gives the matrices
    warmup: float  # fraction of all planned steps with a linear warm-up, then cosine decay


@dataclass
class Curve:
    """The right half of CKPT.curve.png (the left is the loss), also what each epoch's log line shows."""

    title: str
    values: Callable[[dict], dict[str, float]]  # an epoch's record -> {label: val value}


@dataclass
class Fitted:
    """What `fit` leaves: one record per epoch, the kept one, and the files beside the checkpoint."""

    history: list[dict]  # per epoch: epoch, loss, the evaluation's record, seconds, val_seconds
    best_epoch: int
    stopped_early: bool
    history_path: Path
    curve: Path

    @property
    def best(self) -> dict:
        return self.history[self.best_epoch - 1]

    def to_json(self) -> dict:
        return config_json(self)


def fit(model, groups: list[dict], batches: Callable[[int], Iterable], loss: Callable[[Any], torch.Tensor], *,
        evaluate: Callable[[], tuple[float, dict]], save_best: Callable[[dict], object], out: Path,
        config: TrainConfig, steps: int, device: torch.device, curve: Curve,
        after_step: Callable[[], None] | None = None, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        progress: bool = True) -> Fitted:
    """Train until `config.epochs` or `config.patience` epochs without a better val score.

    Each epoch runs `model.train()` (a module, or anything with `train(mode)`), one AdamW step on
    `loss(batch)` for every batch of `batches(epoch)`, then `model.train(False)` and `evaluate()`
    -> (score to maximise, record). A better score calls `save_best(record)` at once, so a crash
    loses only the epochs after the best one. `groups` are the optimizer's parameter groups
    (`weight_decay_groups`); `steps` is the number of batches an epoch plans, which sets the
    schedule. Autocast and gradient scaling are on with CUDA only. The history file is rewritten
    after every epoch, the curve drawn at the end.
    """
    plt = pyplot()  # a missing matplotlib fails before the first epoch, not after the last
    optimizer = adamw(groups, config.lr, betas, eps)
    schedule = cosine_with_warmup(optimizer, steps * config.epochs, config.warmup)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    history_path, curve_path = beside(out, ".history.json"), beside(out, ".curve.png")
    history: list[dict] = []
    best, best_score = None, -math.inf
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        model.train(True)
        losses = []
        with tqdm(total=steps, unit="batch", desc=f"epoch {epoch}", disable=not progress, leave=False) as bar:
            for batch in batches(epoch):
                with autocast(device):
                    batch_loss = loss(batch)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(batch_loss).backward()
                scaler.step(optimizer)
                scaler.update()
                schedule.step()
                if after_step is not None:
                    after_step()
                losses.append(batch_loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update()
        trained = time.perf_counter()
        model.train(False)
        score, evaluated = evaluate()
        record = {"epoch": epoch, "loss": float(np.mean(losses)), **evaluated,
                  "seconds": round(trained - started, 2), "val_seconds": round(time.perf_counter() - trained, 2)}
        history.append(record)
        if best is None or score > best_score:
            best, best_score = record, score
            save_best(record)
        write_json(history_path, {"config": config_json(config), "best_epoch": best["epoch"], "history": history})
        log.info("epoch %d/%d: loss %.4f, %s %s, %.1f s + %.1f s val%s", epoch, config.epochs, record["loss"],
                 curve.title, ", ".join(f"{label} {value:.1f}" for label, value in curve.values(record).items()),
                 record["seconds"], record["val_seconds"], ", saved as best" if best is record else "")
        if epoch - best["epoch"] >= config.patience and epoch < config.epochs:
            log.info("no better val score for %d epochs: stopping early", config.patience)
            break
    plot_training(plt, history, best["epoch"], curve_path, curve)
    return Fitted(history, best["epoch"], len(history) < config.epochs, history_path, curve_path)


def check_config(config: TrainConfig) -> None:
    """Refuse now, before any data is read, what `fit` would fail on later (matplotlib included)."""
    for name, value in (("epochs", config.epochs), ("patience", config.patience)):
        if value < 1:
            raise UserError(f"--{name} must be at least 1 (got {value})")
    if not config.lr > 0:
        raise UserError(f"--lr must be positive (got {config.lr})")
    if not 0 <= config.weight_decay < math.inf:
        raise UserError(f"--weight-decay must not be negative (got {config.weight_decay})")
    if not 0 <= config.warmup < 1:
        raise UserError(f"warmup is a fraction of all steps in [0, 1) (got {config.warmup})")
    pyplot()


def seed_everything(seed: int) -> torch.Generator:
    """Seed every random source a run may touch; call it before building what is trained.

    The returned generator draws each epoch's order (and stage 1's captions); data loaders never shuffle.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def weight_decay_groups(module: nn.Module, weight_decay: float, **options) -> list[dict]:
    """The trainable parameters of `module` as AdamW groups: matrices decay; biases, norms, embeddings do not.

    No decay for anything under 2-d (biases, norm gains, class tokens, logit_scale), the weights of
    LayerNorms and embedding tables, and parameters named like `positional_embedding`. `options`
    (e.g. lr) go into both groups; an empty group is left out.
    """
    decay, no_decay, seen = [], [], set()
    for owner in module.modules():
        for name, parameter in owner.named_parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            free = parameter.ndim < 2 or isinstance(owner, (nn.LayerNorm, nn.Embedding)) or name.endswith("embedding")
            (no_decay if free else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay, **options},
              {"params": no_decay, "weight_decay": 0.0, **options}]
    return [group for group in groups if group["params"]]


def adamw(groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.999),
          eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel (6x faster updates of vqa-tiny's 3.4M weights on CPU; torch ≥ 2.4)."""
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    except RuntimeError:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int,
                        warmup_fraction: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to zero over the planned epochs (early stopping just cuts it short)."""
    warmup = int(total_steps * warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def plot_training(plt, history: list[dict], best_epoch: int, out: Path, curve: Curve) -> Path:
    """Training loss and the val values per epoch side by side, the kept epoch marked."""
    epochs = [record["epoch"] for record in history]
    values = [curve.values(record) for record in history]
    figure, (loss_axis, score_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    loss_axis.plot(epochs, [record["loss"] for record in history], marker="o")
    loss_axis.set(title="training loss", xlabel="epoch")
    for label in values[0]:
        score_axis.plot(epochs, [value[label] for value in values], marker="o", label=label)
    score_axis.set(title=curve.title, xlabel="epoch")
    score_axis.legend(fontsize=8)
    for axis in (loss_axis, score_axis):
        axis.axvline(best_epoch, color="gray", linestyle=":", label="kept")
        axis.grid(True, alpha=0.3)
    figure.tight_layout()
    with atomic_path(out) as temp:
        figure.savefig(temp, format="png", dpi=120)
    plt.close(figure)
    return out


def beside(checkpoint: Path, suffix: str) -> Path:
    """A file next to a checkpoint: CKPT.history.json, CKPT.curve.png."""
    return checkpoint.with_name(checkpoint.stem + suffix)


def config_json(config) -> dict:
    """A dataclass as JSON (paths as strings), for history files, checkpoint metadata and results."""
    return {name: str(value) if isinstance(value, Path) else value for name, value in asdict(config).items()}
