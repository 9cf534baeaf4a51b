"""The shapes world: deterministic files, readable as Flickr8k, and every caption and answer true."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vqa_search.errors import UserError
from vqa_search.indexer.datasets import read_dataset
from vqa_search.shapes import COLORS, OPPOSITE, SHAPES, SceneObject, ShapesConfig, make_shapes, relation

SMALL = ShapesConfig(images=120, seed=3, size=64)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, SMALL)
    return out


def scenes(out: Path) -> dict[str, list[SceneObject]]:
    """Objects per image file, rebuilt from boxes.json alone."""
    boxes = json.loads((out / "boxes.json").read_text())
    names = {image["id"]: image["file_name"] for image in boxes["images"]}
    shape_of = {category["id"]: category["name"] for category in boxes["categories"]}
    objects: dict[str, list[SceneObject]] = {name: [] for name in names.values()}
    for a in boxes["annotations"]:
        x, y, side, _ = a["bbox"]
        objects[names[a["image_id"]]].append(
            SceneObject(shape_of[a["category_id"]], a["attributes"]["color"], a["attributes"]["size"], x, y, side))
    return objects


def file_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_images(world, tmp_path):
    make_shapes(tmp_path / "again", SMALL)
    make_shapes(tmp_path / "other", ShapesConfig(images=120, seed=4, size=64))
    assert file_bytes(tmp_path / "again") == file_bytes(world)
    assert (tmp_path / "other" / "captions.txt").read_bytes() != (world / "captions.txt").read_bytes()


def test_reader_sees_a_flickr8k_layout_with_five_captions_each(world):
    data = read_dataset(world)
    assert len(data.images) == 120 and data.missing_images == 0
    assert len(data.captions) == 5 * 120
    assert {split: len(paths) for split, paths in data.splits.items()} == {"train": 96, "val": 12, "test": 12}


def test_scenes_have_one_to_four_separate_shapes_inside_the_image(world):
    for objects in scenes(world).values():
        assert 1 <= len(objects) <= 4
        for obj in objects:
            assert obj.shape in SHAPES and obj.color in COLORS
            assert obj.x >= 0 and obj.y >= 0 and obj.x + obj.side <= 64 and obj.y + obj.side <= 64
        for i, a in enumerate(objects):
            for b in objects[i + 1:]:
                assert (a.x + a.side <= b.x or b.x + b.side <= a.x or a.y + a.side <= b.y or b.y + b.side <= a.y)


def test_pixels_at_circle_and_square_centres_have_the_object_colour(world):
    checked = 0
    for name, objects in scenes(world).items():
        pixels = np.asarray(Image.open(world / "Images" / name).convert("RGB")).astype(int)
        for obj in objects:
            if obj.shape in ("circle", "square"):
                cx, cy = (int(c) for c in obj.center)
                assert np.abs(pixels[cy, cx] - COLORS[obj.color]).max() <= 8, (name, obj)
                checked += 1
    assert checked > 50


PHRASE = r"(?:(small|large) )?(\w+) (circle|square|triangle|star|diamond)"
RELATION = re.compile(rf"^(?:there is )?an? {PHRASE} (?:is )?({'|'.join(OPPOSITE)}) an? {PHRASE}$")


def _named(objects, size, color, shape):
    return [o for o in objects if o.color == color and o.shape == shape and (size is None or o.size == size)]


def test_relation_captions_are_true_of_the_boxes(world):
    objects_of = scenes(world)
    checked = 0
    for line in (world / "captions.txt").read_text().splitlines()[1:]:
        image, caption = line.split(",", 1)
        match = RELATION.match(caption.strip('"'))
        if not match:
            continue
        size_a, color_a, shape_a, rel, size_b, color_b, shape_b = match.groups()
        [a] = _named(objects_of[image], size_a, color_a, shape_a)  # the phrase names exactly one object
        [b] = _named(objects_of[image], size_b, color_b, shape_b)
        assert relation(a, b) == rel, (image, caption)
        checked += 1
    assert checked > 30


def test_answers_are_true_of_the_boxes(world):
    objects_of = scenes(world)
    kinds = set()
    for record in map(json.loads, (world / "vqa.jsonl").read_text().splitlines()):
        objects = objects_of[Path(record["image"]).name]
        question, answer = record["question"], record["answers"][0]
        kinds.add(record["type"])
        assert len(set(record["answers"])) == 1
        if match := re.fullmatch(r"is there an? ((?:small |large )?(?:\w+ )?)(\w+)\?", question):
            words, shape = match.group(1).split(), match.group(2)
            present = any(o.shape == shape and all(w in (o.size, o.color) for w in words) for o in objects)
            assert answer == ("yes" if present else "no"), question
        elif match := re.fullmatch(r"how many (\w+)s are there\?", question):
            noun = match.group(1)
            assert int(answer) == sum(noun in ("shape", o.shape) for o in objects), question
        elif match := re.fullmatch(r"how many (\w+) shapes are there\?", question):
            assert int(answer) == sum(o.color == match.group(1) for o in objects), question
        elif match := re.fullmatch(r"what color is the (?:(small|large) )?(\w+)\?", question):
            [obj] = [o for o in objects if o.shape == match.group(2) and match.group(1) in (None, o.size)]
            assert answer == obj.color, question
        elif match := re.fullmatch(rf"which shape is ({'|'.join(OPPOSITE)}) the {PHRASE}\?", question):
            rel, size, color, shape = match.groups()
            [reference] = _named(objects, size, color, shape)
            [other] = [o for o in objects if o is not reference and relation(o, reference) == rel]
            assert answer == other.shape, question
        elif match := re.fullmatch(r"which shape is (\w+)\?", question):
            assert [o.shape for o in objects if o.color == match.group(1)] == [answer], question
        else:
            pytest.fail(f"unexpected question form: {question}")
    assert kinds == {"yes/no", "color", "count", "shape"}


def test_twins_are_colour_or_position_swaps_of_their_source(world):
    images = json.loads((world / "dataset_shapes.json").read_text())["images"]
    objects_of = scenes(world)
    by_id = {image["imgid"]: image for image in images}
    twins = [image for image in images if "twin_of" in image]
    assert 0.15 * len(images) <= len(twins) <= 0.35 * len(images)
    for twin in twins:
        source = by_id[twin["twin_of"]]
        assert source["split"] == twin["split"]  # near misses share a gallery
        a, b = objects_of[source["filename"]], objects_of[twin["filename"]]
        changed = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        assert len(a) == len(b) and len(changed) == 2
        i, j = changed
        if twin["variant"] == "color-swap":
            assert (b[i].color, b[j].color) == (a[j].color, a[i].color) and (b[i].x, b[i].y) == (a[i].x, a[i].y)
        else:
            assert twin["variant"] == "position-swap"
            assert (*b[i].center, *b[j].center) == pytest.approx((*a[j].center, *a[i].center), abs=1)
            assert (b[i].color, b[i].shape) == (a[i].color, a[i].shape)


def test_answers_are_balanced_against_guessing(tmp_path):
    summary = make_shapes(tmp_path / "w", ShapesConfig(images=600, seed=0, size=48))
    assert summary.majority_baseline["yes/no"] <= 55
    assert all(summary.majority_baseline[kind] <= 35 for kind in ("color", "count", "shape"))


def test_smaller_rerun_removes_stale_images(tmp_path):
    make_shapes(tmp_path, ShapesConfig(images=30, size=48))
    make_shapes(tmp_path, ShapesConfig(images=10, size=48))
    assert len(list((tmp_path / "Images").iterdir())) == 10
    assert len(read_dataset(tmp_path).images) == 10


@pytest.mark.parametrize("config, message", [
    (ShapesConfig(images=0), "--images must be at least 1"),
    (ShapesConfig(size=16), "--size must be at least 32"),
])
def test_bad_settings_are_user_errors(tmp_path, config, message):
    with pytest.raises(UserError, match=message):
        make_shapes(tmp_path / "out", config)


def test_refuses_to_write_into_someone_elses_folder(tmp_path):
    (tmp_path / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(UserError, match="not empty"):
        make_shapes(tmp_path, ShapesConfig(images=5, size=48))
    assert [p.name for p in tmp_path.iterdir()] == ["holiday.jpg"]
