"""The one training loop (`core.training.fit`) and its parts, on small modules: early stopping, the
best epoch on disk even after a crash, history and curve files, weight-decay groups, the schedule,
and seeding."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vqa_search.core.errors import UserError
from vqa_search.core.models import load_clip
from vqa_search.core.identity import TINY_MODEL, resolve_identity
from vqa_search.core.training import (Curve, beside, check_config, cosine_with_warmup, fit, seed_everything,
                                      weight_decay_groups)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CURVE = Curve("val score", lambda record: {"score": record["score"]})


@dataclass
class Config:
    epochs: int = 6
    patience: int = 2
    lr: float = 0.05
    warmup: float = 0.1
    weight_decay: float = 0.01


class Scripted:
    """A linear regression whose val scores are scripted; it keeps each epoch's weights and can crash."""

    def __init__(self, scores: list[float], crash_in: int | None = None):
        torch.manual_seed(0)
        self.model = nn.Linear(3, 1)
        self.inputs, self.targets = torch.randn(32, 3), torch.randn(32, 1)
        self.scores, self.crash_in = iter(scores), crash_in
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.modes: list[tuple[str, bool]] = []

    def batches(self, epoch: int) -> list[slice]:
        if epoch == self.crash_in:
            raise RuntimeError("killed")
        return [slice(0, 16), slice(16, 32)]

    def loss(self, rows: slice) -> torch.Tensor:
        self.modes.append(("train", self.model.training))
        return nn.functional.mse_loss(self.model(self.inputs[rows]), self.targets[rows])

    def evaluate(self) -> tuple[float, dict]:
        self.modes.append(("evaluate", self.model.training))
        self.weights[len(self.weights) + 1] = _copy(self.model)
        score = next(self.scores)
        return score, {"score": score}

    def fit(self, out: Path, config: Config = Config()):
        return fit(self.model, weight_decay_groups(self.model, config.weight_decay), self.batches, self.loss,
                   evaluate=self.evaluate, save_best=lambda record: save_file(_copy(self.model), str(out)),
                   out=out, config=config, steps=2, device=torch.device("cpu"), curve=CURVE, progress=False)


def _copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_stops_after_patience_epochs_without_improvement_and_keeps_the_best(tmp_path):
    job = Scripted([1.0, 3.0, 2.0, 2.5, 5.0, 6.0])
    out = tmp_path / "model.safetensors"

    fitted = job.fit(out)

    assert [record["epoch"] for record in fitted.history] == [1, 2, 3, 4]  # epochs 3 and 4 bring nothing new
    assert fitted.stopped_early and fitted.best_epoch == 2 and fitted.best["score"] == 3.0
    assert _equal(load_file(out), job.weights[2]) and not _equal(job.weights[2], job.weights[4])
    assert {mode for step, mode in job.modes if step == "train"} == {True}
    assert {mode for step, mode in job.modes if step == "evaluate"} == {False}


def test_history_has_a_row_per_epoch_and_the_curve_is_drawn(tmp_path):
    out = tmp_path / "model.safetensors"
    fitted = Scripted([1.0, 2.0, 1.5]).fit(out, Config(epochs=3, patience=5))

    assert fitted.history_path == beside(out, ".history.json") == tmp_path / "model.history.json"
    assert fitted.curve == beside(out, ".curve.png") == tmp_path / "model.curve.png"
    on_disk = json.loads(fitted.history_path.read_text())
    assert [record["epoch"] for record in on_disk["history"]] == [1, 2, 3] and on_disk["best_epoch"] == 2
    assert on_disk["history"] == fitted.history and not fitted.stopped_early
    assert on_disk["config"] == {"epochs": 3, "patience": 5, "lr": 0.05, "warmup": 0.1, "weight_decay": 0.01}
    assert all(set(record) == {"epoch", "loss", "score", "seconds", "val_seconds"} for record in fitted.history)
    assert all(math.isfinite(record["loss"]) for record in fitted.history)
    assert fitted.curve.read_bytes().startswith(b"\x89PNG")


