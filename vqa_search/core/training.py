"""What every training job here shares: seeding, the learning-rate schedule, and the files kept
beside a checkpoint (CKPT.history.json, CKPT.curve.png)."""

from __future__ import annotations

import math
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from vqa_search.core.atomic import atomic_path


def seed_everything(seed: int) -> torch.Generator:
    """Seed every random source a run may touch.

    The returned generator draws each epoch's order (and stage 1's captions); data loaders never shuffle.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int,
                        warmup_fraction: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to zero over the planned epochs (early stopping just cuts it short)."""
    warmup = int(total_steps * warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def plot_training(plt, history: list[dict], best_epoch: int, out: Path, title: str,
                  scores: dict[str, list[float]]) -> Path:
    """Training loss and the val scores per epoch side by side, the kept epoch marked."""
    epochs = [record["epoch"] for record in history]
    figure, (loss_axis, score_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    loss_axis.plot(epochs, [record["loss"] for record in history], marker="o")
    loss_axis.set(title="training loss", xlabel="epoch")
    for label, values in scores.items():
        score_axis.plot(epochs, values, marker="o", label=label)
    score_axis.set(title=title, xlabel="epoch")
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
    """A training config dataclass as JSON (paths as strings), for history files and checkpoint metadata."""
    return {name: str(value) if isinstance(value, Path) else value for name, value in asdict(config).items()}
