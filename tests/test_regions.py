"""Stage 0: exactly K regions per image, features equal to naive recomputations, and a store that
resumes after a crash and follows the index. Detectors are randomly initialised and saved by the test:
no weights are downloaded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config, write_photo
from PIL import Image
from torchvision.models import detection
from torchvision.transforms.functional import to_tensor
from typer.testing import CliRunner

from vqa_search import Index
from vqa_search.align import regions as regions_module
from vqa_search.align.region_store import RegionDir, RegionSet, compute_regions
from vqa_search.align.regions import GEOMETRY, PatchRegions, RegionConfig, fill_boxes, load_extractor
from vqa_search.cli import app
from vqa_search.core.errors import UserError
from vqa_search.core.models import load_clip
from vqa_search.core.identity import resolve_identity
from vqa_search.core.store import GenerationDir, IndexDir

SMALL = 96  # the detector's input side in tests: same code path, a fraction of the cost


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def detector_file(tmp_path_factory):
    """A randomly initialised MobileNet detector's state dict, as a user would pass it."""
    torch.manual_seed(0)
    model = detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None)
    path = tmp_path_factory.mktemp("weights") / "frcnn-mobilenet-random.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def indexed(photos):
    Index.build(photos, **tiny_config())
    return photos


def _detector(detector_file, **overrides):
    config = RegionConfig(detector="frcnn-mobilenet", detector_weights=detector_file, min_size=SMALL, **overrides)
    return load_extractor(config)


def _patches(workers=0, **overrides):
    return RegionConfig(source="clip-patches", workers=workers, progress=False, batch_size=2, **overrides)


def _image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _assert_geometry(features, boxes, sizes):
    for feature, box, (width, height) in zip(features, boxes, sizes):
        x1, y1, x2, y2 = (box / [width, height, width, height]).T
        expected = np.stack([x1, y1, x2, y2, x2 - x1, y2 - y1, (x2 - x1) * (y2 - y1)], axis=1)
        np.testing.assert_allclose(feature[:, -len(GEOMETRY):], expected, atol=1e-6)
        assert (expected >= -1e-6).all() and (expected <= 1 + 1e-6).all()


def _naive_box_features(model, image, boxes):
    """The box head on one box at a time, boxes scaled by hand into the detector's resized image."""
    width, height = image.size
    images, _ = model.transform([to_tensor(image)])
    resized_h, resized_w = images.image_sizes[0]
    scale = torch.tensor([resized_w / width, resized_h / height] * 2)
    with torch.inference_mode():
        maps = model.backbone(images.tensors)
        return np.stack([
            model.roi_heads.box_head(
                model.roi_heads.box_roi_pool(maps, [torch.from_numpy(box)[None] * scale], images.image_sizes)
            )[0].numpy()
            for box in boxes
        ])


def test_detector_fills_with_whole_image_then_grid_and_matches_naive_box_head(detector_file):
    extractor = _detector(detector_file)  # a random detector finds nothing above 0.2
    images = [_image(80, 60), _image(50, 90, seed=1)]
    features, boxes = extractor.extract(images)
    assert features.shape == (2, 36, 1031) and boxes.shape == (2, 36, 4)
    assert features.dtype == boxes.dtype == np.float32
    for image, box in zip(images, boxes):
        width, height = image.size
        np.testing.assert_allclose(box[0], [0, 0, width, height], atol=1e-4)  # the whole image first
        np.testing.assert_allclose(box[1:5], [[0, 0, width / 2, height / 2], [width / 2, 0, width, height / 2],
                                              [0, height / 2, width / 2, height], [width / 2, height / 2, width, height]],
                                   atol=1e-4)
        np.testing.assert_allclose(box, fill_boxes(width, height, 36).numpy(), atol=1e-4)
    _assert_geometry(features, boxes, [image.size for image in images])
    naive = _naive_box_features(extractor.model, images[1], boxes[1])
    np.testing.assert_allclose(features[1, :, :1024], naive, rtol=1e-4, atol=1e-5)


def test_detections_come_first_without_duplicates(detector_file):
    extractor = _detector(detector_file, regions=6, score_threshold=0.0)  # every detection counts
    image = _image(70, 64, seed=2)
    features, boxes = extractor.extract([image])
    assert boxes.shape == (1, 6, 4)
    assert not np.allclose(boxes[0, 0], [0, 0, 70, 64])  # real detections, not the fill
    assert len({tuple(np.round(box, 3)) for box in boxes[0]}) == 6
    assert (boxes[0, :, [0, 2]] <= 70 + 1e-3).all() and (boxes[0, :, [1, 3]] <= 64 + 1e-3).all()
    _assert_geometry(features, boxes, [image.size])
    np.testing.assert_allclose(features[0, :, :1024], _naive_box_features(extractor.model, image, boxes[0]),
                               rtol=1e-4, atol=1e-5)


