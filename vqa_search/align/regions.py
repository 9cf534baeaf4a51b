"""Stage 0: turn an image into exactly K region features and their boxes, for the stage-2 re-ranker.

Three sources:

- `detector`: torchvision's Faster R-CNN with COCO weights. The regions are its best detections
  (after NMS, above a score threshold), filled up with the whole image and then a fixed grid of boxes
  (2x2, 3x3, ...) when it finds fewer than K; a region's feature is the detector's box-head
  representation of that box (1024-d) plus its normalised geometry (x1, y1, x2, y2, w, h, area): 1031-d.
- `clip-patches`: the cheaper ablation. The index's own CLIP ViT, one forward per image; every patch
  token after `ln_post`, projected to the joint space, is a region (plus the geometry of its patch).
  K is the number of patches (49 for ViT-B-32); asking for another K is an error.
- `clip-crops`: every box cropped from the original image and embedded by the index's CLIP image
  tower (L2-normalised), plus its geometry: regions in the same joint space as the caption tokens.
  Its boxes are the given ones (`--boxes`) filled up like detections; without a boxes file, the
  fill alone (the whole image and the grid). It never runs a detector.

Given boxes (`--boxes FILE`, COCO format: `images` with id/file_name/width/height, `annotations` with
image_id/bbox [x, y, w, h] in pixels) replace the detections of `detector` and `clip-crops`: an image
gets its boxes first, in the file's annotation order (at most K), then the same fill. An image the
file does not mention, and any query image outside the collection, gets the fill only. The file's
SHA-256 is part of the extractor identity, so a changed file recomputes the set.

Boxes are in the original image's pixels. Storage lives in `region_store.py`.
"""

from __future__ import annotations

import hashlib
import json
import math
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
from vqa_search.align.detector import is_detector_file, load_detector, read_detector_spec
from vqa_search.core.encode import autocast, encode_image_batch
from vqa_search.core.errors import UserError
from vqa_search.core.threads import default_workers
from vqa_search.core.models import Clip, default_device, host_reachable, read_state_dict
from vqa_search.core.ray_runner import RayRunner
from vqa_search.core.files import open_regular
from vqa_search.core.identity import sha256_file

SOURCES = ("detector", "clip-patches", "clip-crops")
DETECTORS = {
    "frcnn-mobilenet": (detection.fasterrcnn_mobilenet_v3_large_fpn,
                        detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1),
    "frcnn-r50": (detection.fasterrcnn_resnet50_fpn_v2, detection.FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1),
}
BOX_FEATURES = 1024  # both presets' box heads end in a 1024-unit layer
GEOMETRY = ("x1", "y1", "x2", "y2", "w", "h", "area")  # each divided by the image's width, height or area


@dataclass
class RegionConfig:
    source: str = "detector"  # detector | clip-patches | clip-crops
    detector: str | None = None  # frcnn-r50 | frcnn-mobilenet; None: R50 on CUDA, MobileNet on CPU
    detector_weights: Path | None = None  # a state dict file; None: torchvision's cache, downloaded when online
    regions: int | None = None  # K; None: 36 for a detector, one per patch for clip-patches
    score_threshold: float = 0.2
    min_size: int | None = None  # the detector's input shorter side; None: its own 800 (smaller is faster, coarser)
    proposals: int | None = None  # RPN proposals per image after NMS; None: the detector's own 1000
    batch_size: int = 8  # images per decoded batch and progress step
    workers: int = field(default_factory=default_workers)
    rows_per_shard: int = 256  # shards are also flushed every 30 s, so a crash loses at most that much
    progress: bool = True
    boxes: Path | None = None  # a COCO-format boxes file: given boxes instead of detections
    runner: RayRunner | None = None  # where images are decoded and regions computed (core/ray_runner.py); None: here


