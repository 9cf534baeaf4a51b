"""More region sources: given boxes (`--boxes FILE`, COCO format) and CLIP crops (`--source clip-crops`).

Exactly K regions per image whatever the file gives, the given boxes first and as the file says them,
crop features equal to a naive crop -> preprocess -> encode loop, and the boxes file in the set's identity.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_regions import SMALL, _assert_geometry, _image, _naive_box_features, detector_file, indexed  # noqa: F401 (fixtures)
from typer.testing import CliRunner

from vqa_search.align.region_store import RegionSet, compute_regions
from vqa_search.align.regions import CropRegions, RegionConfig, fill_boxes, geometry, load_extractor, read_boxes
from vqa_search.cli import app
from vqa_search.core.errors import UserError
from vqa_search.core.identity import resolve_identity
from vqa_search.core.models import load_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K = 4
MANY = [[1, 2, 10, 8], [20, 5, 15, 20], [3, 25, 30, 10], [30, 30, 12, 9], [0, 0, 5, 5], [40, 1, 7, 7]]
FEW = [[4.5, 6.25, 20, 14.5], [10, 12, 30, 20]]


def _coco(path, images):
    """images: {file_name: (width, height, [bbox, ...])} -> a COCO file like the shapes world's boxes.json."""
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for image_id, (name, (width, height, bboxes)) in enumerate(images.items(), start=1):
        coco["images"].append({"id": image_id, "file_name": name, "width": width, "height": height})
        coco["annotations"] += [{"id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": 1,
                                 "bbox": bbox} for bbox in bboxes]
    path.write_text(json.dumps(coco))
    return path


def _xyxy(bboxes):
    return np.array([[x, y, x + w, y + h] for x, y, w, h in bboxes], dtype=np.float32)


@pytest.fixture(scope="module")
def clip():
    return load_clip(resolve_identity("vqa-tiny", "none"))


def _expected_boxes(bboxes, width, height):
    given = _xyxy(bboxes)[:K] if bboxes else np.zeros((0, 4), dtype=np.float32)
    return np.concatenate([given, fill_boxes(width, height, K - len(given)).numpy()])


def test_given_boxes_come_first_then_the_fill_exactly_k_with_the_detectors_box_head(tmp_path, detector_file):
    boxes_file = _coco(tmp_path / "boxes.json", {"many.png": (50, 40, MANY), "few.png": (50, 40, FEW),
                                                 "empty.png": (50, 40, [])})
    extractor = load_extractor(RegionConfig(detector="frcnn-mobilenet", detector_weights=detector_file,
                                            min_size=SMALL, regions=K, boxes=boxes_file))
    assert extractor.name == "frcnn-mobilenet-boxes" and extractor.identity["boxes_sha256"]
    images = [_image(50, 40, seed=seed) for seed in range(4)]
    names = ["many.png", "few.png", "empty.png", "unlisted.png"]
    features, boxes = extractor.extract_pixels([extractor.preprocess(image) for image in images], [(50, 40)] * 4,
                                               names)
    assert features.shape == (4, K, 1031) and boxes.shape == (4, K, 4)
    for box, bboxes in zip(boxes, [MANY, FEW, [], []]):
        np.testing.assert_allclose(box, _expected_boxes(bboxes, 50, 40), atol=1e-5)
    _assert_geometry(features, boxes, [(50, 40)] * 4)
    np.testing.assert_allclose(features[1, :, :1024], _naive_box_features(extractor.model, images[1], boxes[1]),
                               rtol=1e-4, atol=1e-5)
    # A query image (no path) gets what an image the file does not mention gets: the fill.
    query_features, query_boxes = extractor.extract([images[3]])
    np.testing.assert_allclose(query_boxes[0], fill_boxes(50, 40, K).numpy())
    np.testing.assert_allclose(query_features[0], features[3], rtol=1e-5, atol=1e-6)


