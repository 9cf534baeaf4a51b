"""What the shapes benchmarks share: their command line, step timing, the world with its stage-1 CLIP, and the
regions of a detector trained on the world's boxes."""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from vqa_search.align.finetune import FinetuneConfig, FinetuneResult, finetune
from vqa_search.align.region_store import RegionReport, compute_regions
from vqa_search.align.regions import RegionConfig
from vqa_search.align.train_detector import DetectorTrainConfig, DetectorTrainResult, train_detector
from vqa_search.core.identity import TINY_MODEL
from vqa_search.shapes import SPLIT_FILES, ShapesConfig, make_shapes

STAGE1 = dict(epochs=60, batch_size=128, lr=1e-3, weight_decay=0.1, patience=8)  # from scratch: a large lr
DETECTOR = dict(epochs=4, batch_size=8, lr=1e-3, patience=4)
DETECTOR_IMAGES = {"train": 1000, "val": 100}  # of the 3,200 / 400: an epoch costs about 2.5 minutes on 2 cores
PROPOSALS = 100  # RPN proposals per image for the regions: a tenth of the default, for 36 regions


class Laps:
    """Seconds spent in each named step, and in all of them."""

    def __init__(self) -> None:
        self.started = self._since = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[step] = round(now - self._since, 1)
        self._since = now

    def total(self) -> float:
        return round(time.perf_counter() - self.started, 1)


def world_with_stage1(work: Path, images: int, seed: int, laps: Laps) -> tuple[Path, Path, FinetuneResult]:
    """Generate the shapes world in WORK and train the tiny CLIP on it from scratch."""
    world, checkpoint = work / "shapes", work / "stage1.safetensors"
    make_shapes(world, ShapesConfig(images=images, seed=seed))
    laps("generate")
    stage1 = finetune(world, checkpoint, FinetuneConfig(model=TINY_MODEL, pretrained="none", seed=seed, **STAGE1),
                      progress=False)
    laps("stage1")
    return world, checkpoint, stage1


def trained_detector_regions(world: Path, work: Path, seed: int, laps: Laps) -> tuple[DetectorTrainResult, RegionReport]:
    """Stage 0 from scratch: a Faster R-CNN trained on part of the world's boxes, then its regions of every image."""
    detector = train_detector(world, detector_boxes(world, work / "detector-boxes.json"), work / "detector.safetensors",
                              DetectorTrainConfig(seed=seed, **DETECTOR), progress=False)
    laps("detector")
    regions = compute_regions(world, RegionConfig(detector_weights=detector.out, proposals=PROPOSALS, progress=False))
    laps("detector_regions")
    return detector, regions


def detector_boxes(world: Path, out: Path) -> Path:
    """The world's boxes.json cut to its first DETECTOR_IMAGES train and val images: the time budget's share."""
    coco = json.loads((world / "boxes.json").read_text())
    keep = set()
    for split, count in DETECTOR_IMAGES.items():
        keep |= set((world / SPLIT_FILES[split]).read_text().split()[:count])
    coco["images"] = [image for image in coco["images"] if image["file_name"] in keep]
    ids = {image["id"] for image in coco["images"]}
    coco["annotations"] = [annotation for annotation in coco["annotations"] if annotation["image_id"] in ids]
    out.write_text(json.dumps(coco))
    return out


def main(description: str, run: Callable[[Path, int, int], dict]) -> None:
    """Parse the shared options, run the benchmark in WORK (or a temp dir), print and save its results."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="Write the results here.")
    parser.add_argument("--work", type=Path, help="Keep the world, checkpoints and heads here (default: a temp dir).")
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(format="%(message)s")
    logging.getLogger("vqa_search").setLevel(logging.INFO)  # one line per epoch, not open_clip's chatter
    with tempfile.TemporaryDirectory() as scratch:
        results = run(args.work or Path(scratch), args.images, args.seed)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