def test_proposals_bound_what_the_rpn_hands_the_box_head(detector_file):
    image = to_tensor(_image(70, 64, seed=2))
    for proposals in (None, 12):
        model = _detector(detector_file, regions=6, score_threshold=0.0, proposals=proposals).model
        with torch.inference_mode():
            images, _ = model.transform([image])
            found = model.rpn(images, model.backbone(images.tensors))[0][0]
        assert len(found) <= (proposals or 1000) and (proposals is None or len(found) == proposals)
    with pytest.raises(UserError, match="--proposals must be at least --regions"):
        _detector(detector_file, regions=6, proposals=5)
    with pytest.raises(UserError, match="--proposals is for --source detector"):
        load_extractor(RegionConfig(source="clip-crops", proposals=50))


def test_clip_patches_equal_a_naive_vit_forward_and_tile_the_crop():
    clip = load_clip(resolve_identity("vqa-tiny", "none"))
    extractor = PatchRegions(clip)
    image = _image(48, 40)
    features, boxes = extractor.extract([image])
    assert features.shape == (1, 16, 64 + 7) and boxes.shape == (1, 16, 4)

    visual = clip.model.visual
    with torch.inference_mode():
        x = visual.conv1(clip.preprocess(image)[None]).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(1, 1, -1), x], dim=1) + visual.positional_embedding
        x = visual.ln_post(visual.transformer(visual.ln_pre(x)))
        pooled = visual(clip.preprocess(image)[None])  # the caller's model still returns the pooled vector only
        np.testing.assert_allclose((x[:, 0] @ visual.proj).numpy(), pooled.numpy(), rtol=1e-4, atol=1e-5)
        tokens = (x[0, 1:] @ visual.proj).numpy()
    np.testing.assert_allclose(features[0, :, :64], tokens, rtol=1e-4, atol=1e-5)
    _assert_geometry(features, boxes, [image.size])

    # Resize 40 -> 64 on the short side (48 -> 76 wide), center crop 64: in original pixels the crop is
    # the full height and 64 * 40/64 = 40.4 of the 48 columns, centred; 4x4 equal, adjacent patches.
    box = boxes[0]
    scale = 48 / 76
    np.testing.assert_allclose([box[:, 0].min(), box[:, 1].min(), box[:, 2].max(), box[:, 3].max()],
                               [6 * scale, 0, 70 * scale, 40], atol=1e-4)
    np.testing.assert_allclose(box[:, 2] - box[:, 0], 16 * scale, atol=1e-4)
    np.testing.assert_allclose(box[:, 3] - box[:, 1], 10, atol=1e-4)
    grid = box.reshape(4, 4, 4)
    np.testing.assert_allclose(grid[:, 1:, 0], grid[:, :-1, 2], atol=1e-4)  # each patch starts where the last ended
    np.testing.assert_allclose(grid[1:, :, 1], grid[:-1, :, 3], atol=1e-4)


def test_clip_patches_refuse_another_region_count():
    clip = load_clip(resolve_identity("vqa-tiny", "none"))
    with pytest.raises(UserError, match="one region per patch"):
        PatchRegions(clip, regions=36)


def test_store_reader_api_and_query_time_extractor(indexed):
    report = compute_regions(indexed, _patches())
    assert (report.computed, report.reused, report.removed, report.images) == (6, 0, 0, 6)
    regions = RegionSet.open(indexed)
    assert (regions.name, regions.source, regions.num_regions, regions.feature_dim) == ("clip-patches",
                                                                                        "clip-patches", 16, 71)
    assert regions.paths == Index.open(indexed).image_paths
    rows = [regions.row_of("photo_4.png"), regions.row_of("photo_1.png")]
    features, boxes = regions.features(rows), regions.boxes(rows)
    assert features.dtype == np.float16 and features.shape == (2, 16, 71) and boxes.dtype == np.float32
    images = [Image.open(indexed / "Images" / name).convert("RGB") for name in ("photo_4.png", "photo_1.png")]
    fresh_features, fresh_boxes = regions.extractor().extract(images)
    np.testing.assert_allclose(features, fresh_features, rtol=2e-3, atol=2e-3)  # stored as float16
    np.testing.assert_array_equal(boxes, fresh_boxes)
    manifest = json.loads((regions.dir.manifest_path).read_text())
    assert manifest["rows"] == 6 and manifest["dtype"] == {"features": "float16", "boxes": "float32"}
    assert manifest["extractor"]["model"]["model"] == "vqa-tiny"
    assert compute_regions(indexed, _patches()).up_to_date
    with pytest.raises(UserError, match="has no clip-patches regions"):
        regions.row_of("nope.png")


