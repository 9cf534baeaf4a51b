"""`train detector`: COCOeval against hand-computed cases, training steps that lower the loss and write a
detector file that `regions --detector-weights` rebuilds, and files that are refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import save_file
from typer.testing import CliRunner

from vqa_search import Index
from vqa_search.align import regions as regions_module
from vqa_search.align.detector import DetectorSpec, build_detector, load_detector, save_detector
from vqa_search.align.train_detector import DetectorTrainConfig, coco_map, train_detector
from vqa_search.cli import app
from vqa_search.core.errors import UserError
from vqa_search.shapes import ShapesConfig, make_shapes

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()

GROUND_TRUTH = {
    "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
                    {"id": 2, "image_id": 2, "category_id": 1, "bbox": [50, 50, 20, 20], "area": 400, "iscrowd": 0}],
    "categories": [{"id": 1, "name": "thing"}],
}


def _result(image_id, bbox, score):
    return {"image_id": image_id, "category_id": 1, "bbox": bbox, "score": score}


def test_coco_map_matches_hand_computed_cases():
    perfect = [_result(1, [10, 10, 20, 20], 0.9), _result(2, [50, 50, 20, 20], 0.8)]
    assert coco_map(GROUND_TRUTH, perfect) == pytest.approx({"AP": 1.0, "AP50": 1.0})
    # A false positive ranked after every true one lowers no precision at any reached recall.
    assert coco_map(GROUND_TRUTH, perfect + [_result(1, [60, 60, 10, 10], 0.1)]) == pytest.approx(
        {"AP": 1.0, "AP50": 1.0})
    # Image 2's box at IoU 250/400 = 0.625: a hit at IoU .50, .55, .60 (AP 1 there); at the seven higher
    # thresholds the ranking is hit, miss: precision 1 up to recall 0.5, i.e. 51 of COCO's 101 recall points.
    shifted = [_result(1, [10, 10, 20, 20], 0.9), _result(2, [50, 50, 20, 12.5], 0.8)]
    assert coco_map(GROUND_TRUTH, shifted) == pytest.approx({"AP": (3 + 7 * 51 / 101) / 10, "AP50": 1.0})
    # Ranked miss first: at AP50 both hit; above .60 the only hit comes second: precision 1/2 up to recall 1/2.
    flipped = [_result(1, [10, 10, 20, 20], 0.7), _result(2, [50, 50, 20, 12.5], 0.8)]
    assert coco_map(GROUND_TRUTH, flipped) == pytest.approx({"AP": (3 + 7 * 0.5 * 51 / 101) / 10, "AP50": 1.0})
    assert coco_map(GROUND_TRUTH, []) == {"AP": 0.0, "AP50": 0.0}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "world"
    make_shapes(root, ShapesConfig(images=24, seed=3))
    return root


def test_training_lowers_the_loss_and_regions_load_the_file(shapes, tmp_path):
    out = tmp_path / "det.safetensors"
    config = DetectorTrainConfig(epochs=2, batch_size=4, lr=2e-3, min_size=96, workers=0, patience=5)
    result = train_detector(shapes, shapes / "boxes.json", out, config, progress=False)
    losses = result.step_losses
    assert len(losses) == 2 * len(range(0, result.train_images, 4))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert out.is_file() and result.fitted.history_path.is_file() and result.fitted.curve.is_file()
    history = json.loads(result.fitted.history_path.read_text())
    assert {"AP", "AP50", "loss", "seconds"} <= history["history"][0].keys()
    model, spec = load_detector(out)
    assert spec.min_size == 96 and set(spec.attributes) == {"color", "size"} and spec.num_classes == 6
    assert hasattr(model.roi_heads, "attribute_head")

    Index.build(shapes, **tiny_config())
    cli = runner.invoke(app, ["regions", str(shapes), "--detector-weights", str(out), "--regions", "6",
                              "--workers", "0", "--json"])
    assert cli.exit_code == 0, cli.output
    report = json.loads(cli.stdout)
    assert report["name"] == "frcnn-mobilenet-trained" and report["computed"] == 24
    wrong = runner.invoke(app, ["regions", str(shapes), "--detector-weights", str(out), "--detector", "frcnn-r50"])
    assert wrong.exit_code == 2 and "leave out --detector" in wrong.stderr


def test_cli_trains_without_attributes_and_refuses_in_one_line(shapes, tmp_path, monkeypatch):
    out = tmp_path / "plain.safetensors"
    result = runner.invoke(app, ["train", "detector", str(shapes), "--boxes", str(shapes / "boxes.json"), "--out",
                                 str(out), "--epochs", "1", "--batch-size", "8", "--min-size", "64",
                                 "--no-attributes", "--workers", "0", "-q", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["config"]["attributes"] == {} and 0 <= report["AP"] <= 1 and report["seconds_per_epoch"]
    assert not hasattr(load_detector(out)[0].roi_heads, "attribute_head")
    monkeypatch.setattr(regions_module, "host_reachable", lambda host: False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    for args, fragment in [(["--pretrained", "coco"], "no COCO weights"),
                           (["--pretrained", "imagenet"], "--pretrained takes none or coco"),
                           (["--detector", "yolo"], "unknown detector"),
                           (["--epochs", "0"], "--epochs must be at least 1")]:
        failed = runner.invoke(app, ["train", "detector", str(shapes), "--boxes", str(shapes / "boxes.json"),
                                     "--out", str(tmp_path / "x.safetensors"), *args])
        assert failed.exit_code == 2 and failed.stderr.count("\n") == 1 and fragment in failed.stderr, failed.stderr
    help_text = runner.invoke(app, ["train", "detector", "--help"]).output
    assert "vqa-search train detector ./shapes" in help_text


def test_crafted_detector_files_are_refused_in_one_line(tmp_path):
    spec = DetectorSpec(min_size=64, max_size=64, anchor_sizes="8,16,24,32,48", classes='["a", "b"]',
                        attributes={"color": ["red", "blue"]})
    good = save_detector(tmp_path / "good.safetensors", build_detector(spec), spec)
    assert load_detector(good)[1] == spec
    state = build_detector(spec).state_dict()
    cases = {
        "untagged": ({}, "is not a vqa-search detector"),
        "huge": ({"config": json.dumps({**spec.__dict__, "min_size": 2 ** 40})}, '"min_size" must be'),
        "classes": ({"config": json.dumps({**spec.__dict__, "classes": "not json"})}, '"classes" must be'),
        "anchors": ({"config": json.dumps({**spec.__dict__, "anchor_sizes": "1,2"})}, '"anchor_sizes" must be'),
        "preset": ({"config": json.dumps({**spec.__dict__, "preset": "evil"})}, '"preset" must be'),
        "shape": ({"config": json.dumps({**spec.__dict__, "classes": '["a"]'})}, "has shape"),
    }
    for name, (metadata, fragment) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        tag = {} if name == "untagged" else {"format": "vqa-search-detector/1"}
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={**tag, **metadata})
        with pytest.raises(UserError, match=fragment) as error:
            load_detector(path)
        assert "\n" not in str(error.value)
    (tmp_path / "text.safetensors").write_text("no tensors here")
    with pytest.raises(UserError, match="cannot read detector file"):
        load_detector(tmp_path / "text.safetensors")
