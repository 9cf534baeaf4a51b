"""Stage 0: turn an image into exactly K region features and their boxes, for the stage-2 re-ranker.

Two sources:

- `detector`: torchvision's Faster R-CNN with COCO weights. The regions are its best detections
  (after NMS, above a score threshold), filled up with the whole image and then a fixed grid of boxes
  (2x2, 3x3, ...) when it finds fewer than K; a region's feature is the detector's box-head
  representation of that box (1024-d) plus its normalised geometry (x1, y1, x2, y2, w, h, area): 1031-d.
- `clip-patches`: the cheaper ablation. The index's own CLIP ViT, one forward per image; every patch
  token after `ln_post`, projected to the joint space, is a region (plus the geometry of its patch).
  K is the number of patches (49 for ViT-B-32); asking for another K is an error.

Boxes are in the original image's pixels. Storage lives in `region_store.py`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import numpy as np
import torch
from open_clip.transformer import VisionTransformer
from PIL import Image
from torchvision.models import detection
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import nms
from torchvision.transforms import CenterCrop, Resize
from torchvision.transforms.functional import to_tensor

from vqa_search.align.constants import DEFAULT_REGIONS  # light: the CLI reads it too
from vqa_search.core.encode import autocast
from vqa_search.core.errors import UserError
from vqa_search.core.threads import default_workers
from vqa_search.core.models import Clip, default_device, host_reachable, read_state_dict
from vqa_search.core.identity import sha256_file

SOURCES = ("detector", "clip-patches")
DETECTORS = {
    "frcnn-mobilenet": (detection.fasterrcnn_mobilenet_v3_large_fpn,
                        detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1),
    "frcnn-r50": (detection.fasterrcnn_resnet50_fpn_v2, detection.FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1),
}
BOX_FEATURES = 1024  # both presets' box heads end in a 1024-unit layer
GEOMETRY = ("x1", "y1", "x2", "y2", "w", "h", "area")  # each divided by the image's width, height or area


@dataclass
class RegionConfig:
    source: str = "detector"  # detector | clip-patches
    detector: str | None = None  # frcnn-r50 | frcnn-mobilenet; None: R50 on CUDA, MobileNet on CPU
    detector_weights: Path | None = None  # a state dict file; None: torchvision's cache, downloaded when online
    regions: int | None = None  # K; None: 36 for a detector, one per patch for clip-patches
    score_threshold: float = 0.2
    min_size: int | None = None  # the detector's input shorter side; None: its own 800 (smaller is faster, coarser)
    batch_size: int = 8  # images per decoded batch and progress step
    workers: int = field(default_factory=default_workers)
    rows_per_shard: int = 256  # shards are also flushed every 30 s, so a crash loses at most that much
    progress: bool = True


class RegionExtractor:
    """Images -> (features float32 (n, K, F), boxes float32 (n, K, 4) in original pixels).

    `identity` is everything the features depend on; stored sets are reused only under an equal one.
    """

    name: str  # the folder under INDEX_DIR/regions/
    source: str
    num_regions: int
    feature_dim: int
    identity: dict
    preprocess: Callable  # PIL image -> tensor, run in decoding workers
    stack: bool  # whether preprocessed images share one size and can be batched

    def extract(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """Regions of RGB images, e.g. a query image that is not in the collection."""
        pixels = [self.preprocess(image) for image in images]
        return self.extract_pixels(torch.stack(pixels) if self.stack else pixels, [image.size for image in images])

    def extract_pixels(self, pixels, sizes: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed images and their original (width, height)."""
        raise NotImplementedError


def load_extractor(config: RegionConfig, clip: Clip | None = None) -> RegionExtractor:
    """The extractor `config` asks for; `clip` is the index's model, needed by clip-patches only."""
    if config.source not in SOURCES:
        raise UserError(f"unknown region source {config.source!r}; choose one of {', '.join(SOURCES)}")
    if config.regions is not None and config.regions < 1:
        raise UserError("--regions must be at least 1")
    if config.source == "clip-patches":
        return PatchRegions(clip, config.regions)
    return DetectorRegions(config)