def test_crash_after_the_first_batch_resumes_from_its_shard(indexed, monkeypatch):
    real = PatchRegions.extract_pixels
    computed = []

    def crashing(self, pixels, sizes, paths=None):
        if computed:
            raise RuntimeError("simulated crash")
        computed.append(len(sizes))
        return real(self, pixels, sizes, paths)

    monkeypatch.setattr(PatchRegions, "extract_pixels", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        compute_regions(indexed, _patches(rows_per_shard=2))
    assert not (indexed / ".vqa-search" / "regions" / "clip-patches" / "manifest.json").exists()

    def counting(self, pixels, sizes, paths=None):
        computed.append(len(sizes))
        return real(self, pixels, sizes, paths)

    monkeypatch.setattr(PatchRegions, "extract_pixels", counting)
    report = compute_regions(indexed, _patches(rows_per_shard=2))
    assert (report.computed, report.reused) == (4, 2) and sum(computed) == 6  # the first batch only once
    regions = RegionSet.open(indexed)
    clean, _ = regions.extractor().extract([Image.open(indexed / "Images" / p).convert("RGB") for p in regions.paths])
    np.testing.assert_allclose(regions.features(range(6)), clean, rtol=2e-3, atol=2e-3)


def test_follows_the_index_added_removed_and_changed_images(indexed):
    compute_regions(indexed, _patches())
    write_photo(indexed / "Images" / "new.png", (10, 20, 30))
    (indexed / "Images" / "photo_0.png").unlink()
    write_photo(indexed / "Images" / "photo_2.png", (1, 2, 3), size=(30, 50))
    Index.build(indexed, **tiny_config())
    report = compute_regions(indexed, _patches())
    assert (report.computed, report.reused, report.removed, report.images) == (2, 4, 1, 6)
    regions = RegionSet.open(indexed)
    assert "photo_0.png" not in regions.paths and "new.png" in regions.paths
    changed = regions.boxes([regions.row_of("photo_2.png")])[0]
    assert changed[:, 2].max() == pytest.approx(30, abs=1e-3)  # the new picture is 30 wide, not 48


def test_a_region_set_is_a_generation_directory_without_the_index_parts(tmp_path):
    assert issubclass(RegionDir, GenerationDir) and not issubclass(RegionDir, IndexDir)
    for index_only in ("pending", "load_cache", "_load_generation", "_load_pending", "shard_writer", "clear_pending"):
        assert hasattr(IndexDir, index_only) and not hasattr(RegionDir, index_only), index_only
    region_dir = RegionDir(tmp_path / "regions" / "clip-patches")
    with pytest.raises(UserError, match=r"^no region set at .*: run `vqa-search regions DATASET` first$"):
        region_dir.read_manifest()
    with region_dir.lock():
        with pytest.raises(UserError, match="another vqa-search process .* is writing the region set at"):
            with region_dir.lock():
                pass


def test_detector_set_stores_weights_identity_and_reopens_its_extractor(indexed, detector_file):
    config = RegionConfig(detector="frcnn-mobilenet", detector_weights=detector_file, min_size=SMALL, regions=4,
                          proposals=20, workers=0, progress=False)
    assert compute_regions(indexed, config).computed == 6
    regions = RegionSet.open(indexed, "frcnn-mobilenet")
    assert regions.manifest["extractor"]["weights_sha256"] and regions.feature_dim == 1031
    assert regions.manifest["extractor"]["proposals"] == 20
    image = Image.open(indexed / "Images" / "photo_3.png").convert("RGB")
    extractor = regions.extractor()
    assert extractor.proposals == 20
    features, _ = extractor.extract([image])
    stored = regions.features([regions.row_of("photo_3.png")])
    np.testing.assert_allclose(stored, features, rtol=2e-3, atol=2e-3)


def test_missing_weights_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(regions_module, "host_reachable", lambda host: False)
    with pytest.raises(UserError, match="--detector-weights") as error:
        load_extractor(RegionConfig(detector="frcnn-r50"))
    assert "\n" not in str(error.value) and "fasterrcnn_resnet50_fpn_v2_coco" in str(error.value)


def test_weights_that_do_not_fit_are_a_user_error(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        _detector(garbage).model
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"head.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(UserError, match="do not fit frcnn-mobilenet"):
        _detector(other).model


runner = CliRunner()


def test_cli_json_and_one_line_errors(indexed, tmp_path):
    result = runner.invoke(app, ["regions", str(indexed), "--source", "clip-patches", "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.stdout)
    assert report["name"] == "clip-patches" and report["computed"] == 6 and report["images"] == 6
    for args, fragment in [
        ([str(tmp_path)], "run `vqa-search index"),
        ([str(indexed), "--source", "clip-patches", "--regions", "36"], "one region per patch"),
        ([str(indexed), "--detector", "yolo"], "unknown detector"),
        ([str(indexed), "--detector-weights", str(tmp_path / "missing.pth")], "detector weights not found"),
    ]:
        result = runner.invoke(app, ["regions", *args, "--workers", "0"])
        assert result.exit_code == 2, result.output + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    help_text = runner.invoke(app, ["regions", "--help"]).output
    assert "Example" in help_text and "vqa-search regions" in help_text