@dataclass
class GivenBoxes:
    """A boxes file read and checked once: x1, y1, x2, y2 per image, in the file's annotation order."""

    file: str
    sha256: str  # of the file's bytes: part of the extractor identity
    by_path: dict[str, np.ndarray] = field(default_factory=dict)  # file_name -> float32 (n, 4)
    sizes: dict[str, tuple[float, float]] = field(default_factory=dict)  # file_name -> the file's width, height

    def mentions(self, path: str) -> bool:
        return path in self.by_path

    def for_image(self, path: str | None, width: int, height: int) -> np.ndarray:
        """The image's boxes in its decoded pixels (scaled if the file gives another size), clamped to it."""
        boxes = self.by_path.get(path) if path is not None else None
        if boxes is None or not len(boxes):
            return np.zeros((0, 4), dtype=np.float32)
        file_w, file_h = self.sizes.get(path) or (width, height)
        boxes = boxes * np.array([width / file_w, height / file_h] * 2, dtype=np.float32)
        return np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)


def read_boxes(path: Path | str) -> GivenBoxes:
    """A COCO-format boxes file -> GivenBoxes; anything malformed is a one-line UserError naming the file."""
    path = Path(path).expanduser()
    try:
        with open_regular(path) as handle:
            data = handle.read()
    except FileNotFoundError:
        raise UserError(f"boxes file not found: {path}") from None
    except OSError as error:
        raise UserError(f"cannot read the boxes file {path}: {error.strerror or error}") from None
    try:
        coco = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"boxes file {path} is not JSON: {str(error).splitlines()[0]}") from None

    def bad(what: str) -> UserError:
        return UserError(f"boxes file {path}: {what} (expected COCO format: images with id and file_name, "
                         "annotations with image_id and bbox [x, y, w, h])")

    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list) \
            or not isinstance(coco.get("annotations", []), list):
        raise bad("no `images` list")
    names, sizes = {}, {}
    for number, image in enumerate(coco["images"]):
        if not isinstance(image, dict) or isinstance(image.get("id"), bool) \
                or not isinstance(image.get("id"), (int, str)) or not isinstance(image.get("file_name"), str):
            raise bad(f"images[{number}] needs an id and a file_name")
        names[image["id"]] = image["file_name"]
        width, height = image.get("width"), image.get("height")
        if width is not None or height is not None:
            if not (_is_number(width) and _is_number(height) and width > 0 and height > 0):
                raise bad(f"images[{number}] has a width or height that is not a positive number")
            sizes[image["file_name"]] = (float(width), float(height))
    by_path: dict[str, list] = {name: [] for name in names.values()}
    for number, annotation in enumerate(coco.get("annotations", [])):
        if not isinstance(annotation, dict):
            raise bad(f"annotations[{number}] is not an object")
        image_id, bbox = annotation.get("image_id"), annotation.get("bbox")
        if isinstance(image_id, bool) or not isinstance(image_id, (int, str)) or image_id not in names:
            raise bad(f"annotations[{number}] has image_id {image_id!r}, which no image has")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise bad(f"annotations[{number}] has bbox {json.dumps(bbox)[:60]}, not 4 numbers")
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            raise bad(f"annotations[{number}] has bbox {bbox} with a width or height that is not positive")
        by_path[names[image_id]].append((x, y, x + w, y + h))
    return GivenBoxes(str(path.resolve()), hashlib.sha256(data).hexdigest(),
                      {name: np.array(boxes, dtype=np.float32).reshape(-1, 4) for name, boxes in by_path.items()},
                      sizes)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
    given: GivenBoxes | None = None  # boxes from a file, looked up by the image's path

    def extract(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """Regions of RGB images, e.g. a query image that is not in the collection (no given boxes: the fill)."""
        pixels = [self.preprocess(image) for image in images]
        return self.extract_pixels(torch.stack(pixels) if self.stack else pixels, [image.size for image in images])

    def extract_pixels(self, pixels, sizes: list[tuple[int, int]],
                       paths: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed images, their original (width, height) and, for given boxes, their indexed paths."""
        raise NotImplementedError

    def _given_identity(self) -> dict:
        return {"boxes_sha256": self.given.sha256} if self.given is not None else {}

    def _boxes(self, path: str | None, width: int, height: int) -> torch.Tensor:
        """Given boxes first (file order, at most K), then the fill: exactly K."""
        if self.given is None:
            return fill_boxes(width, height, self.num_regions)
        given = torch.from_numpy(self.given.for_image(path, width, height)[: self.num_regions])
        return torch.cat([given, fill_boxes(width, height, self.num_regions - len(given))])


def load_extractor(config: RegionConfig, clip: Clip | None = None, given: GivenBoxes | None = None) -> RegionExtractor:
    """The extractor `config` asks for; `clip` is the index's model, needed by clip-patches and clip-crops.

    `given` overrides `config.boxes` (a query-time extractor has the file's hash but no boxes to give).
    """
    if config.source not in SOURCES:
        raise UserError(f"unknown region source {config.source!r}; choose one of {', '.join(SOURCES)}")
    if config.regions is not None and config.regions < 1:
        raise UserError("--regions must be at least 1")
    if config.proposals is not None and config.proposals < (config.regions or DEFAULT_REGIONS):
        raise UserError(f"--proposals must be at least --regions ({config.regions or DEFAULT_REGIONS}; got "
                        f"{config.proposals})")
    if config.proposals is not None and config.source != "detector":
        raise UserError("--proposals is for --source detector: the other sources run no region proposal network")
    if given is None and config.boxes is not None:
        if config.source == "clip-patches":
            raise UserError("--boxes needs --source detector or clip-crops: clip-patches regions are the ViT's patches")
        given = read_boxes(config.boxes)
    if config.source == "clip-patches":
        return PatchRegions(clip, config.regions)
    if config.source == "clip-crops":
        return CropRegions(clip, config.regions, given)
    return DetectorRegions(config, given=given)


class DetectorRegions(RegionExtractor):
    """Faster R-CNN regions; the network itself is built on first use, so an up-to-date set never loads it."""

    source = "detector"
    stack = False  # the detector resizes each image itself, keeping its aspect ratio
    preprocess = staticmethod(to_tensor)

    def __init__(self, config: RegionConfig, device: torch.device | None = None, given: GivenBoxes | None = None):
        self.device = device or default_device()
        self.detector = config.detector or ("frcnn-r50" if self.device.type == "cuda" else "frcnn-mobilenet")
        if self.detector not in DETECTORS:
            raise UserError(f"unknown detector {self.detector!r}; choose one of {', '.join(DETECTORS)}")
        self.given = given
        self.weights = detector_weights(self.detector, config.detector_weights)
        # A detector trained here (`train detector`) says what it is: the network is rebuilt from its file.
        self.trained = read_detector_spec(self.weights) if is_detector_file(self.weights) else None
        if self.trained is not None:
            if config.detector not in (None, self.trained.preset):
                raise UserError(f"{self.weights} is a trained {self.trained.preset} detector, not {config.detector}: "
                                "leave out --detector")
            self.detector = self.trained.preset
        # given boxes and trained detectors: sets of their own
        self.name = (self.detector + ("-trained" if self.trained is not None else "")
                     + ("-boxes" if given is not None else ""))
        self.num_regions = config.regions or DEFAULT_REGIONS
        self.feature_dim = BOX_FEATURES + len(GEOMETRY)
        self.score_threshold = config.score_threshold
        self.min_size = config.min_size
        self.proposals = config.proposals
        self.identity = {"source": self.source, "detector": self.detector,
                         "weights_sha256": sha256_file(self.weights), "regions": self.num_regions,
                         "score_threshold": self.score_threshold, "min_size": self.min_size,
                         **({"proposals": self.proposals} if self.proposals else {}), **self._given_identity()}

    @cached_property
    def model(self) -> detection.FasterRCNN:
        if self.trained is not None:
            model, _ = load_detector(self.weights)
        else:
            build = DETECTORS[self.detector][0]
            model = build(weights=None, weights_backbone=None)
            _load_detector_weights(model, self.weights, self.detector)
        if self.min_size:
            transform = model.transform
            transform.max_size = round(transform.max_size * self.min_size / transform.min_size[0])
            transform.min_size = (self.min_size,)
        if self.proposals:  # the box head runs once per proposal: most of a CPU detection's time
            model.rpn._pre_nms_top_n["testing"] = 2 * self.proposals
            model.rpn._post_nms_top_n["testing"] = self.proposals
        model.roi_heads.score_thresh = self.score_threshold
        model.roi_heads.detections_per_img = max(model.roi_heads.detections_per_img, self.num_regions)
        return model.to(self.device).eval()

    def extract_pixels(self, pixels: list[torch.Tensor], sizes, paths=None) -> tuple[np.ndarray, np.ndarray]:
        paths = paths or [None] * len(pixels)
        regions = [self._regions(image, path) for image, path in zip(pixels, paths)]
        return (np.stack([features for features, _ in regions]), np.stack([boxes for _, boxes in regions]))

    @torch.inference_mode()
    def _regions(self, image: torch.Tensor, path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One image per forward: batching pads images to a common size, which changes the features
        near the borders, so a query image extracted alone would not match the stored ones.
        With given boxes the detections are not used (an image without boxes gets the fill only)."""
        model = self.model
        height, width = image.shape[-2:]
        images, _ = model.transform([image.to(self.device)])
        resized = images.image_sizes[0]
        with autocast(self.device):
            feature_maps = model.backbone(images.tensors)
            if self.given is not None:
                boxes = self._boxes(path, width, height).to(self.device)
            else:
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
    def extract_pixels(self, pixels: torch.Tensor, sizes, paths=None) -> tuple[np.ndarray, np.ndarray]:
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


class CropRegions(RegionExtractor):
    """Each box cropped from the original pixels and embedded by the index's CLIP image tower.

    Boxes are the given ones filled up with the whole image and the grid, or the fill alone without a
    boxes file: no detector. A crop is the box rounded to whole pixels (as PIL's `crop` rounds), at
    least one pixel wide and high; the feature is its L2-normalised CLIP embedding plus the geometry
    of the (unrounded) box.
    """

    source = "clip-crops"
    stack = False  # crops are cut from each image at its own size

    def __init__(self, clip: Clip | None, regions: int | None = None, given: GivenBoxes | None = None):
        if clip is None:
            raise UserError("--source clip-crops needs the index's CLIP model")
        self.clip = clip
        self.given = given
        self.name = self.source + ("-boxes" if given is not None else "")
        self.num_regions = regions or DEFAULT_REGIONS
        self.preprocess = rgb_array
        self.embed_dim = getattr(clip.model.visual, "output_dim", None) or _probe_dim(clip)
        self.feature_dim = self.embed_dim + len(GEOMETRY)
        self.identity = {"source": self.source, "model": clip.identity.to_json(), "regions": self.num_regions,
                         **self._given_identity()}

    @torch.inference_mode()
    def extract_pixels(self, pixels: list[torch.Tensor], sizes, paths=None) -> tuple[np.ndarray, np.ndarray]:
        paths = paths or [None] * len(pixels)
        all_features, all_boxes = [], []
        for array, (width, height), path in zip(pixels, sizes, paths):
            image = Image.fromarray(array.numpy())
            boxes = self._boxes(path, width, height)
            crops = torch.stack([self.clip.preprocess(image.crop(crop_box(box, width, height))) for box in boxes])
            embeddings = torch.from_numpy(encode_image_batch(self.clip, crops))
            all_features.append(torch.cat([embeddings, geometry(boxes, width, height)], dim=1))
            all_boxes.append(boxes)
        return torch.stack(all_features).numpy(), torch.stack(all_boxes).numpy()


@torch.inference_mode()
def _probe_dim(clip: Clip) -> int:
    """The image embedding width of a tower that does not say it."""
    return int(encode_image_batch(clip, clip.preprocess(Image.new("RGB", (8, 8)))[None]).shape[1])


def rgb_array(image: Image.Image) -> torch.Tensor:
    """The decoded pixels unchanged, uint8 (H, W, 3): crops are cut from them exactly as from the image."""
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8))


def crop_box(box: torch.Tensor, width: int, height: int) -> tuple[int, int, int, int]:
    """A pixel box rounded to whole pixels inside the image, at least 1 x 1."""
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    x1, y1 = min(max(x1, 0), width - 1), min(max(y1, 0), height - 1)
    return x1, y1, min(max(x2, x1 + 1), width), min(max(y2, y1 + 1), height)


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
