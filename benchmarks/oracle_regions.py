"""Benchmark-only oracle regions: each object's true shape, colour, size and position as its feature.

Stage 2 and the VQA regions head are only as good as the regions they read. Feeding them the ground
truth of the shapes world measures their ceiling: if the re-ranker misses its target with these, the
re-ranker (or its training) is short; if it reaches it here but not with detector regions, the
regions are. This never ships as a product feature: no real collection has its true objects.

A region is one object of the world's boxes.json:
    [one-hot category | one-hot value of each attribute (colour, size) | geometry of its box (7)]
Images with fewer than K objects (K = the most objects any image has) are filled with the product's
fill boxes (the whole image, then a grid) whose one-hot part is zero: "no object here".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vqa_search.align.region_store import RegionReport, compute_regions
from vqa_search.align.regions import GEOMETRY, RegionConfig, RegionExtractor, fill_boxes, geometry
from vqa_search.align.train_detector import read_training_boxes
from vqa_search.core.identity import sha256_file


def no_pixels(image) -> torch.Tensor:
    """The oracle never looks at the image: only its size (the runner passes it) and its path."""
    return torch.zeros(0)


class OracleRegions(RegionExtractor):
    name = source = "oracle"
    stack = False
    preprocess = staticmethod(no_pixels)

    def __init__(self, boxes_file: Path):
        data = read_training_boxes(boxes_file)
        self.values = [len(data.classes)] + [len(values) for values in data.attributes.values()]
        self.objects = {image.path: image for image in data.images}
        self.num_regions = max(len(image.labels) for image in data.images)
        self.feature_dim = sum(self.values) + len(GEOMETRY)
        self.identity = {"source": self.source, "boxes_sha256": sha256_file(boxes_file), "regions": self.num_regions}

    def extract_pixels(self, pixels, sizes, paths=None) -> tuple[np.ndarray, np.ndarray]:
        regions = [self._regions(path, width, height) for path, (width, height) in zip(paths, sizes)]
        return np.stack([features for features, _ in regions]), np.stack([boxes for _, boxes in regions])

    def _regions(self, path: str, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        image = self.objects.get(path)
        count = 0 if image is None else len(image.labels)
        one_hot = np.zeros((self.num_regions, sum(self.values)), dtype=np.float32)
        boxes = fill_boxes(width, height, self.num_regions - count)
        if count:
            scale = np.array([width / (image.width or width), height / (image.height or height)] * 2, np.float32)
            boxes = torch.cat([torch.from_numpy(image.boxes * scale), boxes])
            codes = np.concatenate([image.labels[:, None] - 1, image.attributes], axis=1)  # (objects, 1 + A)
            offsets = np.cumsum([0] + self.values[:-1])
            for row, code in enumerate(codes):
                known = code >= 0
                one_hot[row, (offsets + code)[known]] = 1.0
        features = np.concatenate([one_hot, geometry(boxes, width, height).numpy()], axis=1)
        return features, boxes.numpy()


def oracle_regions(world: Path, boxes_file: Path) -> RegionReport:
    """The oracle region set of the world's index, named "oracle" like any region set."""
    return compute_regions(world, RegionConfig(progress=False), OracleRegions(boxes_file))