class DetectorRegions(RegionExtractor):
    """Faster R-CNN regions; the network itself is built on first use, so an up-to-date set never loads it."""

    source = "detector"
    stack = False  # the detector resizes each image itself, keeping its aspect ratio
    preprocess = staticmethod(to_tensor)

    def __init__(self, config: RegionConfig, device: torch.device | None = None):
        self.device = device or default_device()
        self.name = config.detector or ("frcnn-r50" if self.device.type == "cuda" else "frcnn-mobilenet")
        if self.name not in DETECTORS:
            raise UserError(f"unknown detector {self.name!r}; choose one of {', '.join(DETECTORS)}")
        self.weights = detector_weights(self.name, config.detector_weights)
        self.num_regions = config.regions or DEFAULT_REGIONS
        self.feature_dim = BOX_FEATURES + len(GEOMETRY)
        self.score_threshold = config.score_threshold
        self.min_size = config.min_size
        self.identity = {"source": self.source, "detector": self.name, "weights_sha256": sha256_file(self.weights),
                         "regions": self.num_regions, "score_threshold": self.score_threshold,
                         "min_size": self.min_size}

    @cached_property
    def model(self) -> detection.FasterRCNN:
        build = DETECTORS[self.name][0]
        model = build(weights=None, weights_backbone=None)
        _load_detector_weights(model, self.weights, self.name)
        if self.min_size:
            transform = model.transform
            transform.max_size = round(transform.max_size * self.min_size / transform.min_size[0])
            transform.min_size = (self.min_size,)
        model.roi_heads.score_thresh = self.score_threshold
        model.roi_heads.detections_per_img = max(model.roi_heads.detections_per_img, self.num_regions)
        return model.to(self.device).eval()

    def extract_pixels(self, pixels: list[torch.Tensor], sizes) -> tuple[np.ndarray, np.ndarray]:
        regions = [self._regions(image) for image in pixels]
        return (np.stack([features for features, _ in regions]), np.stack([boxes for _, boxes in regions]))

    @torch.inference_mode()
    def _regions(self, image: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """One image per forward: batching pads images to a common size, which changes the features
        near the borders, so a query image extracted alone would not match the stored ones."""
        model = self.model
        height, width = image.shape[-2:]
        images, _ = model.transform([image.to(self.device)])
        resized = images.image_sizes[0]
        with autocast(self.device):
            feature_maps = model.backbone(images.tensors)
            proposals, _ = model.rpn(images, feature_maps)
            detections = model.roi_heads(feature_maps, proposals, images.image_sizes)[0][0]
            # The model's NMS is per class, so one object can come back once per plausible class.
            boxes, scores = detections["boxes"].float(), detections["scores"].float()
            keep = nms(boxes, scores, model.roi_heads.nms_thresh)[: self.num_regions]
            boxes = resize_boxes(boxes[keep], resized, (height, width))
            boxes = torch.cat([boxes, fill_boxes(width, height, self.num_regions - len(boxes)).to(boxes)])
            pooled = model.roi_heads.box_roi_pool(
                feature_maps, [resize_boxes(boxes, (height, width), resized)], images.image_sizes
            )
            features = model.roi_heads.box_head(pooled).float().cpu()
        boxes = boxes.cpu()
        return torch.cat([features, geometry(boxes, width, height)], dim=1).numpy(), boxes.numpy()


class PatchRegions(RegionExtractor):
    """CLIP ViT patch tokens as regions: one forward per batch, no detector."""

    name = source = "clip-patches"
    stack = True

    def __init__(self, clip: Clip | None, regions: int | None = None):
        if clip is None:
            raise UserError("--source clip-patches needs the index's CLIP model")
        visual = clip.model.visual
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None or visual.final_ln_after_pool:
            raise UserError(f"--source clip-patches needs a plain ViT CLIP model, not {clip.identity.model}")
        grid_h, grid_w = visual.grid_size
        self.num_regions = grid_h * grid_w
        if regions not in (None, self.num_regions):
            raise UserError(
                f"--source clip-patches gives one region per patch ({self.num_regions} for {clip.identity.model}): "
                f"leave out --regions or pass {self.num_regions}"
            )
        self.clip = clip
        self.grid = (grid_h, grid_w)
        self.preprocess = clip.preprocess
        self.resize, self.crop = _resize_and_crop(clip.preprocess)
        width = visual.proj.shape[1] if visual.proj is not None else visual.transformer.width
        self.feature_dim = width + len(GEOMETRY)
        self.identity = {"source": self.source, "model": clip.identity.to_json(), "regions": self.num_regions}

    @torch.inference_mode()
    def extract_pixels(self, pixels: torch.Tensor, sizes) -> tuple[np.ndarray, np.ndarray]:
        visual = self.clip.model.visual
        with autocast(self.clip.device):
            # The last block's patch tokens after ln_post, as the pooled vector sees them; the caller's
            # model is left as it was (setting output_tokens would change what it returns elsewhere).
            tokens = visual.forward_intermediates(pixels.to(self.clip.device, non_blocking=True), indices=1,
                                                  normalize_intermediates=True, intermediates_only=True,
                                                  output_fmt="NLC")["image_intermediates"][-1]
            if visual.proj is not None:
                tokens = tokens @ visual.proj
        boxes = torch.stack([self.patch_boxes(width, height) for width, height in sizes])
        places = torch.stack([geometry(b, width, height) for b, (width, height) in zip(boxes, sizes)])
        features = torch.cat([tokens.float().cpu(), places], dim=2)
        return features.numpy(), boxes.numpy()

    def patch_boxes(self, width: int, height: int) -> torch.Tensor:
        """The patch grid mapped back through the preprocess's resize and center crop, row by row."""
        resized_w, resized_h = _resized_size(self.resize, width, height)
        crop_h, crop_w = self.crop
        top, left = int(round((resized_h - crop_h) / 2.0)), int(round((resized_w - crop_w) / 2.0))
        grid_h, grid_w = self.grid
        rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
        cell_w, cell_h = crop_w / grid_w, crop_h / grid_h
        x1, y1 = left + cols.flatten() * cell_w, top + rows.flatten() * cell_h
        boxes = torch.stack([x1, y1, x1 + cell_w, y1 + cell_h], dim=1).float()
        return boxes * torch.tensor([width / resized_w, height / resized_h] * 2)


def fill_boxes(width: int, height: int, count: int) -> torch.Tensor:
    """The whole image, then the cells of a 2x2, 3x3, ... grid row by row: the first `count` of them."""
    boxes = [(0.0, 0.0, float(width), float(height))]
    cells = 2
    while len(boxes) < count:
        boxes += [(col * width / cells, row * height / cells, (col + 1) * width / cells, (row + 1) * height / cells)
                  for row in range(cells) for col in range(cells)]
        cells += 1
    return torch.tensor(boxes[: max(count, 0)], dtype=torch.float32).reshape(-1, 4)


def geometry(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(K, 4) pixel boxes -> (K, 7): x1, y1, x2, y2, w, h, area, each relative to the image."""
    x1, y1, x2, y2 = (boxes.float() / torch.tensor([width, height, width, height])).unbind(dim=1)
    w, h = x2 - x1, y2 - y1
    return torch.stack([x1, y1, x2, y2, w, h, w * h], dim=1)


def detector_weights(name: str, path: Path | None) -> Path:
    """The state dict file to load: `path`, else torchvision's cached COCO weights (downloaded when online)."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(f"detector weights not found: {path}")
        return path.resolve()
    url = DETECTORS[name][1].url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if cached.is_file():
        return cached
    if not host_reachable(urlparse(url).hostname):
        raise UserError(
            f"no COCO weights for the {name} detector: {cached} does not exist and cannot be downloaded from "
            f"here (offline?). Download {url} into {cached.parent} on a connected machine, or pass "
            "--detector-weights FILE (a state dict, .pth or .safetensors); --source clip-patches needs no detector."
        )
    try:
        torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True)
    except (OSError, RuntimeError) as error:
        raise UserError(f"cannot download the {name} detector's weights from {url}: {error}") from None
    return cached


def _load_detector_weights(model: torch.nn.Module, path: Path, name: str) -> None:
    state_dict = read_state_dict(path, f"detector {name}")
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # tensors of the wrong shape
        raise UserError(f"detector weights {path} do not fit {name}: {str(error).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise UserError(
            f"detector weights {path} do not fit {name}: {len(missing)} missing and {len(unexpected)} unexpected "
            f"weights (e.g. {(missing or unexpected)[0]!r}); pass the --detector they were made for"
        )


def _resize_and_crop(preprocess) -> tuple[Resize, tuple[int, int]]:
    """open_clip's image transform: resize, then center crop to (height, width)."""
    steps = getattr(preprocess, "transforms", [])
    resize = next((step for step in steps if isinstance(step, Resize)), None)
    crop = next((step for step in steps if isinstance(step, CenterCrop)), None)
    if resize is None or crop is None or resize.max_size is not None:
        raise UserError("--source clip-patches needs a model whose preprocessing is a resize and a center crop")
    return resize, tuple(crop.size)


def _resized_size(resize: Resize, width: int, height: int) -> tuple[int, int]:
    """torchvision's Resize: an int sets the shorter side (aspect kept, long side truncated), a pair squashes."""
    if isinstance(resize.size, int) or len(resize.size) == 1:
        short = resize.size if isinstance(resize.size, int) else resize.size[0]
        if width <= height:
            return short, int(short * height / width)
        return int(short * width / height), short
    return resize.size[1], resize.size[0]
