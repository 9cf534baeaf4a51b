"""Stage 1: contrastive fine-tuning of CLIP on a collection's own image–caption pairs.

The loss is CLIP's: symmetric InfoNCE over a batch, each image against every caption and each
caption against every image, the matching pair being the positive. Every epoch samples one caption
per train image, so each image appears once per epoch and a batch never holds two captions of the
same image: with all pairs, the second caption of an image would be pushed away from it as if it
were a negative. Only full batches are used (after a fresh shuffle every epoch), because a small
last batch has few negatives and a noisy loss.

The temperature τ is open_clip's `logit_scale` = log(1/τ). `--temperature` sets its starting value
(also for pretrained weights, whose own scale is replaced) and it trains with the model, as in CLIP,
unless `learn_temperature` is False; it is clamped at τ ≥ 0.01 like open_clip does.

After every epoch the val split is scored with the recall benchmark's code; the checkpoint with the
best mean of R@1/5/10 in both directions is written at once (atomically), so a crash loses nothing
but the epochs after it. The checkpoint is a safetensors file of the full open_clip state dict, which
`--pretrained CKPT` loads like any other weights.

`unfreeze_last` = N trains only the last N blocks of each tower and what follows them (ln_post,
ln_final, the projections, logit_scale). Everything before is frozen, so its output — the residual
stream entering the first trained block — is computed once for every train image and caption and
kept in a feature cache (`core/feature_cache.py`: in memory, or memory-mapped .npy files reused by
the next run with the same weights, depth and files); later epochs run only the last N blocks.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import VisionTransformer
from PIL import Image
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from vqa_search.core.artifacts import save_artifact
from vqa_search.core.encode import autocast, encode_text_trimmed, supports_trimmed_text, token_lengths
from vqa_search.core.errors import UserError
from vqa_search.core.feature_cache import (CacheConfig, EntryBuilder, FeatureCache, Ragged, array_digest,
                                           computed_rows, file_states_digest, take)
from vqa_search.indexer.datasets import Dataset, read_dataset
from vqa_search.core.image_stream import DecodedBatch, ImageReader, ImageRef
from vqa_search.core.threads import default_workers
from vqa_search.core.models import Clip, load_clip
from vqa_search.core.identity import DEFAULT_MODEL, DEFAULT_PRETRAINED, ModelIdentity, resolve_identity
from vqa_search.retrieval.metrics import summarize
from vqa_search.retrieval.recall import embed_gallery, gallery_ranks, split_texts
from vqa_search.core.runner import Collector, run
from vqa_search.core.tower_blocks import image_prefix, image_suffix, text_prefix, text_suffix
from vqa_search.core.training import (Curve, Fitted, check_config, config_json, fit, seed_everything,
                                      weight_decay_groups)

log = logging.getLogger("vqa_search")

FORMAT = "vqa-search-finetune/1"
RECALL_KS = (1, 5, 10)
MAX_LOGIT_SCALE = math.log(100)  # open_clip's clamp: τ never goes below 0.01
ADAM_BETAS = (0.9, 0.98)  # open_clip's settings for ViT CLIPs
ADAM_EPS = 1e-6
PIXEL_CACHE_BYTES = 2 << 30  # preprocessed train images up to this size stay in memory; above, decode every epoch
TEXT_CACHE_BATCH = 256
# The cached frozen streams' storage type: float32, exactly what the blocks after them would see without
# a cache. float16 would halve the disk and change the run (benchmarks/feature_cache.py measures by how much).
STREAM_DTYPE = np.float32
RECALL_CURVE = Curve("val R@1 (%)", lambda record: {"text→image": record["t2i"]["R@1"],
                                                     "image→text": record["i2t"]["R@1"]})


@dataclass
class FinetuneConfig:
    model: str = DEFAULT_MODEL
    pretrained: str = DEFAULT_PRETRAINED  # tag, checkpoint file, or "none" to train from scratch
    epochs: int = 12
    batch_size: int = 64
    lr: float = 1e-5
    weight_decay: float = 1e-4  # on matrices only: not biases, norms, embeddings, τ
    temperature: float = 0.07  # starting τ
    learn_temperature: bool = True
    warmup: float = 0.05  # fraction of all steps with a linear learning-rate warm-up, then cosine decay
    seed: int = 42
    unfreeze_last: int = 0  # 0: train everything
    patience: int = 3  # epochs without a better val score before stopping
    train_split: str = "train"
    val_split: str = "val"  # Flickr8k's "dev" and Karpathy's "val" are both read as "val"
    captions: Path | None = None
    images: Path | None = None
    workers: int = field(default_factory=default_workers)
    device: str | None = None  # default: CUDA when available
    cache: str = "auto"  # --unfreeze-last streams: memory | disk (memory-mapped .npy) | auto (core/feature_cache.py)
    cache_dir: Path | None = None  # default DATASET/.vqa-search/feature-cache


@dataclass
class FinetuneResult(Fitted):  # history: per epoch loss, t2i and i2t recall, mean_recall, temperature, seconds
    checkpoint: Path  # the best epoch's weights
    seconds: float
    train_images: int
    skipped_images: int  # unreadable train images, left out


def finetune(dataset: Path | str, out: Path | str, config: FinetuneConfig = FinetuneConfig(),
             progress: bool = True) -> FinetuneResult:
    """Fine-tune on the train split, keep the best epoch by val recall in `out` (.safetensors)."""
    started = time.perf_counter()
    out = _check(Path(out), config)
    data = read_dataset(dataset, captions=config.captions, images=config.images)
    train_texts = split_texts(data, config.train_split)
    split_texts(data, config.val_split)  # same for a missing val split
    identity = resolve_identity(config.model, config.pretrained)
    clip = load_clip(identity, torch.device(config.device) if config.device else None)
    image_blocks, text_blocks = frozen_blocks(clip.model, config.unfreeze_last)
    generator = seed_everything(config.seed)
    _set_trainable(clip.model, config, image_blocks, text_blocks)

    cache = FeatureCache.for_dataset(config.cache, config.cache_dir, data.root)
    images = _TrainImages.load(clip, data, list(train_texts), image_blocks, config, progress, cache)
    texts = _TrainTexts.build(clip, [train_texts[path] for path in images.paths], text_blocks, cache)
    batch_size = min(config.batch_size, len(images.paths))
    steps = len(images.paths) // batch_size
    model, device = clip.model, clip.device
    log.info("fine-tuning %s on %d images (%d captions), %d batches of %d per epoch%s", identity.describe(),
             len(images.paths), len(texts.tokens), steps, batch_size,
             f", last {config.unfreeze_last} blocks per tower" if config.unfreeze_last else "")

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A fresh shuffle of the images (full batches only), each with one freshly sampled caption."""
        order = torch.randperm(len(images.paths), generator=generator)[: steps * batch_size]
        captions = texts.sample(generator)
        for positions, inputs in images.batches(clip, order, batch_size, config.workers):
            yield inputs, captions[positions]

    def loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, captions = batch
        image = F.normalize(images.features(model, inputs.to(device)), dim=-1)
        text = F.normalize(texts.features(model, captions, device), dim=-1)
        return contrastive_loss(image, text, model.logit_scale.exp())

    def evaluate() -> tuple[float, dict]:
        val = validate(clip, data, config.val_split, config)
        record = {**val, "mean_recall": mean_recall(val), "temperature": math.exp(-model.logit_scale.item())}
        return record["mean_recall"], record

    fitted = fit(model, weight_decay_groups(model, config.weight_decay), batches, loss, evaluate=evaluate,
                 save_best=lambda record: save_checkpoint(model, out, identity, record, config), out=out,
                 config=config, steps=steps, device=device, curve=RECALL_CURVE,
                 after_step=lambda: _clamp_logit_scale(model), betas=ADAM_BETAS, eps=ADAM_EPS, progress=progress)
    return FinetuneResult(**vars(fitted), checkpoint=out, seconds=time.perf_counter() - started,
                          train_images=len(images.paths), skipped_images=len(images.skipped))


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: row i of each side matches row i of the other; every other row is a negative."""
    logits = logit_scale * image @ text.T
    labels = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def validate(clip: Clip, data: Dataset, split: str, config: FinetuneConfig) -> dict[str, dict[str, float]]:
    """Recall of the model in memory on a split, by the recall benchmark's own gallery and metrics."""
    clip.model.eval()
    try:
        gallery = embed_gallery(clip, data, split, config.batch_size, config.workers)
    finally:
        clip.model.train()
    return {direction: summarize(ranks, RECALL_KS) for direction, ranks in gallery_ranks(gallery).items()}


