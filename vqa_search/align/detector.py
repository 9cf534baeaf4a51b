"""A detector trained here (`vqa-search train detector`): its architecture, its optional attribute head,
and its file.

The file is a safetensors state dict tagged `vqa-search-detector/1` whose metadata "config" is a
`DetectorSpec`: the torchvision preset, the input size (min_size/max_size), the anchor sizes, the
classes and the attributes. Everything needed to rebuild the same network is in it, so `regions
--detector-weights FILE` builds the network from the file and refuses, in one line, a file whose tag,
config or tensor header does not fit.

The attribute head follows Bottom-Up Top-Down (Anderson et al. 2018): next to the class head, a small
MLP on the box-head features predicts each attribute (colour, size...) of the positive proposals,
trained with a cross-entropy per attribute against the ground-truth box each proposal is matched to,
so the box features carry attributes as well as categories.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import detection
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss

from vqa_search.core.artifacts import (ArtifactKind, Rule, between, expected_state, one_of, open_artifact,
                                       save_artifact)
from vqa_search.core.errors import UserError

FORMAT = "vqa-search-detector/1"
DETECTOR_FILE = ArtifactKind(FORMAT, "detector file", "a vqa-search detector",
                             "train one with `vqa-search train detector`")
PRESETS = {
    "frcnn-mobilenet": detection.fasterrcnn_mobilenet_v3_large_fpn,
    "frcnn-r50": detection.fasterrcnn_resnet50_fpn_v2,
}
ANCHOR_COUNT = 5  # both presets' RPN heads are built for five anchor sizes (x 3 aspect ratios)
MAX_CLASSES = 10000
MAX_VALUES = 1000  # values of one attribute


def _anchor_sizes_ok(text: str) -> bool:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        return False
    return len(sizes) == ANCHOR_COUNT and all(1 <= size <= 4096 for size in sizes)


def _names_ok(names) -> bool:
    return (isinstance(names, list) and 1 <= len(names) <= MAX_CLASSES
            and all(isinstance(name, str) and len(name) <= 200 for name in names))


def _attributes_ok(attributes) -> bool:
    return len(attributes) <= 64 and all(
        isinstance(name, str) and len(name) <= 200 and isinstance(values, list) and 1 <= len(values) <= MAX_VALUES
        and all(isinstance(value, str) and len(value) <= 200 for value in values)
        for name, values in attributes.items())


CONFIG_RULES = {
    "preset": one_of(PRESETS),
    "min_size": between(16, 4096),
    "max_size": between(16, 8192),
    "anchor_sizes": Rule(_anchor_sizes_ok, f"of {ANCHOR_COUNT} comma-separated sizes in 1..4096"),
    "classes": Rule(lambda value: _names_ok(json.loads(value)) if _is_json(value) else False,
                    "holding a JSON list of class names"),
    "attributes": Rule(_attributes_ok, "mapping attribute names to lists of values"),
}


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


@dataclass
class DetectorSpec:
    """What rebuilds a trained detector; saved as the file's "config"."""

    preset: str = "frcnn-mobilenet"
    min_size: int = 160  # the shorter side images are resized to
    max_size: int = 267  # the longer side's bound
    anchor_sizes: str = "32,64,128,256,512"  # five sizes in resized pixels
    classes: str = "[]"  # JSON list of the category names, in label order (label 0 is the background)
    attributes: dict = field(default_factory=dict)  # attribute name -> its values; {}: no attribute head

    @property
    def class_names(self) -> list[str]:
        return json.loads(self.classes)

    @property
    def num_classes(self) -> int:
        return len(self.class_names) + 1  # + background

    @property
    def anchors(self) -> tuple[int, ...]:
        return tuple(int(part) for part in self.anchor_sizes.split(","))


class AttributeHead(nn.Module):
    """Box-head features -> one logit vector per attribute."""

    def __init__(self, in_features: int, attributes: dict[str, list[str]], hidden: int = 256):
        super().__init__()
        self.names = list(attributes)
        self.hidden = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU())
        self.outputs = nn.ModuleList([nn.Linear(hidden, len(values)) for values in attributes.values()])

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:
        hidden = self.hidden(features)
        return [output(hidden) for output in self.outputs]


