"""`train vqa`: fit an answer head on the train questions, keep the epoch with the best val accuracy.

The loss is the standard VQA v2 recipe's: each answer of the vocabulary is a binary target whose
value is the official accuracy that answer would get from the 10 humans (soft scores), with binary
cross-entropy summed over answers (`loss="ce"`: one softmax against the same scores, normalised).
Train questions none of whose answers made it into the vocabulary teach nothing and are left out.

Frozen inputs are computed once (`features.py`). Batches hold whole images with all their questions,
so the local encoder's trainable blocks run once per image. After every epoch the val split is
scored with the benchmark's own accuracy; the best head is written at once (atomically).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vqa_search.core.atomic import write_json
from vqa_search.core.encode import autocast
from vqa_search.core.errors import UserError
from vqa_search.core.image_stream import default_workers
from vqa_search.core.models import DEFAULT_MODEL, DEFAULT_PRETRAINED, default_device, load_clip, resolve_identity
from vqa_search.core.plots import pyplot
from vqa_search.core.training import beside, config_json, cosine_with_warmup, plot_training, seed_everything
from vqa_search.vqa.answerer import LOSSES, Answerer
from vqa_search.vqa.answers import DEFAULT_VOCAB_SIZE, AnswerVocab
from vqa_search.vqa.data import VqaQuestion, read_vqa
from vqa_search.vqa.evaluate import accuracy_report
from vqa_search.vqa.features import ImageFeatures, LocalEncoder, image_features, question_vectors
from vqa_search.vqa.heads import VARIANTS, AnswerHead, HeadConfig, answer_loss

log = logging.getLogger("vqa_search")

DEFAULT_LOCAL_MODEL = "ViT-B-16"
DEFAULT_LOCAL_PRETRAINED = "laion2b_s34b_b88k"


@dataclass
class VqaTrainConfig:
    variant: str = "dual-attention"
    model: str = DEFAULT_MODEL  # g and q
    pretrained: str = DEFAULT_PRETRAINED  # tag, stage-1 checkpoint, or "none"
    local_model: str = DEFAULT_LOCAL_MODEL  # the dual variants' second image encoder
    local_pretrained: str = DEFAULT_LOCAL_PRETRAINED
    unfreeze_last: int = 0  # trainable last blocks of the local encoder
    epochs: int = 20
    batch_size: int = 256  # questions per step, rounded up to whole images
    lr: float = 1e-3
    local_lr: float | None = None  # the local encoder's trainable blocks; default: lr / 10
    weight_decay: float = 1e-2
    dropout: float = 0.3
    hidden: int = 1024
    loss: str = "bce"
    vocab_size: int = DEFAULT_VOCAB_SIZE
    warmup: float = 0.05
    patience: int = 4
    seed: int = 42
    train_split: str = "train"
    val_split: str = "val"
    images: Path | None = None  # where relative image paths point, when not beside the data
    workers: int = field(default_factory=default_workers)
    device: str | None = None


@dataclass
class VqaTrainResult:
    path: Path
    best_epoch: int
    history: list[dict]  # per epoch: loss, val accuracy report, seconds
    seconds: float
    curve: Path
    history_path: Path
    vocab_size: int
    train_questions: int
    left_out: int  # train questions with no answer in the vocabulary
    skipped_images: int

    @property
    def best(self) -> dict:
        return self.history[self.best_epoch - 1]

    def to_json(self) -> dict:
        data = asdict(self)
        return {**data, **{name: str(data[name]) for name in ("path", "curve", "history_path")}}

    def summary(self) -> str:
        val = self.best["val"]
        types = ", ".join(f"{group} {value:.1f}" for group, value in val["by_type"].items())
        return (f"kept epoch {self.best_epoch} of {len(self.history)}: val accuracy {val['overall']:.1f}% ({types}); "
                f"{self.train_questions} train questions, {self.vocab_size} answers; {self.seconds:.0f} s\n"
                f"wrote {self.path}, {self.curve}")


def train_vqa(data_path: Path | str, out: Path | str, config: VqaTrainConfig = VqaTrainConfig(),
              progress: bool = True) -> VqaTrainResult:
    started = time.perf_counter()
    out = _check(Path(out), config)
    plt = pyplot()  # a missing matplotlib should fail now, not after training
    data = read_vqa(data_path, images=config.images)
    train, val = data.split(config.train_split), data.split(config.val_split)
    vocab = AnswerVocab.build((question.answers for question in train), config.vocab_size)
    device = torch.device(config.device) if config.device else default_device()
    clip = load_clip(resolve_identity(config.model, config.pretrained), device)
    local = None
    if config.variant != "baseline":
        local_clip = load_clip(resolve_identity(config.local_model, config.local_pretrained), device)
        local = LocalEncoder(local_clip, config.unfreeze_last)
    generator = seed_everything(config.seed)

    features = image_features(clip, local, [question.image for question in train + val], config.batch_size,
                              config.workers, progress)
    train = [question for question in train if question.image in features.rows]
    val = [question for question in val if question.image in features.rows]
    targets = [vocab.soft_targets(question.answers) for question in train]
    answerable = [position for position, (indices, _) in enumerate(targets) if indices]
    left_out = len(train) - len(answerable)
    train, targets = [train[i] for i in answerable], [targets[i] for i in answerable]
    if not train or not val:
        raise UserError(f"no readable {config.train_split if not train else config.val_split} question with an "
                        f"answer to learn from in {data.root}")
    rows, vectors = question_vectors(clip, [question.question for question in train + val])

    head = AnswerHead(HeadConfig(
        variant=config.variant, answers=len(vocab.answers), embed_dim=vectors.shape[1],
        local_width=local.width if local else 0, local_pooled_dim=local.pooled_dim if local else 0,
        hidden=config.hidden, dropout=config.dropout,
    ))
    answerer = Answerer(head.to(device), vocab, clip, local, config.loss)
    trainer = _Trainer(answerer, features, train, targets, vectors, torch.tensor([rows[q.question] for q in train]),
                       config, generator)
    val_vectors = vectors[[rows[question.question] for question in val]]
    history_path, curve = beside(out, ".history.json"), beside(out, ".curve.png")
    log.info("training a %s head on %d questions about %d images (%d answers; %d questions without one left out)",
             config.variant, len(train), len(features.rows), len(vocab.answers), left_out)

    history: list[dict] = []
    best: dict | None = None
    for epoch in range(1, config.epochs + 1):
        epoch_started = time.perf_counter()
        loss = trainer.epoch(epoch, progress)
        train_seconds = time.perf_counter() - epoch_started
        predictions, _ = answerer.top_answers(features, [question.image for question in val], val_vectors)
        report = accuracy_report(val, [answers[0] for answers in predictions])
        record = {"epoch": epoch, "loss": loss, "val": report, "seconds": round(train_seconds, 2)}
        history.append(record)
        if best is None or report["overall"] > best["val"]["overall"]:
            best = record
            answerer.save(out, record)
        write_json(history_path, {"config": config_json(config), "best_epoch": best["epoch"], "history": history})
        log.info("epoch %d/%d: loss %.4f, val accuracy %.2f%%, %.1f s%s", epoch, config.epochs, loss,
                 report["overall"], train_seconds, ", saved as best" if best is record else "")
        if epoch - best["epoch"] >= config.patience and epoch < config.epochs:
            log.info("no better val accuracy for %d epochs: stopping early", config.patience)
            break
    accuracies = {"overall": [record["val"]["overall"] for record in history]}
    accuracies.update({group: [record["val"]["by_type"][group] for record in history]
                       for group in history[0]["val"]["by_type"]})
    plot_training(plt, history, best["epoch"], curve, "val VQA accuracy (%)", accuracies)
    return VqaTrainResult(
        path=out, best_epoch=best["epoch"], history=history, seconds=time.perf_counter() - started, curve=curve,
        history_path=history_path, vocab_size=len(vocab.answers), train_questions=len(train), left_out=left_out,
        skipped_images=len(features.skipped),
    )


class _Trainer:
    def __init__(self, answerer: Answerer, features: ImageFeatures, questions: list[VqaQuestion],
                 targets: list[tuple[list[int], list[float]]], question_vectors: torch.Tensor,
                 question_rows: torch.Tensor, config: VqaTrainConfig, generator: torch.Generator):
        """`question_vectors` holds each distinct question once; `question_rows` says which is whose."""
        self.answerer, self.features, self.questions = answerer, features, questions
        self.targets, self.config, self.generator = targets, config, generator
        self.question_vectors, self.question_rows = question_vectors, question_rows
        self.image_rows = np.array([features.rows[question.image] for question in questions])
        steps = len(image_grouped_batches(self.image_rows, config.batch_size, generator))
        self.optimizer = _optimizer(answerer, config)
        self.schedule = cosine_with_warmup(self.optimizer, steps * config.epochs, config.warmup)
        device = answerer.clip.device
        self.scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")

    def epoch(self, number: int, progress: bool) -> float:
        batches = image_grouped_batches(self.image_rows, self.config.batch_size, self.generator)
        self.answerer.train(True)
        losses = []
        with tqdm(total=len(batches), unit="batch", desc=f"epoch {number}", disable=not progress, leave=False) as bar:
            for positions in batches:
                losses.append(self.step(positions))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update()
        return float(np.mean(losses))

    def step(self, positions: np.ndarray) -> float:
        answerer, device = self.answerer, self.answerer.clip.device
        global_vectors, streams, inverse = self.features.take([self.questions[i].image for i in positions])
        targets = self._dense_targets(positions).to(device)
        with autocast(device):
            questions = self.question_vectors[self.question_rows[positions]]
            logits = answerer.logits(global_vectors, questions, streams, inverse).float()
            loss = answer_loss(logits, targets, self.config.loss)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        return loss.item()

    def _dense_targets(self, positions: np.ndarray) -> torch.Tensor:
        targets = torch.zeros((len(positions), len(self.answerer.vocab.answers)))
        for row, position in enumerate(positions):
            indices, scores = self.targets[position]
            targets[row, indices] = torch.tensor(scores)
        return targets


def image_grouped_batches(image_rows: np.ndarray, batch_size: int, generator: torch.Generator) -> list[np.ndarray]:
    """Question positions in a fresh random order of images, cut into batches of whole images.

    A batch closes at the first image boundary after `batch_size` questions; a last batch of a single
    question is dropped (batch norm needs two).
    """
    image_order = torch.randperm(int(image_rows.max()) + 1, generator=generator).numpy()
    order = np.argsort(image_order[image_rows], kind="stable")
    starts = np.flatnonzero(np.diff(image_rows[order])) + 1  # where each image after the first begins
    batches, begin = [], 0
    for boundary in [*starts.tolist(), len(order)]:
        if boundary - begin >= batch_size or boundary == len(order):
            batches.append(order[begin:boundary])
            begin = boundary
    return [batch for batch in batches if len(batch) > 1]


def _optimizer(answerer: Answerer, config: VqaTrainConfig) -> torch.optim.Optimizer:
    """AdamW; the local encoder's pretrained blocks move at a tenth of the head's rate unless told."""
    head = [parameter for parameter in answerer.head.parameters()]
    groups = [{"params": [p for p in head if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in head if p.ndim < 2], "weight_decay": 0.0}]
    if answerer.local is not None and answerer.local.unfreeze_last:
        local_lr = config.local_lr if config.local_lr is not None else config.lr / 10
        encoder = [parameter for parameter in answerer.local.parameters() if parameter.requires_grad]
        groups.append({"params": encoder, "lr": local_lr, "weight_decay": config.weight_decay})
    return torch.optim.AdamW(groups, lr=config.lr)


def _check(out: Path, config: VqaTrainConfig) -> Path:
    if out.suffix != ".safetensors":
        raise UserError(f"--out must end in .safetensors (got {out})")
    if config.variant not in VARIANTS:
        raise UserError(f"--variant must be one of {', '.join(VARIANTS)} (got {config.variant!r})")
    if config.loss not in LOSSES:
        raise UserError(f"--loss must be one of {', '.join(LOSSES)} (got {config.loss!r})")
    for name, value, low in (("epochs", config.epochs, 1), ("batch-size", config.batch_size, 2),
                             ("patience", config.patience, 1), ("vocab-size", config.vocab_size, 2),
                             ("hidden", config.hidden, 1)):
        if value < low:
            raise UserError(f"--{name} must be at least {low} (got {value})")
    if not config.lr > 0 or (config.local_lr is not None and not config.local_lr > 0):
        raise UserError("learning rates must be positive")
    if not 0 <= config.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1) (got {config.dropout})")
    if config.weight_decay < 0 or not math.isfinite(config.weight_decay):
        raise UserError(f"--weight-decay must not be negative (got {config.weight_decay})")
    return out