def mean_recall(val: dict[str, dict[str, float]]) -> float:
    """The mean of R@1, R@5 and R@10 in both directions: the score that picks the best epoch."""
    return float(np.mean([val[direction][f"R@{k}"] for direction in ("t2i", "i2t") for k in RECALL_KS]))


def save_checkpoint(model: nn.Module, path: Path, base: ModelIdentity, record: dict, config: FinetuneConfig) -> Path:
    """The full open_clip state dict as safetensors (no pickle), with where it came from in the metadata."""
    metadata = {"model": base.model, "base_pretrained": base.pretrained,
                "base_sha256": base.sha256 or "", "epoch": str(record["epoch"]),
                "val": json.dumps({direction: record[direction] for direction in ("t2i", "i2t")}),
                "config": json.dumps(config_json(config))}
    return save_artifact(path, FORMAT, model.state_dict(), metadata)


def frozen_blocks(model: nn.Module, unfreeze_last: int) -> tuple[int | None, int | None]:
    """How many leading blocks of the image and the text tower are frozen; None, None for full fine-tuning."""
    if not supports_trimmed_text(model) or not isinstance(model.visual, VisionTransformer):
        raise UserError("fine-tuning supports open_clip's CLIP models with a ViT image tower and their own "
                        "text transformer (e.g. ViT-B-32, vqa-tiny)")
    if not unfreeze_last:
        return None, None
    image_depth, text_depth = len(model.visual.transformer.resblocks), len(model.transformer.resblocks)
    if unfreeze_last > min(image_depth, text_depth):
        raise UserError(f"--unfreeze-last {unfreeze_last} is more than the model has: {image_depth} image and "
                        f"{text_depth} text blocks")
    return image_depth - unfreeze_last, text_depth - unfreeze_last