def test_a_crash_after_the_best_epoch_leaves_that_epochs_weights(tmp_path):
    job = Scripted([1.0, 5.0, 3.0], crash_in=4)
    out = tmp_path / "model.safetensors"

    with pytest.raises(RuntimeError, match="killed"):
        job.fit(out, Config(patience=10))

    assert _equal(load_file(out), job.weights[2])  # written at once, not at the end
    assert not _equal(job.weights[2], job.weights[3])  # epoch 3 trained on, but was not better
    history = json.loads(beside(out, ".history.json").read_text())
    assert [record["epoch"] for record in history["history"]] == [1, 2, 3] and history["best_epoch"] == 2
    assert not beside(out, ".curve.png").exists()


@pytest.mark.parametrize("changes, message", [
    ({"epochs": 0}, "--epochs must be at least 1"), ({"patience": 0}, "--patience must be at least 1"),
    ({"lr": 0.0}, "--lr must be positive"), ({"lr": math.nan}, "--lr must be positive"),
    ({"weight_decay": -0.1}, "--weight-decay must not be negative"),
    ({"weight_decay": math.nan}, "--weight-decay must not be negative"),
    ({"warmup": 1.0}, "warmup is a fraction"),
])
def test_settings_fit_cannot_use_are_refused_before_anything_runs(changes, message):
    check_config(Config())
    with pytest.raises(UserError, match=message):
        check_config(Config(**changes))


class Parts(nn.Module):
    """One of every kind of parameter a trainer meets, frozen and shared ones included."""

    def __init__(self):
        super().__init__()
        self.token_embedding = nn.Embedding(10, 4)
        self.positional_embedding = nn.Parameter(torch.randn(3, 4))  # a learned table, as in open_clip
        self.class_embedding = nn.Parameter(torch.randn(4))
        self.attention = nn.MultiheadAttention(4, 2)  # in_proj_weight is a raw matrix
        self.norm = nn.LayerNorm(4)
        self.wide_norm = nn.LayerNorm((3, 4))  # a 2-d gain, still a norm
        self.batch_norm = nn.BatchNorm1d(4)
        self.linear = nn.Linear(4, 5)
        self.proj = nn.Parameter(torch.randn(5, 2))  # a raw projection matrix, as open_clip's visual.proj
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.frozen = nn.Linear(2, 2).requires_grad_(False)
        self.head = nn.Sequential(self.linear, nn.GELU(), nn.Linear(5, 3, bias=False))  # self.linear again


def naive_groups(module: nn.Module) -> tuple[set[str], set[str]]:
    """Names that decay and names that do not, by the rule in words: biases, norms, embeddings and
    anything under 2-d do not; frozen parameters are in neither."""
    decay, no_decay = set(), set()
    for name, parameter in module.named_parameters():  # shared parameters are listed once
        if not parameter.requires_grad:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        is_norm = isinstance(owner, (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm))
        if leaf == "bias" or is_norm or isinstance(owner, nn.Embedding) or "embedding" in leaf or parameter.ndim < 2:
            no_decay.add(name)
        else:
            decay.add(name)
    return decay, no_decay


def _names(module: nn.Module, group: dict) -> set[str]:
    name_of = {id(parameter): name for name, parameter in module.named_parameters()}
    return {name_of[id(parameter)] for parameter in group["params"]}


def test_weight_decay_groups_put_exactly_biases_norms_embeddings_and_scalars_in_no_decay():
    module = Parts()
    decay_group, free_group = weight_decay_groups(module, 0.1, lr=0.5)

    decay, no_decay = _names(module, decay_group), _names(module, free_group)
    assert decay == {"attention.in_proj_weight", "attention.out_proj.weight", "linear.weight", "proj",
                     "head.2.weight"}
    assert no_decay == {"token_embedding.weight", "positional_embedding", "class_embedding", "attention.in_proj_bias",
                        "attention.out_proj.bias", "norm.weight", "norm.bias", "wide_norm.weight", "wide_norm.bias",
                        "batch_norm.weight", "batch_norm.bias", "linear.bias", "logit_scale"}
    assert (decay, no_decay) == naive_groups(module)
    assert len(decay_group["params"]) + len(free_group["params"]) == len(decay | no_decay)  # shared: once
    assert (decay_group["weight_decay"], free_group["weight_decay"]) == (0.1, 0.0)
    assert decay_group["lr"] == free_group["lr"] == 0.5


