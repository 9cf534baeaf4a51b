"""The regions head (Bottom-Up Top-Down attention over a region set) end to end on a small shapes world:
training reads the regions once from the set, the head file names the set, and `ask` / `bench vqa`
read an indexed image's regions from it and extract a new image's with the set's own extractor."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from vqa_search.align.region_store import compute_regions, identity_key
from vqa_search.align.regions import RegionConfig, read_boxes
from vqa_search.cli import app
from vqa_search.core.errors import UserError
from vqa_search.core.identity import TINY_MODEL
from vqa_search.indexer.build import BuildConfig, build_index
from vqa_search.shapes import ShapesConfig, make_shapes
from vqa_search.vqa.answerer import load_answerer
from vqa_search.vqa.bench import VqaBenchConfig, run_vqa_bench
from vqa_search.vqa.features import image_features
from vqa_search.vqa.train import VqaTrainConfig, train_vqa

pytestmark = pytest.mark.usefixtures("one_torch_thread")

runner = CliRunner()
K = 4  # the given boxes first (the shapes), then the whole image and grid cells
REGION_SET = "clip-crops-boxes"


def crops_config(boxes: Path) -> RegionConfig:
    return RegionConfig(source="clip-crops", regions=K, boxes=boxes, workers=0, progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A shapes world with a tiny-CLIP index and the CLIP crops of its objects' boxes as a region set."""
    out = tmp_path_factory.mktemp("vqa-regions") / "shapes"
    make_shapes(out, ShapesConfig(images=40, seed=5, size=64), progress=False)
    build_index(out, BuildConfig(model=TINY_MODEL, pretrained="none", workers=0, progress=False))
    compute_regions(out, crops_config(out / "boxes.json"))
    return out


def regions_config(**overrides) -> VqaTrainConfig:
    return VqaTrainConfig(**{"variant": "regions", "regions": REGION_SET, "model": TINY_MODEL, "pretrained": "none",
                             "epochs": 3, "batch_size": 32, "hidden": 32, "lr": 3e-3, "workers": 0, **overrides})


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    head = tmp_path_factory.mktemp("regions-head") / "head.safetensors"
    return head, train_vqa(world, head, regions_config(), progress=False)


def test_training_lowers_the_loss_and_the_file_names_its_region_set(world, trained):
    head, result = trained
    losses = [record["loss"] for record in result.history]
    assert losses[-1] < losses[0]
    with safe_open(str(head), framework="pt") as handle:
        metadata = handle.metadata()
    manifest = json.loads((world / ".vqa-search" / "regions" / REGION_SET / "manifest.json").read_text())
    assert json.loads(metadata["regions"]) == {"index": str((world / ".vqa-search").resolve()), "name": REGION_SET,
                                               "key": identity_key(manifest["extractor"])}
    assert json.loads(metadata["local"]) is None  # no second image tower: the regions replace it
    assert json.loads(metadata["head"])["region_dim"] == manifest["feature_dim"]


def test_indexed_images_read_the_stored_regions_and_new_ones_are_extracted(world, trained, tmp_path):
    answerer = load_answerer(trained[0], torch.device("cpu"))
    regions = answerer.regions
    indexed = world / "Images" / "shape_000003.png"
    new = tmp_path / "photo.png"
    Image.open(indexed).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(new)
    features = image_features(answerer.clip, None, [indexed, new], regions=regions)
    stored = regions.features([regions.row_of("shape_000003.png")])[0]
    assert torch.equal(torch.from_numpy(features.regions[0]), torch.from_numpy(stored))
    extracted, boxes = regions.extractor().extract([Image.open(new).convert("RGB")])
    assert torch.equal(torch.from_numpy(features.regions[1]), torch.from_numpy(extracted[0]).half())
    first_shape = read_boxes(world / "boxes.json").for_image("shape_000003.png", 64, 64)[0]
    np.testing.assert_allclose(stored[0, -7:-3], first_shape / 64, atol=1e-3)  # its geometry, as the head reads it


def test_bench_and_ask_answer_with_the_regions_head(world, trained, tmp_path):
    head, result = trained
    bench = run_vqa_bench(world, VqaBenchConfig(head=head, split="val", workers=0, progress=False))
    assert bench["head"]["overall"] == pytest.approx(result.best["val"]["overall"])
    new = tmp_path / "photo.png"
    Image.open(world / "Images" / "shape_000001.png").rotate(90).save(new)
    for image in (world / "Images" / "shape_000001.png", new):
        out = runner.invoke(app, ["ask", str(image), "what color is the circle?", "--head", str(head), "--json"])
        assert out.exit_code == 0, out.output
        answers = json.loads(out.stdout)["head"]  # stderr tells of the new image's extraction
        assert len(answers) == 5 and answers[0]["probability"] >= answers[-1]["probability"]


def test_a_recomputed_or_missing_region_set_is_refused_in_one_line(world, trained, tmp_path):
    """A copy of the index whose set was recomputed from another boxes file: same name, other extractor."""
    copy = tmp_path / "copy"
    shutil.copytree(world, copy)
    coco = json.loads((world / "boxes.json").read_text())
    coco["annotations"] = coco["annotations"][1:]
    (tmp_path / "other-boxes.json").write_text(json.dumps(coco))
    compute_regions(copy, crops_config(tmp_path / "other-boxes.json"))
    image = str(world / "Images" / "shape_000000.png")
    ask = ["ask", image, "what color is the circle?", "--head", str(trained[0]), "--index", str(copy)]
    out = runner.invoke(app, ask)
    assert out.exit_code == 2 and "was recomputed with another extractor" in out.output, out.output
    assert len(out.output.strip().splitlines()) == 1 and "Traceback" not in out.output
    shutil.rmtree(copy / ".vqa-search" / "regions" / REGION_SET)
    out = runner.invoke(app, ask)
    assert out.exit_code == 2 and f"its region set '{REGION_SET}': no region set at" in out.output, out.output
    assert len(out.output.strip().splitlines()) == 1
    out = runner.invoke(app, ["bench", "vqa", str(world), "--head", str(trained[0]), "--index", str(copy), "-q"])
    assert out.exit_code == 2 and "no region set at" in out.output, out.output
    out = runner.invoke(app, ["train", "vqa", str(copy), "--out", str(tmp_path / "h.safetensors"), "--variant",
                              "regions", "--region-set", REGION_SET, "--model", TINY_MODEL, "--pretrained", "none"])
    assert out.exit_code == 2 and "no region set at" in out.output, out.output


@pytest.mark.parametrize("record, message", [
    ({"name": "../elsewhere"}, 'regions field "name" must be a string naming a region set'),
    (None, 'a regions head needs a region set, but "regions" is null'),
])
def test_a_crafted_region_record_is_refused_before_any_model_loads(trained, tmp_path, record, message):
    with safe_open(str(trained[0]), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}
    metadata["regions"] = json.dumps(None if record is None else {**json.loads(metadata["regions"]), **record})
    save_file(tensors, str(tmp_path / "crafted.safetensors"), metadata=metadata)
    with pytest.raises(UserError, match=re.escape(message)):
        load_answerer(tmp_path / "crafted.safetensors")