def test_boxes_are_scaled_to_the_decoded_size_and_clamped(tmp_path):
    given = read_boxes(_coco(tmp_path / "b.json", {"a.png": (100, 80, [[10, 8, 20, 16], [90, 70, 30, 30]])}))
    np.testing.assert_allclose(given.for_image("a.png", 50, 40), [[5, 4, 15, 12], [45, 35, 50, 40]])
    assert given.for_image("other.png", 50, 40).shape == (0, 4) and not given.mentions("other.png")


def test_clip_crops_equal_a_naive_crop_preprocess_encode_loop(tmp_path, clip):
    boxes_file = _coco(tmp_path / "boxes.json", {"few.png": (50, 40, FEW)})
    extractor = CropRegions(clip, K, read_boxes(boxes_file))
    assert extractor.feature_dim == 64 + 7 and extractor.name == "clip-crops-boxes"
    images = [_image(50, 40, seed=3), _image(37, 61, seed=4)]
    features, boxes = extractor.extract_pixels([extractor.preprocess(image) for image in images],
                                               [image.size for image in images], ["few.png", "unlisted.png"])
    assert features.shape == (2, K, 71) and features.dtype == np.float32
    np.testing.assert_allclose(boxes[0], _expected_boxes(FEW, 50, 40), atol=1e-6)
    np.testing.assert_allclose(boxes[1], fill_boxes(37, 61, K).numpy())
    for image, feature, box in zip(images, features, boxes):
        width, height = image.size
        naive = []
        with torch.inference_mode():
            for x1, y1, x2, y2 in box:
                crop = image.crop((float(x1), float(y1), float(x2), float(y2)))
                naive.append(F.normalize(clip.model.encode_image(clip.preprocess(crop)[None]), dim=-1)[0].numpy())
        np.testing.assert_allclose(feature[:, :64], np.stack(naive), atol=1e-5)
        np.testing.assert_allclose(feature[:, 64:], geometry(torch.from_numpy(box), width, height).numpy(), atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(feature[:, :64], axis=1), 1, atol=1e-5)


def test_clip_crops_without_boxes_are_the_fill_and_need_no_detector(clip):
    extractor = load_extractor(RegionConfig(source="clip-crops", regions=6), clip)
    assert extractor.name == "clip-crops" and "boxes_sha256" not in extractor.identity
    features, boxes = extractor.extract([_image(30, 20)])
    np.testing.assert_allclose(boxes[0], fill_boxes(30, 20, 6).numpy())
    assert features.shape == (1, 6, 71)


def test_store_hashes_the_boxes_file_reuses_when_unchanged_and_recomputes_when_changed(indexed, tmp_path):
    boxes_file = _coco(tmp_path / "boxes.json", {"photo_0.png": (48, 40, MANY), "photo_1.png": (48, 40, FEW),
                                                 "photo_2.png": (48, 40, []), "not_indexed.png": (48, 40, FEW)})
    config = RegionConfig(source="clip-crops", regions=K, boxes=boxes_file, workers=0, progress=False, batch_size=2)
    report = compute_regions(indexed, config)
    assert (report.name, report.computed, report.images, report.boxes_unlisted) == ("clip-crops-boxes", 6, 6, 3)
    regions = RegionSet.open(indexed, "clip-crops-boxes")
    assert regions.manifest["extractor"]["boxes_sha256"] and regions.manifest["boxes_file"] == str(boxes_file)
    assert regions.feature_dim == 71 and regions.num_regions == K
    first_shards = set(regions.manifest["shards"])
    for name, bboxes in [("photo_0.png", MANY), ("photo_1.png", FEW), ("photo_2.png", []), ("photo_3.png", [])]:
        np.testing.assert_allclose(regions.boxes([regions.row_of(name)])[0], _expected_boxes(bboxes, 48, 40),
                                   atol=1e-5)
    # The query-time extractor gives an image the fill, as the set gave the images the file does not mention.
    image = Image.open(indexed / "Images" / "photo_3.png").convert("RGB")
    features, _ = regions.extractor().extract([image])
    np.testing.assert_allclose(features, regions.features([regions.row_of("photo_3.png")]), rtol=2e-3, atol=2e-3)

    os.utime(boxes_file, ns=(1, 1))  # same content, another mtime: nothing to do
    assert compute_regions(indexed, config).up_to_date
    _coco(boxes_file, {"photo_0.png": (48, 40, FEW)})
    report = compute_regions(indexed, config)
    assert (report.computed, report.reused, report.up_to_date, report.boxes_unlisted) == (6, 0, False, 5)
    regions = RegionSet.open(indexed, "clip-crops-boxes")
    np.testing.assert_allclose(regions.boxes([regions.row_of("photo_0.png")])[0], _expected_boxes(FEW, 48, 40),
                               atol=1e-5)
    assert not first_shards & set(regions.manifest["shards"])  # nothing of the old file's shards is reused