@dataclass
class _TrainImages:
    """The readable train images as model input: kept in memory when they fit, else decoded every epoch."""

    paths: list[str]
    skipped: dict[str, str]  # unreadable path -> reason
    cache: np.ndarray | None  # pixels, or with frozen blocks the stream entering the first trained one (maybe mapped)
    frozen_blocks: int | None
    images_dir: Path

    @classmethod
    def load(cls, clip: Clip, data: Dataset, paths: list[str], frozen: int | None, config: FinetuneConfig,
             progress: bool, cache: FeatureCache) -> "_TrainImages":
        """Decode every train image once: unreadable files are found now, and the frozen part runs here only.

        The frozen streams go to `cache` (reused when it holds them already); pixels stay in RAM.
        """
        pixel_bytes = clip.preprocess(Image.new("RGB", (8, 8))).nbytes
        keep = frozen is not None or len(paths) * pixel_bytes <= PIXEL_CACHE_BYTES
        reader = ImageReader([ImageRef(data.images_dir / path, path) for path in paths], clip.preprocess,
                             config.batch_size, config.workers)
        if keep:
            if frozen is None:  # pixels: in RAM as before (decoded again every epoch when they do not fit)
                cache = FeatureCache(CacheConfig("memory"), cache.directory)
            kind = "finetune-pixels" if frozen is None else "finetune-image-prefix"
            entry = cache.entry(kind, clip.identity, frozen_blocks=frozen,
                                dtype=np.dtype(STREAM_DTYPE).name,
                                images=file_states_digest([data.images_dir / path for path in paths]))
            found = computed_rows(entry, reader, _TrainInputs(clip, frozen, keep), STREAM_DTYPE, progress,
                                  "train images")
            readable, skipped, inputs = found.meta["keys"], found.meta["skipped"], found.rows("rows")
        else:
            checked = run(reader, _TrainInputs(clip, frozen, keep), Collector(), progress, "train images")
            readable, skipped, inputs = list(checked.results), checked.skipped, None
        if skipped:
            log.warning("%d unreadable train images left out, e.g. %s: %s", len(skipped), *next(iter(skipped.items())))
        if not readable:
            raise UserError(f"no readable image in the {config.train_split} split of {data.root}")
        return cls(readable, skipped, inputs, frozen, data.images_dir)

    def batches(self, clip: Clip, order: torch.Tensor, batch_size: int,
                workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(positions in `paths`, model input) per batch of `order`; a file unreadable since loading drops out."""
        if self.cache is not None:
            for positions in order.split(batch_size):
                yield positions, take(self.cache, positions)
            return
        refs = [ImageRef(self.images_dir / self.paths[position], position) for position in order.tolist()]
        for batch in ImageReader(refs, clip.preprocess, batch_size, workers):
            if batch.pixels is not None:
                yield torch.tensor([item.key for item in batch.readable]), batch.pixels

    def features(self, model: CLIP, inputs: torch.Tensor) -> torch.Tensor:
        if self.frozen_blocks is None:
            return model.encode_image(inputs)
        return image_suffix(model, inputs.float(), self.frozen_blocks)


@dataclass
class _TrainInputs:
    """The runner's mapper for the train images: their pixels, or with frozen blocks the stream entering the
    first trained one; nothing (the files are only checked) when they will be decoded every epoch instead."""

    clip: Clip
    frozen_blocks: int | None
    keep: bool

    def __call__(self, batch: DecodedBatch) -> torch.Tensor | list[None]:
        if not self.keep:
            return [None] * len(batch.readable)
        if self.frozen_blocks is None:
            return batch.pixels
        return _frozen_images(self.clip, batch.pixels, self.frozen_blocks)


def _frozen_images(clip: Clip, pixels: torch.Tensor, blocks: int) -> torch.Tensor:
    with autocast(clip.device):
        return image_prefix(clip.model, pixels.to(clip.device), blocks).float().cpu()


@dataclass
class _TrainTexts:
    """Every caption of the train images, tokenised once and grouped by image; with frozen blocks, their streams."""

    tokens: torch.Tensor  # (captions, context length)
    first: torch.Tensor  # row in `tokens` of each image's first caption
    counts: torch.Tensor  # captions per image
    streams: Ragged | None  # per caption, the stream entering the first trained block, cut to its length
    frozen_blocks: int | None

    @classmethod
    def build(cls, clip: Clip, texts_per_image: list[list[str]], frozen: int | None,
              cache: FeatureCache) -> "_TrainTexts":
        counts = torch.tensor([len(texts) for texts in texts_per_image])
        tokens = clip.tokenizer([text for texts in texts_per_image for text in texts])
        first = torch.cumsum(counts, 0) - counts
        return cls(tokens, first, counts, None if frozen is None else _frozen_texts(clip, tokens, frozen, cache),
                   frozen)

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        """One caption row per image, uniformly among its captions."""
        return self.first + (torch.rand(len(self.counts), generator=generator) * self.counts).long()

    def features(self, model: CLIP, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        tokens = self.tokens[rows]
        tokens = tokens[:, : int(token_lengths(tokens).max())].to(device)
        if self.streams is None:
            return encode_text_trimmed(model, tokens)
        stream = pad_sequence(self.streams.take(rows), batch_first=True).to(device).float()
        return text_suffix(model, stream, tokens, self.frozen_blocks)


@torch.no_grad()
def _frozen_texts(clip: Clip, tokens: torch.Tensor, blocks: int, cache: FeatureCache) -> Ragged:
    """Length-sorted batches cut to their longest caption, like the caption fast path, then each row to its own."""
    entry = cache.entry("finetune-text-prefix", clip.identity, frozen_blocks=blocks,
                        dtype=np.dtype(STREAM_DTYPE).name, tokens=array_digest(tokens))

    def fill(builder: EntryBuilder) -> None:
        lengths = token_lengths(tokens)
        streams = builder.ragged("streams", lengths.tolist(), (clip.model.transformer.width,), STREAM_DTYPE)
        for rows in torch.argsort(lengths, stable=True).split(TEXT_CACHE_BATCH):
            batch = tokens[rows][:, : int(lengths[rows].max())].to(clip.device)
            with autocast(clip.device):
                stream = text_prefix(clip.model, batch, blocks).float().cpu().numpy()
            for position, row in enumerate(rows.tolist()):
                streams.values[streams.offsets[row]:streams.offsets[row + 1]] = stream[position, : int(lengths[row])]

    return entry.get(fill).ragged("streams")


def _set_trainable(model: CLIP, config: FinetuneConfig, image_blocks: int | None, text_blocks: int | None) -> None:
    """Set τ, and freeze exactly what the cached prefixes depend on."""
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / config.temperature))
    model.requires_grad_(True)
    if config.unfreeze_last:
        visual = model.visual
        for module in (visual.conv1, visual.ln_pre, *visual.transformer.resblocks[:image_blocks],
                       model.token_embedding, *model.transformer.resblocks[:text_blocks]):
            module.requires_grad_(False)
        for parameter in (visual.class_embedding, visual.positional_embedding, model.positional_embedding):
            parameter.requires_grad_(False)
    model.logit_scale.requires_grad_(config.learn_temperature)


@torch.no_grad()
def _clamp_logit_scale(model: CLIP) -> None:
    """After every step, as open_clip does: τ never below 0.01."""
    model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def _check(out: Path, config: FinetuneConfig) -> Path:
    if out.suffix != ".safetensors":
        raise UserError(f"--out must end in .safetensors, the suffix by which `--pretrained` knows the format "
                        f"(got {out})")
    check_config(config)
    CacheConfig(config.cache, config.cache_dir).check()
    for name, value, low in (("batch-size", config.batch_size, 2), ("unfreeze-last", config.unfreeze_last, 0)):
        if value < low:
            raise UserError(f"--{name} must be at least {low} (got {value})")
    if not config.temperature > 0:
        raise UserError(f"--temperature must be positive (got {config.temperature})")
    return out