def test_weight_decay_groups_of_a_clip_match_the_naive_rule():
    model = load_clip(resolve_identity(TINY_MODEL, "none"), torch.device("cpu")).model
    model.transformer.resblocks[0].requires_grad_(False)
    groups = weight_decay_groups(model, 0.1)
    assert tuple(_names(model, group) for group in groups) == naive_groups(model)
    assert {"token_embedding.weight", "positional_embedding", "visual.class_embedding", "logit_scale"} <= \
        _names(model, groups[1])
    assert weight_decay_groups(nn.Linear(2, 2).requires_grad_(False), 0.1) == []  # nothing to train, no group


def naive_lr(step: int, peak: float, total: int, warmup: int) -> float:
    """Linear warm-up to the peak over `warmup` steps, then half a cosine from the peak down to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / (total - warmup)
    return peak * (1 + math.cos(math.pi * progress)) / 2


@pytest.mark.parametrize("total, fraction", [(40, 0.1), (25, 0.2), (10, 0.0)])
def test_schedule_is_linear_warm_up_then_cosine(total, fraction):
    parameter = nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [parameter]}, {"params": [nn.Parameter(torch.zeros(2))], "lr": 0.01}],
                                  lr=0.1)
    schedule = cosine_with_warmup(optimizer, total, fraction)
    used = []
    for _ in range(total):
        used.append([group["lr"] for group in optimizer.param_groups])  # the rate of this step
        optimizer.step()
        schedule.step()

    warmup = int(total * fraction)
    for step, (head, other) in enumerate(used):
        assert head == pytest.approx(naive_lr(step, 0.1, total, warmup), rel=1e-12, abs=1e-15)
        assert other == pytest.approx(naive_lr(step, 0.01, total, warmup), rel=1e-12, abs=1e-15)
    heads = [head for head, _ in used]
    assert max(heads) == pytest.approx(0.1) and heads[warmup] == pytest.approx(0.1)
    assert all(a <= b for a, b in zip(heads[:warmup], heads[1:warmup + 1]))  # rising, then
    assert all(a >= b for a, b in zip(heads[warmup:], heads[warmup + 1:]))  # falling
    assert 0 < heads[-1] < 0.1 * 0.05


def _seeded_run(seed: int, out: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """A run that draws from every source: init and dropout (torch's global seed), batches (the generator)."""
    generator = seed_everything(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    data, targets = torch.randn(64, 4), torch.randn(64, 1)
    val = torch.randn(16, 4)

    def batches(epoch: int):
        return torch.randperm(len(data), generator=generator).split(16)

    def evaluate() -> tuple[float, dict]:
        with torch.no_grad():
            value = float(model(val).mean())
        return value, {"score": value}

    fitted = fit(model, weight_decay_groups(model, 0.01), batches,
                 lambda rows: nn.functional.mse_loss(model(data[rows]), targets[rows]), evaluate=evaluate,
                 save_best=lambda record: save_file(_copy(model), str(out)), out=out, config=Config(epochs=3),
                 steps=4, device=torch.device("cpu"), curve=CURVE, progress=False)
    history = [{key: value for key, value in record.items() if key not in ("seconds", "val_seconds")}
               for record in fitted.history]
    return history, load_file(out)


def test_the_same_seed_gives_the_same_run(tmp_path):
    first, first_weights = _seeded_run(0, tmp_path / "a.safetensors")
    again, again_weights = _seeded_run(0, tmp_path / "b.safetensors")
    other, _ = _seeded_run(1, tmp_path / "c.safetensors")

    assert first == again and _equal(first_weights, again_weights)
    assert first[0]["loss"] != other[0]["loss"]
