"""What the answer heads read, computed once per image and per question.

- g: the image's global embedding from CLIP (the same model as an index, or a stage-1 checkpoint);
- q: the question's CLIP text embedding, from the same model;
- the local encoder's input to its first trainable block (`LocalTower.prefix`), for dual heads:
  an open_clip ViT (`LocalEncoder`) or a Hugging Face ViT (`hf_local.HfLocalEncoder`);
- the image's regions from a region set of the index (the regions head), read from the set for
  indexed images and extracted with the set's own extractor for any other image.

Everything frozen is computed here once, so an epoch only runs the head and, with
`--unfreeze-last N`, the local encoder's last N blocks. With N = 0 the cached stream has been
through every block already and each batch only pools it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from open_clip.transformer import VisionTransformer
from torch import nn

from vqa_search.align.compositional import region_features
from vqa_search.align.region_store import RegionSet
from vqa_search.core.encode import autocast, encode_texts
from vqa_search.core.errors import UserError
from vqa_search.core.feature_cache import (CacheConfig, CacheEntry, EntryBuilder, FeatureCache, Stored,
                                           computed_rows, file_states_digest, take)
from vqa_search.core.identity import ModelIdentity, resolve_identity
from vqa_search.core.image_stream import DecodedBatch, ImageReader, ImageRef
from vqa_search.core.models import Clip, load_clip
from vqa_search.core.runner import ClipImageMapper, Mapper
from vqa_search.core.tower_blocks import image_prefix, image_suffix_tokens

log = logging.getLogger("vqa_search")


class LocalTower(nn.Module):
    """What the dual heads need of a local encoder, whichever library its ViT comes from.

    `prefix` runs the frozen first blocks once per image (cached as float16); `forward` runs the
    trainable last `unfreeze_last` blocks and the final norm on cached streams and returns
    (patch tokens (B, N, width), pooled output (B, pooled_dim)).
    """

    model: nn.Module  # the whole network; its trainable parameters are the last blocks and the final norm
    unfreeze_last: int
    identity: ModelIdentity  # what a head file records to load the same weights again
    preprocess: Callable  # PIL image -> pixels, run in decoding workers
    device: torch.device
    width: int
    pooled_dim: int

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The weights training changes: all a head file needs besides the base weights' identity."""
        trainable = {name for name, parameter in self.model.named_parameters() if parameter.requires_grad}
        return {name: tensor for name, tensor in self.model.state_dict().items() if name in trainable}

    def prefix(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, stream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def load_local_encoder(model: str, pretrained: str, unfreeze_last: int,
                       device: torch.device | None = None) -> LocalTower:
    """`hf:NAME_OR_PATH` is a Hugging Face ViT (its weights named by itself); anything else an open_clip ViT."""
    from vqa_search.vqa.hf_local import is_hf_model, load_hf_local

    if is_hf_model(model):
        return load_hf_local(model, unfreeze_last, device)
    return LocalEncoder(load_clip(resolve_identity(model, pretrained), device), unfreeze_last)


class LocalEncoder(LocalTower):
    """An open_clip ViT image tower for local detail: its patch tokens and pooled output.

    Only its last `unfreeze_last` blocks, ln_post and projection can train; the rest is frozen and
    its output (the residual stream entering the first trainable block) is what gets cached.
    """

    def __init__(self, clip: Clip, unfreeze_last: int = 0):
        super().__init__()
        visual = clip.model.visual
        if not isinstance(visual, VisionTransformer):
            raise UserError(f"the local encoder must be a ViT (patch tokens), not {clip.identity.model}")
        depth = len(visual.transformer.resblocks)
        if not 0 <= unfreeze_last <= depth:
            raise UserError(f"--unfreeze-last must be between 0 and {depth}, the blocks of {clip.identity.model} "
                            f"(got {unfreeze_last})")
        self.clip = clip
        self.model = clip.model  # the image_prefix / image_suffix_tokens helpers take the whole CLIP
        self.identity, self.preprocess, self.device = clip.identity, clip.preprocess, clip.device
        self.unfreeze_last = unfreeze_last
        self.frozen_blocks = depth - unfreeze_last
        self.model.requires_grad_(False)
        if unfreeze_last:
            for module in (*visual.transformer.resblocks[self.frozen_blocks:], visual.ln_post):
                module.requires_grad_(True)
            if visual.proj is not None:
                visual.proj.requires_grad_(True)

    @property
    def width(self) -> int:
        return self.model.visual.transformer.width

    @property
    def pooled_dim(self) -> int:
        return self.model.visual.output_dim

    @torch.no_grad()
    def prefix(self, pixels: torch.Tensor) -> torch.Tensor:
        with autocast(self.device):
            return image_prefix(self.model, pixels.to(self.device), self.frozen_blocks)

    def forward(self, stream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch tokens (B, N, W), pooled output (B, W')) from cached streams."""
        pooled, tokens = image_suffix_tokens(self.model, stream.to(self.device, torch.float32),
                                             self.frozen_blocks)
        return tokens, pooled


@dataclass
class ImageFeatures:
    rows: dict[Path, int]  # image file -> row of the arrays below
    global_vectors: torch.Tensor  # (images, D) float32, L2-normalised
    local_streams: np.ndarray | None  # (images, tokens, W) float16: LocalTower.prefix, in RAM or memory-mapped
    skipped: dict[Path, str]  # unreadable file -> reason
    regions: np.ndarray | None = None  # (images, K, F) float16: the regions head's region features (maybe mapped)

    def take(self, images: Sequence[Path]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor,
                                                    torch.Tensor | None]:
        """Per question its image's global vector; the local streams and regions of each distinct image
        once, and which of them each question reads (the local encoder runs once per image, not per question)."""
        rows = torch.tensor([self.rows[image] for image in images])
        distinct, inverse = torch.unique(rows, return_inverse=True)
        streams = None if self.local_streams is None else take(self.local_streams, distinct)
        regions = None if self.regions is None else take(self.regions, distinct)
        return self.global_vectors[rows], streams, inverse, regions


def image_features(clip: Clip, local: LocalTower | None, images: Sequence[Path], batch_size: int = 64,
                   workers: int = 0, progress: bool = False, regions: RegionSet | None = None,
                   cache: FeatureCache | None = None) -> ImageFeatures:
    """Global vectors, local streams and regions of readable images; unreadable ones are listed, not fatal.

    The vectors and streams come from `cache` (`core/feature_cache.py`) when it holds them for these
    files and weights, else they are computed into it; without one, into RAM.
    """
    cache = cache or FeatureCache(CacheConfig("memory"), Path("."))
    unique = list(dict.fromkeys(images))
    images_digest = file_states_digest(unique)
    found = _decode_and_encode(cache.entry("vqa-image-vectors", clip.identity, images=images_digest),
                               clip.preprocess, unique, batch_size, workers, progress, ClipImageMapper(clip),
                               np.float32, "images")
    rows = {Path(key): row for row, key in enumerate(found.meta["keys"])}
    skipped = {Path(key): reason for key, reason in found.meta["skipped"].items()}
    vectors = torch.from_numpy(np.array(found.rows("rows")))  # small: (images, D) in RAM
    streams = None
    if local is not None:
        readable = [image for image in unique if image in rows]
        entry = cache.entry("vqa-local-streams", local.identity, local_encoder=type(local).__name__,
                            frozen_blocks=local.frozen_blocks, dtype="float16", images=images_digest)
        local_found = _decode_and_encode(entry, local.preprocess, readable, batch_size, workers, progress,
                                         _LocalPrefix(local), np.float16, "local encoder")
        if local_found.meta["keys"] != found.meta["keys"]:
            raise UserError("images changed on disk while they were read; run the command again")
        streams = local_found.rows("rows")
    if skipped:
        log.warning("%d unreadable images left out, e.g. %s: %s", len(skipped), *next(iter(skipped.items())))
    region_rows = None if regions is None else _cached_regions(cache, regions, list(rows), images_digest)
    return ImageFeatures(rows, vectors, streams, skipped, region_rows)


def _cached_regions(cache: FeatureCache, regions: RegionSet, images: list[Path], images_digest: str,
                    chunk: int = 1024) -> np.ndarray:
    """`region_features` of the images, written chunk by chunk into a cache entry as float16, as the set
    stores them: an image gets the same features inside the index or out."""
    entry = cache.entry("vqa-regions", None, extractor=regions.manifest["extractor"], dtype="float16",
                        images=images_digest)

    def fill(builder: EntryBuilder) -> None:
        out = builder.array("rows", (len(images), regions.num_regions, regions.feature_dim), np.float16)
        for start in range(0, len(images), chunk):
            out[start:start + chunk] = region_features(regions, images[start:start + chunk]).half().numpy()

    return entry.get(fill).arrays["rows"]


@dataclass
class _LocalPrefix:
    """The runner's mapper for the local encoder: the stream entering its first trainable block, float16."""

    local: LocalTower

    def __call__(self, batch: DecodedBatch) -> torch.Tensor:
        return self.local.prefix(batch.pixels).half().cpu()


def _decode_and_encode(entry: CacheEntry, preprocess, images: list[Path], batch_size: int, workers: int,
                       progress: bool, mapper: Mapper, dtype, desc: str) -> Stored:
    reader = ImageReader([ImageRef(image, image) for image in images], preprocess, batch_size, workers)
    found = computed_rows(entry, reader, mapper, dtype, progress, desc)
    if not found.meta["keys"]:
        raise UserError(f"none of the {len(images)} images could be read, e.g. {images[0]}: "
                        f"{found.meta['skipped'].get(str(images[0]), 'unreadable')}")
    return found


def question_vectors(clip: Clip, questions: Sequence[str]) -> tuple[dict[str, int], torch.Tensor]:
    """Each distinct question embedded once: (row by text, (distinct, D) float32 L2-normalised)."""
    unique = list(dict.fromkeys(questions))
    return {text: row for row, text in enumerate(unique)}, torch.from_numpy(encode_texts(clip, unique))