class AttributeRoIHeads(RoIHeads):
    """torchvision's RoIHeads plus `attribute_head`; training adds `loss_attributes`.

    Targets carry "attributes": long (n_boxes, n_attributes), -1 where a box has no value.
    At inference it is torchvision's RoIHeads unchanged.
    """

    attribute_head: AttributeHead

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        count = len(self.attribute_head.names)
        wanted = []
        for target, matched in zip(targets, matched_idxs):
            values = target["attributes"]
            wanted.append(values[matched] if len(values) else values.new_full((len(matched), count), -1))
        wanted = torch.cat(wanted)
        positive = torch.cat(labels) > 0
        logits = self.attribute_head(box_features[positive])
        loss = box_features.sum() * 0  # keeps the graph when no proposal is positive
        for number, attribute_logits in enumerate(logits):
            target = wanted[positive, number]
            if (target >= 0).any():
                loss = loss + F.cross_entropy(attribute_logits, target, ignore_index=-1) / count
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, "loss_attributes": loss}


def build_detector(spec: DetectorSpec) -> detection.FasterRCNN:
    """The network `spec` describes, with random weights."""
    model = PRESETS[spec.preset](weights=None, weights_backbone=None, num_classes=spec.num_classes,
                                 min_size=spec.min_size, max_size=spec.max_size)
    levels = len(model.rpn.anchor_generator.sizes)
    sizes = spec.anchors
    # MobileNet's preset puts all five sizes on each of its levels, R50's one size per FPN level.
    per_level = (sizes,) * levels if levels != ANCHOR_COUNT else tuple((size,) for size in sizes)
    model.rpn.anchor_generator = AnchorGenerator(per_level, ((0.5, 1.0, 2.0),) * levels)
    if spec.attributes:
        # RoIHeads takes a dozen constructor arguments the preset already chose: keep them, add the head.
        model.roi_heads.__class__ = AttributeRoIHeads
        model.roi_heads.attribute_head = AttributeHead(model.roi_heads.box_predictor.cls_score.in_features,
                                                       spec.attributes)
    return model


def save_detector(path: Path, model: nn.Module, spec: DetectorSpec, record: dict | None = None) -> Path:
    metadata = {"config": json.dumps(asdict(spec))}
    if record is not None:
        metadata["epoch"] = json.dumps(record)
    return save_artifact(path, FORMAT, model.state_dict(), metadata)


def is_detector_file(path: Path) -> bool:
    """Whether `path` is tagged as this project's detector (a plain state dict is not)."""
    from safetensors import SafetensorError, safe_open

    if Path(path).suffix != ".safetensors":
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format") == FORMAT
    except (OSError, SafetensorError):
        return False


def read_detector_spec(path: Path) -> DetectorSpec:
    with open_artifact(path, DETECTOR_FILE) as artifact:
        return _checked_spec(artifact)


def _checked_spec(artifact) -> DetectorSpec:
    spec = artifact.config(DetectorSpec, "config", CONFIG_RULES)
    if spec.max_size < spec.min_size:
        raise artifact.error(f'config field "max_size" ({spec.max_size}) is below "min_size" ({spec.min_size})')
    return spec


def load_detector(path: Path) -> tuple[detection.FasterRCNN, DetectorSpec]:
    """The detector at `path`, its config and tensor header checked before anything is built."""
    with open_artifact(path, DETECTOR_FILE) as artifact:
        spec = _checked_spec(artifact)
        artifact.check_tensors(expected_state(lambda: build_detector(spec)))
        tensors = artifact.load(artifact.header)
    model = build_detector(spec)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as error:  # pragma: no cover - the header check above catches what this would
        raise UserError(f"detector file {path}: {str(error).splitlines()[-1].strip()}") from None
    return model, spec
