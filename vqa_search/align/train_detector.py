"""`train detector`: a torchvision Faster R-CNN trained on COCO-format boxes, for `regions --detector-weights`.

The boxes file (the shapes world's boxes.json, a COCO `instances_*.json`, any COCO-format file) gives
the images, their boxes and categories, and optionally an `attributes` object per annotation (the
shapes world's colour and size). The dataset's splits choose the images: train for the steps, val for
the COCO metric after every epoch (pycocotools' COCOeval on bbox: AP and AP@0.5); without splits one
image in ten (by file name) is held out. Images are decoded once (DataLoader workers) and kept in
memory as uint8. The input size and anchor sizes default to the data: the shorter side of its median
image (at least 160 px, at most 512, so a 96-px world is upscaled for the stride-16 features and
COCO's photos are not blown up to 800 px on a CPU) and five anchors spread over its box sizes.

Training is `core/training.fit`: AdamW, warm-up + cosine, the best val AP written at once as a
detector file (`align/detector.py`), patience, DET.history.json and DET.curve.png beside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vqa_search.align.detector import PRESETS, DetectorSpec, build_detector, save_detector
from vqa_search.align.regions import detector_weights, read_boxes, rgb_array
from vqa_search.core.errors import UserError
from vqa_search.core.files import open_regular
from vqa_search.core.image_stream import ImageReader, ImageRef
from vqa_search.core.models import default_device, read_state_dict
from vqa_search.core.threads import default_workers
from vqa_search.core.training import (Curve, Fitted, check_config, config_json, fit, seed_everything,
                                      weight_decay_groups)
from vqa_search.indexer.datasets import read_dataset

log = logging.getLogger("vqa_search")
CURVE = Curve("val COCO bbox AP (%)", lambda record: {"AP": 100 * record["AP"], "AP50": 100 * record["AP50"]})


@dataclass
class DetectorTrainConfig:
    preset: str = "frcnn-mobilenet"
    pretrained: str = "none"  # none | coco (torchvision's COCO weights, all but the class and box outputs)
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: float = 0.05
    patience: int = 3
    min_size: int | None = None  # None: from the data
    attributes: bool = True  # an attribute head when the file has attributes
    seed: int = 42
    workers: int = field(default_factory=default_workers)
    train_split: str = "train"
    val_split: str = "val"


@dataclass
class DetectorTrainResult:
    fitted: Fitted
    out: Path
    spec: DetectorSpec
    train_images: int
    val_images: int
    step_losses: list[float]
    seconds: float

    def to_json(self) -> dict:
        best = self.fitted.best
        return {"out": str(self.out), "best_epoch": self.fitted.best_epoch, "AP": best["AP"], "AP50": best["AP50"],
                "epochs": len(self.fitted.history), "train_images": self.train_images,
                "val_images": self.val_images, "seconds_per_epoch": [r["seconds"] for r in self.fitted.history],
                "config": config_json(self.spec), "history": str(self.fitted.history_path),
                "curve": str(self.fitted.curve), "seconds": round(self.seconds, 2)}

    def summary(self) -> str:
        best = self.fitted.best
        per_epoch = np.mean([record["seconds"] for record in self.fitted.history])
        return (f"kept epoch {self.fitted.best_epoch} of {len(self.fitted.history)} (val AP {100 * best['AP']:.1f}, "
                f"AP50 {100 * best['AP50']:.1f}) in {self.out}; {self.train_images} train / {self.val_images} val "
                f"images, {per_epoch:.1f} s per epoch; curve {self.fitted.curve}, history "
                f"{self.fitted.history_path}; {self.seconds:.0f} s")


@dataclass
class _Image:
    image_id: int | str
    path: str  # the file's file_name
    width: float  # as the boxes file gives it
    height: float
    boxes: np.ndarray  # (n, 4) x1 y1 x2 y2 in the file's pixels
    labels: np.ndarray  # (n,) 1..classes
    attributes: np.ndarray  # (n, A) value index or -1


@dataclass
class _Boxes:
    images: list[_Image]
    classes: list[str]
    attributes: dict[str, list[str]]
    coco: dict  # the file, for COCOeval's ground truth


def read_training_boxes(path: Path) -> _Boxes:
    """The boxes file, checked by `regions.read_boxes`, plus what training needs: categories and attributes."""
    path = Path(path).expanduser()
    read_boxes(path)  # images and bboxes, one-line errors
    with open_regular(path) as handle:
        coco = json.loads(handle.read())
    categories = coco.get("categories")
    if not isinstance(categories, list) or not categories or not all(
            isinstance(c, dict) and isinstance(c.get("id"), int) and not isinstance(c.get("id"), bool)
            and isinstance(c.get("name"), str) for c in categories):
        raise UserError(f"boxes file {path}: training needs a `categories` list of objects with id and name")
    labels = {category["id"]: number + 1 for number, category in enumerate(categories)}
    attributes: dict[str, list[str]] = {}
    for annotation in coco.get("annotations", []):
        if annotation.get("category_id") not in labels:
            raise UserError(f"boxes file {path}: annotation {annotation.get('id')!r} has category_id "
                            f"{annotation.get('category_id')!r}, which no category has")
        given = annotation.get("attributes") or {}
        if not isinstance(given, dict):
            raise UserError(f"boxes file {path}: annotation {annotation.get('id')!r} has `attributes` that is "
                            "not an object")
        for name, value in given.items():
            if isinstance(value, (str, int)) and not isinstance(value, bool):
                values = attributes.setdefault(str(name), [])
                if str(value) not in values:
                    values.append(str(value))
    attributes = {name: sorted(values) for name, values in sorted(attributes.items())}
    by_id = {}
    for image in coco["images"]:
        by_id[image["id"]] = _Image(image["id"], image["file_name"], float(image.get("width") or 0),
                                    float(image.get("height") or 0), [], [], [])
    for annotation in coco.get("annotations", []):
        if annotation.get("iscrowd"):
            continue
        image = by_id[annotation["image_id"]]
        x, y, w, h = (float(v) for v in annotation["bbox"])
        image.boxes.append((x, y, x + w, y + h))
        image.labels.append(labels[annotation["category_id"]])
        given = annotation.get("attributes") or {}
        image.attributes.append([values.index(str(given[name])) if str(given.get(name)) in values else -1
                                 for name, values in attributes.items()])
    for image in by_id.values():
        image.boxes = np.array(image.boxes, dtype=np.float32).reshape(-1, 4)
        image.labels = np.array(image.labels, dtype=np.int64)
        image.attributes = np.array(image.attributes, dtype=np.int64).reshape(len(image.labels), len(attributes))
    return _Boxes(list(by_id.values()), [c["name"] for c in categories], attributes, coco)


def coco_map(ground_truth: dict, results: list[dict], image_ids: list | None = None) -> dict[str, float]:
    """COCO bbox AP (IoU .50:.95) and AP@0.5 of `results` ({image_id, category_id, bbox [x, y, w, h], score})
    against a COCO-format `ground_truth`, by pycocotools' COCOeval; over `image_ids` (default all)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {"AP": 0.0, "AP50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = {"images": ground_truth["images"], "annotations": [
            {**a, "id": a.get("id", n + 1), "area": a.get("area", a["bbox"][2] * a["bbox"][3]),
             "iscrowd": a.get("iscrowd", 0)} for n, a in enumerate(ground_truth.get("annotations", []))],
            "categories": ground_truth["categories"]}
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(results), "bbox")
        if image_ids is not None:
            evaluation.params.imgIds = list(image_ids)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    ap, ap50 = (float(value) for value in evaluation.stats[:2])
    return {"AP": max(ap, 0.0), "AP50": max(ap50, 0.0)}  # -1: no ground truth at all


