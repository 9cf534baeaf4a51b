"""Stage 2 training: the cross-attention re-ranker on a frozen CLIP and precomputed regions.

Each train caption is scored against its own image, hard negatives (the images the frozen CLIP
ranks highest for it) and the other images of the batch, with InfoNCE on s = s_global + λ·s_fine,
as ALBEF and BLIP train their matching heads. Images that own a caption with the very same text
are not negatives ("a red circle" fits many pictures) and are masked out of the softmax.
After each epoch the val split is re-ranked with the recall protocol of `bench recall`; the best
re-ranker is written as soon as it is found, so a crash loses only the epochs after it. The loop is
`core.training.fit`: AdamW with weight-decay groups, warm-up + cosine, history and curve beside the file.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vqa_search.align.region_store import RegionSet
from vqa_search.align.reranker import CrossAttentionReranker, RerankerConfig, load_reranker, save_reranker
from vqa_search.core.encode import autocast, token_lengths
from vqa_search.core.errors import UserError
from vqa_search.core.feature_cache import (CACHE_DIR_NAME, CacheConfig, EntryBuilder, FeatureCache, Ragged,
                                           array_digest)
from vqa_search.core.training import Curve, Fitted, check_config, fit, seed_everything, weight_decay_groups
from vqa_search.indexer.datasets import read_dataset
from vqa_search.core.store import DEFAULT_DIR_NAME, IndexDir
from vqa_search.core.models import load_clip
from vqa_search.core.identity import DEFAULT_MODEL, DEFAULT_PRETRAINED, resolve_identity
from vqa_search.retrieval.metrics import summarize
from vqa_search.retrieval.recall import Gallery, RecallConfig, gallery_ranks, load_gallery
from vqa_search.align.rerank import (DEFAULT_TOP, RERANKER_FILE, FineInputs, caption_tokens, gallery_regions,
                                         padded, reranked_ranks)

log = logging.getLogger("vqa_search")

LAMBDA_GRID = (0.25, 0.5, 1.0, 2.0, 4.0)
KS = (1, 5, 10)
RECALL_CURVE = Curve("val R@1 (%)", lambda record: {"text→image": record["val"]["t2i"]["R@1"],
                                                     "image→text": record["val"]["i2t"]["R@1"]})


@dataclass
class RerankTrainConfig:
    model: str = DEFAULT_MODEL
    pretrained: str = DEFAULT_PRETRAINED  # the frozen CLIP's weights: a stage-1 checkpoint file or a pretrained tag
    regions: str | None = None  # region set name; None = the one computed for the index
    out: Path | None = None  # default INDEX_DIR/reranker.safetensors, where `query --rerank` looks
    index: Path | None = None  # default DATASET/.vqa-search
    lam: float | None = 1.0  # None: train with 1.0, then choose λ on val from LAMBDA_GRID
    negatives: int = 32
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4  # on matrices only: not biases, norms
    warmup: float = 0.05  # fraction of all steps with a linear learning-rate warm-up, then cosine decay
    attention_dim: int = 256
    region_hidden: int = 0  # > 0: a small MLP on the regions (RerankerConfig.region_hidden)
    patience: int = 3
    top: int = DEFAULT_TOP  # val: how many global candidates are re-ranked
    seed: int = 42
    train_split: str = "train"
    val_split: str = "val"
    progress: bool = True
    cache: str = "auto"  # train caption tokens and regions: memory | disk (memory-mapped) | auto (core/feature_cache.py)
    cache_dir: Path | None = None  # default INDEX_DIR/feature-cache


@dataclass
class RerankTrainResult(Fitted):  # history: per epoch loss, val recall of the re-ranked top, seconds
    path: Path
    lam: float
    val_global: dict[str, dict[str, float]]  # val recall of the frozen CLIP alone
    val_reranked: dict[str, dict[str, float]]  # val recall of the saved re-ranker
    seconds: float

    def summary(self) -> str:
        before, after = self.val_global, self.val_reranked
        return (f"re-ranker saved to {self.path} (epoch {self.best_epoch}, λ={self.lam:g}, {self.seconds:.0f} s); "
                f"val R@1 text→image {before['t2i']['R@1']:.1f} → {after['t2i']['R@1']:.1f}, "
                f"image→text {before['i2t']['R@1']:.1f} → {after['i2t']['R@1']:.1f}")


@dataclass
class TrainingSplit:
    gallery: Gallery
    inputs: FineInputs

    @property
    def global_scores(self) -> np.ndarray:
        return self.gallery.caption_vectors @ self.gallery.image_vectors.T


def train_reranker(dataset: Path | str, config: RerankTrainConfig = RerankTrainConfig()) -> RerankTrainResult:
    started = time.perf_counter()
    _check(config)
    data = read_dataset(dataset)
    index_dir = IndexDir(config.index or Path(dataset) / DEFAULT_DIR_NAME)
    regions = RegionSet.open(index_dir.path, config.regions)
    identity = resolve_identity(config.model, config.pretrained)
    clip = load_clip(identity)
    clip.model.requires_grad_(False)

    cache = FeatureCache(CacheConfig(config.cache, config.cache_dir), index_dir.path / CACHE_DIR_NAME)

    def split(name: str, cache: FeatureCache) -> TrainingSplit:
        recall_config = RecallConfig(split=name, model=config.model, pretrained=config.pretrained,
                                     progress=config.progress)
        gallery = load_gallery(data, recall_config, identity, index_dir)
        rows = np.array([regions.row_of(path) for path in gallery.images])  # a UserError names one without
        region_bytes = len(rows) * regions.num_regions * regions.feature_dim * np.dtype(np.float16).itemsize
        split_regions = (gallery_regions(regions, gallery.images) if cache.in_memory(region_bytes)
                         else SetRows(regions, rows))
        return TrainingSplit(gallery, FineInputs(cached_caption_tokens(cache, clip, gallery.caption_texts),
                                                 split_regions))

    # val is re-ranked whole after every epoch: its tokens and regions are held in RAM
    train = split(config.train_split, cache)
    val = split(config.val_split, FeatureCache(CacheConfig("memory"), cache.directory))
    generator = seed_everything(config.seed)
    reranker = CrossAttentionReranker(RerankerConfig(
        token_dim=train.inputs.tokens[0].shape[-1], region_dim=regions.feature_dim,
        attention_dim=config.attention_dim, region_hidden=config.region_hidden,
        lam=1.0 if config.lam is None else config.lam, regions=regions.name, clip=identity.to_json(),
    )).to(clip.device)
    out = Path(config.out or index_dir.path / RERANKER_FILE)
    val_global = _summary(gallery_ranks(val.gallery))
    log.info("val recall of the frozen CLIP: text→image R@1 %.1f, image→text R@1 %.1f",
             val_global["t2i"]["R@1"], val_global["i2t"]["R@1"])

    scale = float(clip.model.logit_scale.exp())  # the frozen CLIP's own temperature
    trainer = RerankTrainer(reranker, train, scale, config, generator, clip.device)

    def evaluate() -> tuple[float, dict]:
        val_recall = _summary(reranked_ranks(reranker, val.global_scores, val.inputs, val.gallery.caption_image,
                                             config.top))
        return sum(val_recall[direction][f"R@{k}"] for direction in ("t2i", "i2t") for k in KS), {"val": val_recall}

    fitted = fit(reranker, weight_decay_groups(reranker, config.weight_decay), trainer.batches, trainer.loss,
                 evaluate=evaluate, save_best=lambda record: save_reranker(reranker, out), out=out, config=config,
                 steps=trainer.steps, device=clip.device, curve=RECALL_CURVE, progress=config.progress)

    reranker = load_reranker(out, clip.device).eval()  # the kept epoch
    if config.lam is None:
        reranker.config.lam = _choose_lambda(reranker, val, config.top)
        save_reranker(reranker, out)
    val_reranked = _summary(reranked_ranks(reranker, val.global_scores, val.inputs, val.gallery.caption_image,
                                           config.top))
    return RerankTrainResult(**vars(fitted), path=out, lam=reranker.config.lam, val_global=val_global,
                             val_reranked=val_reranked, seconds=time.perf_counter() - started)


class RerankTrainer:
    """Batches of train captions, and their loss: InfoNCE of each caption against its image, its hard
    negatives and the batch's other images, and of each image of the batch against the batch's captions."""

    def __init__(self, reranker: CrossAttentionReranker, train: TrainingSplit, scale: float, config: RerankTrainConfig,
                 generator: torch.Generator, device: torch.device | str = "cpu"):
        self.reranker, self.train, self.scale, self.config = reranker, train, scale, config
        self.generator, self.device = generator, torch.device(device)
        gallery = train.gallery
        self.owner = torch.as_tensor(gallery.caption_image)
        self.image_vectors = torch.as_tensor(gallery.image_vectors)
        self.caption_vectors = torch.as_tensor(gallery.caption_vectors)
        self.same_text = _images_sharing_text(gallery)
        self.negatives = torch.as_tensor(mine_negatives(gallery, config.negatives, self.same_text))
        self.steps = math.ceil(len(self.owner) / config.batch_size)

    def batches(self, epoch: int) -> tuple[torch.Tensor, ...]:
        """A fresh shuffle of the train captions, cut into batches (the last one may be smaller)."""
        return torch.randperm(len(self.owner), generator=self.generator).split(self.config.batch_size)

    def loss(self, captions: torch.Tensor) -> torch.Tensor:
        own = self.owner[captions]
        candidates = torch.cat([own[:, None], self.negatives[captions], own[None].expand(len(own), -1)], dim=1)
        scores, not_negative = self.scale * self.scores(captions, candidates), self._not_negative(captions, candidates)
        diagonal = torch.arange(len(captions), device=self.device)
        text_to_image = F.cross_entropy(scores.masked_fill(not_negative, float("-inf")), torch.zeros_like(diagonal))
        # The batch block scores every caption against every caption's image, so it also gives the
        # image→caption loss; without it s_fine could learn caption-dependent offsets that are
        # invisible to text→image ranking and ruin image→caption ranking.
        block, block_mask = scores[:, -len(captions):], not_negative[:, -len(captions):].clone()
        block_mask.fill_diagonal_(False)
        image_to_text = F.cross_entropy(block.masked_fill(block_mask, float("-inf")).T, diagonal)
        return (text_to_image + image_to_text) / 2

    def scores(self, captions: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """s = s_global + λ·s_fine of each caption against its candidate images (C, N), as the model's forward
        computes it, but projecting each distinct image once: hard negatives and batch images repeat.

        The last C columns are the batch's own images, the same row for every caption (`loss` builds
        them so): they are scored as one shared set of images rather than copied C times, which kept
        C x C x K x F region values in memory (600 MB a step for 36 detector regions of 1,031 values).
        """
        tokens, mask = padded([self.train.inputs.tokens[c] for c in captions.tolist()], self.device)
        global_scores = torch.einsum("cd,cnd->cn", self.caption_vectors[captions], self.image_vectors[candidates])
        images, position = candidates.unique(return_inverse=True)
        position = position.to(self.device)
        with autocast(self.device):
            regions = self.reranker.project_regions(self.train.inputs.regions[images].to(self.device).float())
            flat = regions.flatten(1)
            # F.embedding is the gather whose backward is fast on CPU (indexing's scatter-add is not).
            own_and_hard = F.embedding(position[:, :-len(captions)], flat).unflatten(-1, regions.shape[1:])
            batch = F.embedding(position[:1, -len(captions):], flat).unflatten(-1, regions.shape[1:])
            fine = torch.cat([self.reranker.projected_fine_scores(tokens, mask, own_and_hard),
                              self.reranker.projected_fine_scores(tokens, mask, batch)], dim=1)
        return global_scores.to(self.device) + self.reranker.config.lam * fine.float()

    def _not_negative(self, captions: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Candidates other than position 0 that are the caption's image, or own a caption of the same text."""
        masked = candidates == self.owner[captions][:, None]
        for row, caption in enumerate(captions.tolist()):
            shared = self.same_text.get(caption)
            if shared:
                masked[row] |= torch.isin(candidates[row], torch.as_tensor(list(shared)))
        masked[:, 0] = False
        return masked.to(self.device)