def test_detector_boxes_set_is_its_own_and_reopens_its_extractor(indexed, tmp_path, detector_file):
    boxes_file = _coco(tmp_path / "boxes.json", {"photo_4.png": (48, 40, FEW)})
    config = RegionConfig(detector="frcnn-mobilenet", detector_weights=detector_file, min_size=SMALL, regions=K,
                          boxes=boxes_file, workers=0, progress=False)
    report = compute_regions(indexed, config)
    assert (report.name, report.computed, report.boxes_unlisted) == ("frcnn-mobilenet-boxes", 6, 5)
    regions = RegionSet.open(indexed, "frcnn-mobilenet-boxes")
    np.testing.assert_allclose(regions.boxes([regions.row_of("photo_4.png")])[0], _expected_boxes(FEW, 48, 40),
                               atol=1e-5)
    image = Image.open(indexed / "Images" / "photo_5.png").convert("RGB")
    features, _ = regions.extractor().extract([image])
    np.testing.assert_allclose(features, regions.features([regions.row_of("photo_5.png")]), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("content, fragment", [
    (None, "boxes file not found"),
    ("{not json", "is not JSON"),
    ('{"annotations": []}', "no `images` list"),
    ('{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1, "bbox": [1, 2, 3]}]}',
     "annotations[0] has bbox [1, 2, 3], not 4 numbers"),
    ('{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1, "bbox": [1, 2, "3", 4]}]}',
     "not 4 numbers"),
    ('{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 2, "bbox": [1, 2, 3, 4]}]}',
     "image_id 2, which no image has"),
    ('{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1, "bbox": [1, 2, 0, 4]}]}',
     "not positive"),
])
def test_bad_boxes_files_are_one_line_errors(tmp_path, content, fragment):
    path = tmp_path / "boxes.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError) as error:
        read_boxes(path)
    assert fragment in str(error.value) and "\n" not in str(error.value)


runner = CliRunner()


def test_cli_boxes_with_clip_crops_and_one_line_errors(indexed, tmp_path):
    boxes_file = _coco(tmp_path / "boxes.json", {"photo_0.png": (48, 40, FEW)})
    result = runner.invoke(app, ["regions", str(indexed), "--boxes", str(boxes_file), "--source", "clip-crops",
                                 "--regions", "3", "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.stdout)
    assert (report["name"], report["computed"], report["images"], report["boxes_unlisted"]) == (
        "clip-crops-boxes", 6, 6, 5)
    (tmp_path / "bad.json").write_text("[1, 2")
    (tmp_path / "short.json").write_text(
        '{"images": [{"id": 1, "file_name": "photo_0.png"}], "annotations": [{"image_id": 1, "bbox": [1, 2]}]}')
    for args, fragment in [
        (["--boxes", str(tmp_path / "missing.json"), "--source", "clip-crops"], "boxes file not found"),
        (["--boxes", str(tmp_path / "bad.json"), "--source", "clip-crops"], "is not JSON"),
        (["--boxes", str(tmp_path / "short.json"), "--source", "clip-crops"], "not 4 numbers"),
        (["--boxes", str(boxes_file), "--source", "clip-patches"], "--boxes needs --source detector or clip-crops"),
    ]:
        result = runner.invoke(app, ["regions", str(indexed), *args, "--workers", "0"])
        assert result.exit_code == 2, result.output + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    help_text = runner.invoke(app, ["regions", "--help"]).output
    assert "--boxes" in help_text and "clip-crops" in help_text