def default_sizes(images: list[_Image], min_size: int | None) -> tuple[int, int, str]:
    """min_size, max_size and anchor sizes suited to the data (see the module docstring)."""
    shorter = np.median([min(i.width, i.height) for i in images if i.width and i.height] or [800])
    longer = np.median([max(i.width, i.height) for i in images if i.width and i.height] or [1333])
    if min_size is None:
        min_size = int(min(max(shorter, 160), 512) // 32 * 32)
    max_size = max(min_size, int(math.ceil(min_size * max(longer / shorter, 1.0) / 32) * 32))
    scale = min_size / shorter
    sides = np.concatenate([np.sqrt((i.boxes[:, 2] - i.boxes[:, 0]) * (i.boxes[:, 3] - i.boxes[:, 1]))
                            for i in images] or [np.zeros(0)]) * scale
    if len(sides):
        low, high = np.percentile(sides, 5), np.percentile(sides, 95)
        low, high = max(low, 8.0), max(high, low * 2)
        anchors = np.geomspace(low * 0.8, high * 1.25, 5)
    else:
        anchors = np.array([32, 64, 128, 256, 512])
    return min_size, max_size, ",".join(str(max(1, int(round(a)))) for a in anchors)


def sampled_rois(images: list[_Image]) -> int:
    """RoIs sampled per image for the box head: 8 per object of the busiest image, 32 to 512 (torchvision's)."""
    most = max((len(image.labels) for image in images), default=0)
    return int(min(max(8 * most, 32), 512))


def train_detector(dataset: Path | str, boxes: Path | str, out: Path | str,
                   config: DetectorTrainConfig = DetectorTrainConfig(), progress: bool = True) -> DetectorTrainResult:
    started = time.perf_counter()
    out = Path(out)
    check_config(config)
    if config.preset not in PRESETS:
        raise UserError(f"unknown detector {config.preset!r}; choose one of {', '.join(PRESETS)}")
    if config.pretrained not in ("none", "coco"):
        raise UserError(f"--pretrained takes none or coco (got {config.pretrained!r})")
    if config.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {config.batch_size})")
    if config.min_size is not None and not 16 <= config.min_size <= 4096:
        raise UserError(f"--min-size must be in 16..4096 (got {config.min_size})")
    if out.suffix != ".safetensors":
        raise UserError(f"--out must end in .safetensors (got {out})")
    data = read_training_boxes(Path(boxes))
    coco_state = None
    if config.pretrained == "coco":  # before any image is read: offline without the cache is one line
        coco_state = read_state_dict(detector_weights(config.preset, None), f"detector {config.preset}")
    ds = read_dataset(dataset)
    train, val = _split(data.images, ds.splits, config)
    if not train or not val:
        raise UserError(f"no {'train' if not train else 'val'} image of {dataset} has boxes in {boxes}")
    min_size, max_size, anchors = default_sizes(train, config.min_size)
    spec = DetectorSpec(config.preset, min_size, max_size, anchors, json.dumps(data.classes),
                        data.attributes if config.attributes else {})
    log.info("%d train / %d val images, %d classes, attributes %s; input %d..%d px, anchors %s",
             len(train), len(val), len(data.classes), ", ".join(spec.attributes) or "none", min_size, max_size, anchors)
    generator = seed_everything(config.seed)
    device = default_device()
    model = build_detector(spec)
    # Fewer proposals and sampled RoIs than the 800-px defaults when images hold a handful of objects:
    # on a CPU the RoIAlign backward of the sampled boxes was 40 % of a step.
    model.rpn._pre_nms_top_n["training"], model.rpn._post_nms_top_n["training"] = 600, 300
    model.rpn.fg_bg_sampler.batch_size_per_image = 128
    model.roi_heads.fg_bg_sampler.batch_size_per_image = sampled_rois(train)
    if coco_state is not None:
        own = model.state_dict()
        fitting = {k: v for k, v in coco_state.items() if k in own and own[k].shape == v.shape
                   and not k.startswith("roi_heads.box_predictor")}
        model.load_state_dict(fitting, strict=False)
        log.info("COCO weights: %d of %d tensors", len(fitting), len(own))
    model.to(device)
    pixels = _decode(dataset, ds.images_dir, train + val, config.workers, progress)
    train = [image for image in train if image.path in pixels]
    val = [image for image in val if image.path in pixels]
    if not train or not val:
        raise UserError(f"no readable {'train' if not train else 'val'} image in {ds.images_dir}")
    steps = math.ceil(len(train) / config.batch_size)
    step_losses: list[float] = []

    def batches(epoch: int):
        order = torch.randperm(len(train), generator=generator).tolist()
        for start in range(0, len(order), config.batch_size):
            yield [train[i] for i in order[start: start + config.batch_size]]

    def loss(batch: list[_Image]) -> torch.Tensor:
        images, targets = [], []
        for image in batch:
            tensor, scale = pixels[image.path]
            images.append(tensor.to(device).permute(2, 0, 1).float().div_(255))
            target = {"boxes": torch.from_numpy(image.boxes * scale).to(device),
                      "labels": torch.from_numpy(image.labels).to(device)}
            if spec.attributes:
                target["attributes"] = torch.from_numpy(image.attributes).to(device)
            targets.append(target)
        value = sum(model(images, targets).values())
        step_losses.append(float(value.detach()))
        return value

    val_truth = {"images": [{"id": i.image_id, "width": i.width, "height": i.height} for i in val],
                 "annotations": [a for a in data.coco.get("annotations", [])
                                 if a["image_id"] in {i.image_id for i in val}],
                 "categories": data.coco["categories"]}
    category_ids = [category["id"] for category in data.coco["categories"]]

    @torch.inference_mode()
    def evaluate() -> tuple[float, dict]:
        results = []
        for start in range(0, len(val), config.batch_size):
            chunk = val[start: start + config.batch_size]
            outputs = model([pixels[i.path][0].to(device).permute(2, 0, 1).float().div_(255) for i in chunk])
            for image, output in zip(chunk, outputs):
                boxes = output["boxes"].cpu().numpy() / pixels[image.path][1]
                for box, label, score in zip(boxes, output["labels"].tolist(), output["scores"].tolist()):
                    x1, y1, x2, y2 = (float(v) for v in box)
                    results.append({"image_id": image.image_id, "category_id": category_ids[label - 1],
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
        metrics = coco_map(val_truth, results, [i.image_id for i in val])
        return metrics["AP"], metrics

    fitted = fit(model, weight_decay_groups(model, config.weight_decay), batches, loss, evaluate=evaluate,
                 save_best=lambda record: save_detector(out, model, spec, record), out=out, config=config,
                 steps=steps, device=device, curve=CURVE, progress=progress)
    return DetectorTrainResult(fitted, out, spec, len(train), len(val), step_losses, time.perf_counter() - started)


def _split(images: list[_Image], splits: dict[str, list[str]], config: DetectorTrainConfig):
    if splits.get(config.train_split) and splits.get(config.val_split):
        train_names, val_names = set(splits[config.train_split]), set(splits[config.val_split])
        return ([i for i in images if i.path in train_names], [i for i in images if i.path in val_names])
    held_out = [hashlib.sha256(i.path.encode()).digest()[0] % 10 == 0 for i in images]
    return ([i for i, out in zip(images, held_out) if not out], [i for i, out in zip(images, held_out) if out])


def _decode(dataset, images_dir: Path, images: list[_Image], workers: int, progress: bool):
    """file_name -> (uint8 HWC tensor, scale from the file's pixels to the decoded ones)."""
    from tqdm import tqdm

    refs = [ImageRef(images_dir / image.path, image) for image in images]
    pixels, skipped = {}, 0
    reader = ImageReader(refs, rgb_array, batch_size=16, workers=min(workers, 4), stack=False)
    with tqdm(total=len(refs), unit="image", desc="decoding", disable=not progress, leave=False) as bar:
        for batch in reader:
            readable = iter(batch.pixels or [])
            for item in batch.items:
                if item.reason is not None:
                    skipped += 1
                    continue
                image: _Image = item.key
                tensor = next(readable)
                scale = np.array([item.width / (image.width or item.width),
                                  item.height / (image.height or item.height)] * 2, dtype=np.float32)
                pixels[image.path] = (tensor, scale)
            bar.update(len(batch.items))
    if skipped:
        log.warning("%d images could not be read and are left out", skipped)
    return pixels