@dataclass
class SetRows:
    """A split's regions read from the region set's memory-mapped shards batch by batch (`--cache disk`),
    in place of the same float16 rows copied into RAM (`gallery_regions`)."""

    regions: RegionSet
    rows: np.ndarray  # the set's row of each gallery image

    def __getitem__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.regions.features(self.rows[np.asarray(images)]))


def cached_caption_tokens(cache: FeatureCache, clip, texts: list[str], chunk: int = 1024) -> Ragged:
    """`caption_tokens` of every caption through the feature cache: written chunk by chunk, reused when the
    same weights saw the same token ids."""
    ids = clip.tokenizer(texts)
    entry = cache.entry("rerank-caption-tokens", clip.identity, dtype="float16", tokens=array_digest(ids))

    def fill(builder: EntryBuilder) -> None:
        lengths, ragged = token_lengths(ids).tolist(), None
        for start in range(0, len(texts), chunk):
            for row, tokens in enumerate(caption_tokens(clip, texts[start:start + chunk]), start):
                if ragged is None:  # allocated once the first caption gives the width
                    ragged = builder.ragged("tokens", lengths, tuple(tokens.shape[1:]), np.float16)
                ragged.values[ragged.offsets[row]:ragged.offsets[row + 1]] = tokens.numpy()

    return entry.get(fill).ragged("tokens")


