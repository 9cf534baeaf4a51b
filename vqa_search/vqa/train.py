"""`train vqa`: fit an answer head on the train questions, keep the epoch with the best val accuracy.

The loss is the standard VQA v2 recipe's: each answer of the vocabulary is a binary target whose
value is the official accuracy that answer would get from the 10 humans (soft scores), with binary
cross-entropy summed over answers (`loss="ce"`: one softmax against the same scores, normalised).
Train questions none of whose answers made it into the vocabulary teach nothing and are left out.

Frozen inputs are computed once (`features.py`), the regions head's regions once by `vqa-search
regions` (read from the index's region set). Batches hold whole images with all their questions,
so the local encoder's trainable blocks run once per image. After every epoch the val split is
scored with the benchmark's own accuracy; the best head is written at once (atomically).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vqa_search.align.region_store import RegionSet
from vqa_search.core.errors import UserError
from vqa_search.core.feature_cache import CacheConfig, FeatureCache
from vqa_search.core.threads import default_workers
from vqa_search.core.models import default_device, load_clip
from vqa_search.core.identity import DEFAULT_MODEL, DEFAULT_PRETRAINED, resolve_identity
from vqa_search.core.training import Curve, Fitted, check_config, fit, seed_everything, weight_decay_groups
from vqa_search.vqa.answerer import LOSSES, Answerer
from vqa_search.vqa.answers import DEFAULT_VOCAB_SIZE, AnswerVocab
from vqa_search.vqa.constants import DEFAULT_LOCAL_MODEL, DEFAULT_LOCAL_PRETRAINED  # light: the CLI reads them too
from vqa_search.vqa.data import VqaQuestion, read_vqa
from vqa_search.vqa.evaluate import accuracy_report
from vqa_search.vqa.features import ImageFeatures, image_features, load_local_encoder, question_vectors
from vqa_search.vqa.heads import LOCAL_VARIANTS, VARIANTS, AnswerHead, HeadConfig, answer_loss

log = logging.getLogger("vqa_search")

ACCURACY_CURVE = Curve("val VQA accuracy (%)", lambda record: {"overall": record["val"]["overall"],
                                                               **record["val"]["by_type"]})


@dataclass
class VqaTrainConfig:
    variant: str = "dual-attention"
    model: str = DEFAULT_MODEL  # g and q
    pretrained: str = DEFAULT_PRETRAINED  # tag, stage-1 checkpoint, or "none"
    local_model: str = DEFAULT_LOCAL_MODEL  # the dual variants' second image encoder; "hf:NAME_OR_PATH": a HF ViT
    local_pretrained: str = DEFAULT_LOCAL_PRETRAINED  # its open_clip weights (an hf: model names its own)
    unfreeze_last: int = 0  # trainable last blocks of the local encoder
    regions: str | None = None  # the regions variant's region set (INDEX/regions/<name>); None: the only one
    index: Path | None = None  # the index holding it (or its dataset folder); default: the data's folder
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
    cache: str = "auto"  # frozen features: memory | disk (memory-mapped .npy) | auto (core/feature_cache.py)
    cache_dir: Path | None = None  # default DATA/.vqa-search/feature-cache
    workers: int = field(default_factory=default_workers)
    device: str | None = None


@dataclass
class VqaTrainResult(Fitted):  # history: per epoch loss, val accuracy report, seconds
    path: Path
    seconds: float
    vocab_size: int
    train_questions: int
    left_out: int  # train questions with no answer in the vocabulary
    skipped_images: int

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
    data = read_vqa(data_path, images=config.images)
    train, val = data.split(config.train_split), data.split(config.val_split)
    vocab = AnswerVocab.build((question.answers for question in train), config.vocab_size)
    device = torch.device(config.device) if config.device else default_device()
    clip = load_clip(resolve_identity(config.model, config.pretrained), device)
    local = regions = None
    if config.variant in LOCAL_VARIANTS:
        local = load_local_encoder(config.local_model, config.local_pretrained, config.unfreeze_last, device)
    elif config.variant == "regions":
        regions = RegionSet.open(config.index or data.root, config.regions)

    cache = FeatureCache.for_dataset(config.cache, config.cache_dir, data.root)
    features = image_features(clip, local, [question.image for question in train + val], config.batch_size,
                              config.workers, progress, regions, cache)
    if features.local_streams is not None:
        streams = features.local_streams
        log.info("local encoder streams: %.2f GB %s", streams.nbytes / 1e9,
                 f"memory-mapped from {streams.filename}" if isinstance(streams, np.memmap) else "in memory")
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
    # seeded after the features: decoding draws from torch's generator, and a run that finds its features
    # in the cache (core/feature_cache.py) decodes nothing, yet must be the same run
    generator = seed_everything(config.seed)

    head = AnswerHead(HeadConfig(
        variant=config.variant, answers=len(vocab.answers), embed_dim=vectors.shape[1],
        local_width=local.width if local else 0, local_pooled_dim=local.pooled_dim if local else 0,
        region_dim=regions.feature_dim if regions else 0, hidden=config.hidden, dropout=config.dropout,
    ))
    answerer = Answerer(head.to(device), vocab, clip, local, config.loss, regions)
    trainer = _Trainer(answerer, features, train, targets, vectors, torch.tensor([rows[q.question] for q in train]),
                       config, generator)
    val_vectors = vectors[[rows[question.question] for question in val]]
    log.info("training a %s head on %d questions about %d images (%d answers; %d questions without one left out)",
             config.variant, len(train), len({question.image for question in train}), len(vocab.answers), left_out)

    def evaluate() -> tuple[float, dict]:
        predictions, _ = answerer.top_answers(features, [question.image for question in val], val_vectors)
        report = accuracy_report(val, [answers[0] for answers in predictions])
        return report["overall"], {"val": report}

    fitted = fit(answerer, _parameter_groups(answerer, config), trainer.batches, trainer.loss, evaluate=evaluate,
                 save_best=lambda record: answerer.save(out, record), out=out, config=config, steps=trainer.steps,
                 device=device, curve=ACCURACY_CURVE, progress=progress)
    return VqaTrainResult(
        **vars(fitted), path=out, seconds=time.perf_counter() - started, vocab_size=len(vocab.answers),
        train_questions=len(train), left_out=left_out, skipped_images=len(features.skipped),
    )


class _Trainer:
    """The train questions in image-grouped batches, and the answer loss on one batch."""

    def __init__(self, answerer: Answerer, features: ImageFeatures, questions: list[VqaQuestion],
                 targets: list[tuple[list[int], list[float]]], question_vectors: torch.Tensor,
                 question_rows: torch.Tensor, config: VqaTrainConfig, generator: torch.Generator):
        """`question_vectors` holds each distinct question once; `question_rows` says which is whose."""
        self.answerer, self.features, self.questions = answerer, features, questions
        self.targets, self.config, self.generator = targets, config, generator
        self.question_vectors, self.question_rows = question_vectors, question_rows
        self.image_rows = np.array([features.rows[question.image] for question in questions])
        # batches per epoch, for the schedule: the count depends a little on the order, so one is drawn
        self.steps = len(image_grouped_batches(self.image_rows, config.batch_size, generator))

    def batches(self, epoch: int) -> list[np.ndarray]:
        return image_grouped_batches(self.image_rows, self.config.batch_size, self.generator)

    def loss(self, positions: np.ndarray) -> torch.Tensor:
        device = self.answerer.clip.device
        global_vectors, streams, inverse, regions = self.features.take([self.questions[i].image for i in positions])
        questions = self.question_vectors[self.question_rows[positions]]
        logits = self.answerer.logits(global_vectors, questions, streams, inverse, regions).float()
        return answer_loss(logits, self._dense_targets(positions).to(device), self.config.loss)

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


def _parameter_groups(answerer: Answerer, config: VqaTrainConfig) -> list[dict]:
    """The head's, then the local encoder's trainable blocks at a tenth of the head's rate unless told."""
    groups = weight_decay_groups(answerer.head, config.weight_decay)
    if answerer.local is not None:  # frozen (--unfreeze-last 0): no trainable parameter, no group
        local_lr = config.local_lr if config.local_lr is not None else config.lr / 10
        groups += weight_decay_groups(answerer.local, config.weight_decay, lr=local_lr)
    return groups


def _check(out: Path, config: VqaTrainConfig) -> Path:
    if out.suffix != ".safetensors":
        raise UserError(f"--out must end in .safetensors (got {out})")
    if config.variant not in VARIANTS:
        raise UserError(f"--variant must be one of {', '.join(VARIANTS)} (got {config.variant!r})")
    if config.loss not in LOSSES:
        raise UserError(f"--loss must be one of {', '.join(LOSSES)} (got {config.loss!r})")
    check_config(config)
    CacheConfig(config.cache, config.cache_dir).check()
    for name, value, low in (("batch-size", config.batch_size, 2), ("vocab-size", config.vocab_size, 2),
                             ("hidden", config.hidden, 1)):
        if value < low:
            raise UserError(f"--{name} must be at least {low} (got {value})")
    if config.local_lr is not None and not config.local_lr > 0:
        raise UserError(f"--local-lr must be positive (got {config.local_lr})")
    if not 0 <= config.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1) (got {config.dropout})")
    return out