def mine_negatives(gallery: Gallery, n: int, same_text: dict[int, set[int]], chunk: int = 4096) -> np.ndarray:
    """For each caption, the n images the frozen CLIP ranks highest that are not correct answers to it."""
    n = min(n, len(gallery.images) - 1)
    out = np.empty((len(gallery.caption_texts), n), dtype=np.int64)
    for start in range(0, len(out), chunk):
        scores = gallery.caption_vectors[start:start + chunk] @ gallery.image_vectors.T
        rows = np.arange(len(scores))
        scores[rows, gallery.caption_image[start:start + chunk]] = -np.inf
        for row in rows:
            for image in same_text.get(start + row, ()):
                scores[row, image] = -np.inf
        top = np.argpartition(-scores, n - 1, axis=1)[:, :n]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[start:start + chunk] = np.take_along_axis(top, order, axis=1)
    return out


def _images_sharing_text(gallery: Gallery) -> dict[int, set[int]]:
    """caption -> other images that own a caption with exactly the same (normalised) text."""
    owners: dict[str, set[int]] = {}
    for text, image in zip(gallery.caption_texts, gallery.caption_image.tolist()):
        owners.setdefault(" ".join(text.lower().split()), set()).add(image)
    shared = {}
    for caption, (text, image) in enumerate(zip(gallery.caption_texts, gallery.caption_image.tolist())):
        others = owners[" ".join(text.lower().split())] - {image}
        if others:
            shared[caption] = others
    return shared


def _choose_lambda(reranker: CrossAttentionReranker, val: TrainingSplit, top: int) -> float:
    """The λ of LAMBDA_GRID with the best val text→image recall (R@1 + R@5 + R@10)."""
    results = {}
    for lam in LAMBDA_GRID:
        reranker.config.lam = lam
        t2i = summarize(reranked_ranks(reranker, val.global_scores, val.inputs, val.gallery.caption_image,
                                       top)["t2i"], KS)
        results[lam] = sum(t2i[f"R@{k}"] for k in KS)
    log.info("val text→image R@1+5+10 by λ: %s",
             ", ".join(f"{lam:g}: {score:.1f}" for lam, score in results.items()))
    return max(results, key=results.get)


def _summary(ranks: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    return {direction: {key: value for key, value in summarize(ranks[direction], KS).items() if key.startswith("R@")}
            for direction in ("t2i", "i2t")}


def _check(config: RerankTrainConfig) -> None:
    check_config(config)
    CacheConfig(config.cache, config.cache_dir).check()
    for name in ("negatives", "batch_size", "top"):
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(config, name)})")
    if config.lam is not None and config.lam <= 0:
        raise UserError(f"--lambda must be positive, or 'auto' to choose it on val (got {config.lam:g})")
