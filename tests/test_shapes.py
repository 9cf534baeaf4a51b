"""The shapes world: deterministic files, readable as Flickr8k, and every caption and answer true.

The scenes are rebuilt from boxes.json alone and every caption and question is checked against them
with geometry written here, not with the generator's own helpers, so a wrong relation, count or
colour in the generator cannot vouch for itself.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vqa_search.core.errors import UserError
from vqa_search.indexer.datasets import read_dataset
from vqa_search.shapes import COLORS, SHAPES, SIZES, ShapesConfig, ShapesSummary, make_shapes, plan_images

SIZE = 64
WORLD = ShapesConfig(images=200, seed=3, size=SIZE)
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}
NUMBERS = {"no": 0, "one": 1, "two": 2, "three": 3, "four": 4}
RELATIONS = ("to the left of", "to the right of", "above", "below")


@dataclass(frozen=True)
class Box:
    """One object as boxes.json records it."""

    shape: str
    color: str
    size: str
    x: int
    y: int
    side: int

    @property
    def cx(self) -> float:
        return self.x + self.side / 2

    @property
    def cy(self) -> float:
        return self.y + self.side / 2


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, ShapesSummary]:
    out = tmp_path_factory.mktemp("shapes")
    return out, make_shapes(out, WORLD)


@pytest.fixture(scope="module")
def world(generated) -> Path:
    return generated[0]


def scenes(out: Path) -> dict[str, list[Box]]:
    """Objects per image file, rebuilt from boxes.json alone."""
    boxes = json.loads((out / "boxes.json").read_text())
    names = {image["id"]: image["file_name"] for image in boxes["images"]}
    shape_of = {category["id"]: category["name"] for category in boxes["categories"]}
    objects: dict[str, list[Box]] = {name: [] for name in names.values()}
    for a in boxes["annotations"]:
        x, y, width, height = a["bbox"]
        assert width == height
        objects[names[a["image_id"]]].append(
            Box(shape_of[a["category_id"]], a["attributes"]["color"], a["attributes"]["size"], x, y, width))
    return objects


def karpathy(out: Path) -> list[dict]:
    return json.loads((out / "dataset_shapes.json").read_text())["images"]


def questions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "vqa.jsonl").read_text().splitlines()]


def file_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- truth, from the boxes


def holds(rel: str, a: Box, b: Box) -> bool:
    """`a rel b` along the axis on which the centres differ most; y grows downwards."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    horizontal = abs(dx) >= abs(dy)
    return {"to the left of": horizontal and dx < 0, "to the right of": horizontal and dx > 0,
            "above": not horizontal and dy < 0, "below": not horizontal and dy > 0}[rel]


def clear(a: Box, b: Box) -> bool:
    """One axis dominates by half again, so nobody would name the other relation."""
    dx, dy = abs(a.cx - b.cx), abs(a.cy - b.cy)
    return max(dx, dy) >= 1.5 * min(dx, dy)


PHRASE = r"(?:(small|large) )?(\w+) (circle|square|triangle|star|diamond)"
A_PHRASE = rf"an? {PHRASE}"
REL = "|".join(RELATIONS)


def matching(objects: list[Box], size: str | None, color: str | None, shape: str) -> list[Box]:
    return [o for o in objects if o.shape == shape and color in (None, o.color) and size in (None, o.size)]


def parse_phrase(text: str) -> tuple[str | None, str, str]:
    match = re.fullmatch(A_PHRASE, text)
    assert match, text
    size, color, shape = match.groups()
    assert color in COLORS, text
    return size, color, shape


def names_one(objects: list[Box], size, color, shape) -> Box | None:
    found = matching(objects, size, color, shape)
    return found[0] if len(found) == 1 else None


def lists_exactly(objects: list[Box], parts: list[str]) -> bool:
    """The listed phrases name the objects one to one."""
    phrases = [parse_phrase(part) for part in parts]
    return len(phrases) == len(objects) and any(
        all(o in matching(objects, *phrase) for o, phrase in zip(order, phrases))
        for order in itertools.permutations(objects))


def split_and(text: str) -> list[str]:
    head, _, last = text.rpartition(" and ")
    return [*head.split(", "), last] if head else [last]


def judge(caption: str, objects: list[Box]) -> tuple[str, bool]:
    """The caption's form and whether it describes the scene; a form not known here fails the test."""
    if m := re.fullmatch(rf"(?:there is )?({A_PHRASE}) (?:is )?({REL}) ({A_PHRASE})", caption):
        a, b = names_one(objects, *parse_phrase(m.group(1))), names_one(objects, *parse_phrase(m.group(6)))
        return "relation", a is not None and b is not None and holds(m.group(5), a, b)
    if m := re.fullmatch(rf"a single {PHRASE}", caption):
        return "listing", len(objects) == 1 and bool(matching(objects, *m.groups()))
    if m := re.fullmatch(r"(\w+) (?:shapes|objects on a gray background): (an? .+)", caption):
        return "listing", NUMBERS[m.group(1)] == len(objects) and lists_exactly(objects, split_and(m.group(2)))
    if m := re.fullmatch(r"a gray picture with (.+)", caption):
        return "listing", lists_exactly(objects, split_and(m.group(1)))
    if m := re.fullmatch(r"(\w+) (\w+) (circle|square|triangle|star|diamond)s", caption):
        same_shape = [o for o in objects if o.shape == m.group(3)]
        return "shape group", (len(same_shape) == NUMBERS[m.group(1)] >= 2
                               and all(o.color == m.group(2) for o in same_shape))
    if m := re.fullmatch(r"(\w+) (circle|square|triangle|star|diamond)s, (.+)", caption):
        same_shape = [o for o in objects if o.shape == m.group(2)]
        said = Counter()
        for part in split_and(m.group(3)):
            number, color = part.split(" ")
            said[color] += NUMBERS[number]
        return "shape group", (len(same_shape) == NUMBERS[m.group(1)]
                               and said == Counter(o.color for o in same_shape))
    if m := re.fullmatch(r"(\w+) (\w+) shapes: (.+)", caption):
        same_color = [o for o in objects if o.color == m.group(2)]
        said = Counter()
        for part in split_and(m.group(3)):
            pm = re.fullmatch(r"(?:an?|(\w+)) (circle|square|triangle|star|diamond)s?", part)
            assert pm, caption
            said[pm.group(2)] += NUMBERS[pm.group(1)] if pm.group(1) else 1
        return "colour group", (len(same_color) == NUMBERS[m.group(1)]
                                and said == Counter(o.shape for o in same_color))
    if m := re.fullmatch(rf"(?:there is |a picture of |an image with )?({A_PHRASE})(?: on a gray background)?",
                         caption):
        return "existence", bool(matching(objects, *parse_phrase(m.group(1))))
    pytest.fail(f"unexpected caption form: {caption!r}")


def caption_is_true(caption: str, objects: list[Box]) -> bool:
    return judge(caption, objects)[1]


def answer_from_boxes(question: str, objects: list[Box]) -> str:
    """The one right answer, computed from the boxes; an ambiguous question fails the test."""
    if m := re.fullmatch(r"is there an? (?:(small|large) )?(?:(\w+) )?(circle|square|triangle|star|diamond)\?",
                         question):
        return "yes" if matching(objects, m.group(1), m.group(2), m.group(3)) else "no"
    if question == "how many shapes are there?":
        return str(len(objects))
    if m := re.fullmatch(r"how many (circle|square|triangle|star|diamond)s are there\?", question):
        return str(sum(o.shape == m.group(1) for o in objects))
    if m := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        assert m.group(1) in COLORS, question
        return str(sum(o.color == m.group(1) for o in objects))
    if m := re.fullmatch(r"what color is the (?:(small|large) )?(\w+)\?", question):
        [obj] = matching(objects, m.group(1), None, m.group(2))
        return obj.color
    if m := re.fullmatch(rf"which shape is ({REL}) the {PHRASE}\?", question):
        rel, size, color, shape = m.groups()
        [reference] = matching(objects, size, color, shape)
        [other] = [o for o in objects if o != reference and holds(rel, o, reference)]
        assert clear(other, reference), question
        return other.shape
    if m := re.fullmatch(r"which shape is (\w+)\?", question):
        [obj] = [o for o in objects if o.color == m.group(1)]
        return obj.shape
    pytest.fail(f"unexpected question form: {question!r}")


# ---------------------------------------------------------------- files and determinism


def test_same_seed_gives_the_same_bytes_in_any_folder_and_process(world, tmp_path):
    """Even under another hash seed: no set or dict order may leak into the files."""
    script = ("import sys; from vqa_search.shapes import ShapesConfig, make_shapes; "
              f"make_shapes(sys.argv[1], ShapesConfig(images={WORLD.images}, seed={WORLD.seed}, size={SIZE}))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "again")], check=True, env=env)
    again, first = file_bytes(tmp_path / "again"), file_bytes(world)
    assert list(again) == list(first)
    assert [name for name in first if again[name] != first[name]] == []


def test_another_seed_gives_other_scenes(world, tmp_path):
    make_shapes(tmp_path, ShapesConfig(images=WORLD.images, seed=WORLD.seed + 1, size=SIZE))
    other, first = file_bytes(tmp_path), file_bytes(world)
    assert set(other) == set(first)
    for name in ("captions.txt", "vqa.jsonl", "boxes.json", "dataset_shapes.json"):
        assert other[name] != first[name], name
    images = [name for name in first if name.startswith("Images/")]
    assert sum(other[name] == first[name] for name in images) < 0.05 * len(images)


def test_reader_sees_every_image_with_five_captions_and_the_splits(world):
    data = read_dataset(world)
    assert data.images_dir == world / "Images"
    assert data.images == [f"shape_{k:06d}.png" for k in range(200)]
    assert data.missing_images == 0 and data.missing_captions == 0
    per_image = Counter(caption.image for caption in data.captions)
    assert set(per_image) == set(data.images) and set(per_image.values()) == {5}
    sizes = {split: len(paths) for split, paths in data.splits.items()}
    assert sizes == {"train": 160, "val": 20, "test": 20}
    assert sorted(path for paths in data.splits.values() for path in paths) == data.images


def test_caption_and_split_files_agree_with_the_karpathy_json(world):
    """Whichever caption file the reader picks, captions.txt and the split lists say what the json says."""
    detected = read_dataset(world)
    from_json = read_dataset(world, captions=world / "dataset_shapes.json")
    from_text = read_dataset(world, captions=world / "captions.txt")
    assert detected.caption_source in (world / "dataset_shapes.json", world / "captions.txt")
    assert detected.captions == from_json.captions == from_text.captions
    assert detected.splits == from_json.splits == from_text.splits
    for split, name in SPLIT_FILES.items():
        listed = (world / name).read_text().splitlines()
        assert listed == [image["filename"] for image in karpathy(world) if image["split"] == split]


def test_summary_counts_what_was_written(generated):
    world, summary = generated
    assert summary.out == world and summary.images == 200 and summary.captions == 1000
    assert summary.questions == len(questions(world))
    assert summary.splits == {"train": 160, "val": 20, "test": 20}


def test_karpathy_json_is_well_formed(world):
    document = json.loads((world / "dataset_shapes.json").read_text())
    assert document["dataset"] == "shapes"
    sentids = []
    for k, image in enumerate(document["images"]):
        assert image["imgid"] == k and image["filename"] == f"shape_{k:06d}.png"
        assert image["split"] in SPLIT_FILES
        assert image["sentids"] == [sentence["sentid"] for sentence in image["sentences"]]
        for sentence in image["sentences"]:
            assert sentence["imgid"] == k
            assert sentence["tokens"] == re.findall(r"[a-z0-9]+", sentence["raw"].lower())
        sentids += image["sentids"]
    assert sentids == list(range(len(sentids)))


def test_coco_boxes_are_inside_the_image_and_do_not_touch(world):
    boxes = json.loads((world / "boxes.json").read_text())
    assert {c["name"] for c in boxes["categories"]} == set(SHAPES)
    assert [image["id"] for image in boxes["images"]] == list(range(200))
    assert all(image["width"] == image["height"] == SIZE for image in boxes["images"])
    ids = [a["id"] for a in boxes["annotations"]]
    assert len(set(ids)) == len(ids)
    for a in boxes["annotations"]:
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE, a
        assert a["area"] == w * h and a["iscrowd"] == 0
        assert w == round(SIZES[a["attributes"]["size"]] * SIZE)
    for name, objects in scenes(world).items():
        for a, b in itertools.combinations(objects, 2):
            apart = a.x + a.side < b.x or b.x + b.side < a.x or a.y + a.side < b.y or b.y + b.side < a.y
            assert apart, (name, a, b)


def test_scenes_have_one_to_four_shapes_with_every_attribute_in_use(world):
    objects_of = scenes(world)
    assert set(Counter(len(objects) for objects in objects_of.values())) == {1, 2, 3, 4}
    everything = [o for objects in objects_of.values() for o in objects]
    assert {o.shape for o in everything} == set(SHAPES)
    assert {o.color for o in everything} == set(COLORS)
    assert {o.size for o in everything} == set(SIZES)


# ---------------------------------------------------------------- pixels


def test_images_are_rgb_of_the_configured_size(world):
    for path in sorted((world / "Images").iterdir())[:20]:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (SIZE, SIZE)


# share of its box a shape covers, and which corners (bottom-left, bottom-right, top-left, top-right) it fills
FILL = {"square": (0.97, 1.0), "circle": (0.68, 0.85), "triangle": (0.44, 0.6), "diamond": (0.44, 0.6),
        "star": (0.28, 0.42)}
CORNERS = {"square": [True] * 4, "circle": [False] * 4, "triangle": [True, True, False, False],
           "diamond": [False] * 4, "star": [False] * 4}


def test_each_box_holds_its_shape_in_its_colour(world):
    """Centre pixel in the object's colour; the share of the box covered and the corners tell the shapes apart."""
    drawn = Counter()
    for name, objects in scenes(world).items():
        pixels = np.asarray(Image.open(world / "Images" / name).convert("RGB")).astype(int)
        for o in objects:
            colour = np.array(COLORS[o.color])
            assert np.abs(pixels[int(o.cy), int(o.cx)] - colour).max() <= 8, (name, o)
            box = pixels[o.y:o.y + o.side, o.x:o.x + o.side]
            covered = np.abs(box - colour).max(axis=2) <= 40
            low, high = FILL[o.shape]
            assert low <= covered.mean() <= high, (name, o, covered.mean())
            assert list(covered[[-2, -2, 1, 1], [1, -2, 1, -2]]) == CORNERS[o.shape], (name, o)
            drawn[o.shape] += 1
    assert min(drawn[shape] for shape in SHAPES) >= 10, drawn


def test_background_is_gray_plain_or_lightly_textured(world):
    kinds = Counter()
    for name, objects in scenes(world).items():
        pixels = np.asarray(Image.open(world / "Images" / name).convert("RGB")).astype(int)
        outside = np.ones((SIZE, SIZE), bool)
        for o in objects:
            outside[max(o.y - 1, 0):o.y + o.side + 1, max(o.x - 1, 0):o.x + o.side + 1] = False
        background = pixels[outside]
        assert (background[:, 0] == background[:, 1]).all() and (background[:, 1] == background[:, 2]).all()
        spread = background[:, 0].std()
        assert spread < 12 and 80 < background.mean() < 175, (name, spread)
        kinds["plain" if spread == 0 else "textured"] += 1
    assert min(kinds.values()) > 0.25 * sum(kinds.values()), kinds


# ---------------------------------------------------------------- captions and questions


def test_every_caption_is_true_of_its_scene(world):
    objects_of = scenes(world)
    forms = Counter()
    for image in karpathy(world):
        objects = objects_of[image["filename"]]
        for caption in (sentence["raw"] for sentence in image["sentences"]):
            form, true = judge(caption, objects)
            assert true, (image["filename"], caption, objects)
            forms[form] += 1
    assert min(forms.values()) >= 20 and len(forms) == 5, forms


def test_captions_of_an_image_are_varied_and_mention_its_relation(world):
    objects_of = scenes(world)
    for image in karpathy(world):
        captions = [sentence["raw"] for sentence in image["sentences"]]
        assert len(set(captions)) == 5, captions
        objects = objects_of[image["filename"]]
        describable = [o for o in objects if len(matching(objects, None, o.color, o.shape)) == 1
                       or len(matching(objects, o.size, o.color, o.shape)) == 1]
        if len(describable) >= 2:  # a pair that can be named has its relation said
            assert any(rel in caption for caption in captions for rel in RELATIONS), (image["filename"], captions)


def test_every_answer_is_true_of_its_scene(world):
    objects_of = scenes(world)
    images = {image["filename"]: image for image in karpathy(world)}
    kinds = Counter()
    for record in questions(world):
        assert record["answers"] == [record["answers"][0]] * 10
        name = Path(record["image"]).name
        assert record["image"] == f"Images/{name}" and (world / record["image"]).is_file()
        assert record["split"] == images[name]["split"]
        assert record["answer_type"] == {"yes/no": "yes/no", "count": "number"}.get(record["type"], "other")
        assert record["answers"][0] == answer_from_boxes(record["question"], objects_of[name]), record
        kinds[record["type"]] += 1
    assert set(kinds) == {"yes/no", "color", "count", "shape"}, kinds


def test_each_image_gets_one_yes_one_no_and_a_count_question(world):
    per_image: dict[str, list[dict]] = {}
    for record in questions(world):
        per_image.setdefault(record["image"], []).append(record)
    assert len(per_image) == 200
    for asked in per_image.values():
        types = Counter(record["type"] for record in asked)
        assert types["yes/no"] == 2 and types["count"] == 1 and types["color"] <= 1 and types["shape"] <= 1
        assert sorted(r["answers"][0] for r in asked if r["type"] == "yes/no") == ["no", "yes"]


def test_relation_questions_are_asked(world):
    """'which shape is to the left of the blue circle?' is one of the shape questions."""
    relational = [r for r in questions(world) if any(rel in r["question"] for rel in RELATIONS)]
    assert len(relational) >= 15
    assert {rel for r in relational for rel in RELATIONS if rel in r["question"]} == set(RELATIONS)


def test_answers_are_balanced_against_guessing(tmp_path):
    summary = make_shapes(tmp_path, ShapesConfig(images=400, seed=1, size=48))
    test_answers: dict[str, Counter] = {}
    for record in questions(tmp_path):
        if record["split"] == "test":
            test_answers.setdefault(record["type"], Counter())[record["answers"][0]] += 1
    recomputed = {kind: round(100 * max(c.values()) / sum(c.values()), 1) for kind, c in test_answers.items()}
    assert summary.majority_baseline == recomputed
    assert set(recomputed) == {"yes/no", "color", "count", "shape"}
    assert recomputed["yes/no"] < 60
    assert all(recomputed[kind] <= 35 for kind in ("color", "count", "shape")), recomputed
    assert len(test_answers["count"]) >= 4 and len(test_answers["color"]) >= 6, test_answers


# ---------------------------------------------------------------- near-miss twins


def test_twins_differ_from_their_source_by_a_colour_or_position_swap(world):
    images = karpathy(world)
    objects_of = scenes(world)
    twins = [image for image in images if "twin_of" in image]
    assert 0.15 * len(images) <= len(twins) <= 0.35 * len(images)
    assert {twin["variant"] for twin in twins} == {"color-swap", "position-swap"}
    sources = [twin["twin_of"] for twin in twins]
    assert len(set(sources)) == len(sources)  # one twin per source
    for twin in twins:
        source = images[twin["twin_of"]]
        assert source["imgid"] < twin["imgid"] and "twin_of" not in source
        assert source["split"] == twin["split"]  # near misses share a gallery
        a, b = objects_of[source["filename"]], objects_of[twin["filename"]]
        assert len(a) == len(b) >= 2
        changed = [k for k, (x, y) in enumerate(zip(a, b)) if x != y]
        assert len(changed) == 2, (twin, a, b)
        i, j = changed
        if twin["variant"] == "color-swap":
            assert a[i].color != a[j].color
            assert (b[i].color, b[j].color) == (a[j].color, a[i].color)
            assert [(o.shape, o.size, o.x, o.y) for o in a] == [(o.shape, o.size, o.x, o.y) for o in b]
        else:
            assert twin["variant"] == "position-swap"
            assert [(o.shape, o.color, o.size) for o in a] == [(o.shape, o.color, o.size) for o in b]
            assert (a[i].shape, a[i].color, a[i].size) != (a[j].shape, a[j].color, a[j].size)
            assert (b[i].cx, b[i].cy, b[j].cx, b[j].cy) == pytest.approx((a[j].cx, a[j].cy, a[i].cx, a[i].cy), abs=1)
        pictures = world / "Images"
        assert (pictures / source["filename"]).read_bytes() != (pictures / twin["filename"]).read_bytes()


def test_a_twin_is_told_apart_by_its_captions(world):
    """Some caption of each twin is false of its source, else retrieving the source would count as a miss."""
    images = karpathy(world)
    objects_of = scenes(world)
    for twin in (image for image in images if "twin_of" in image):
        source = images[twin["twin_of"]]
        captions = [sentence["raw"] for sentence in twin["sentences"]]
        assert set(captions) != {sentence["raw"] for sentence in source["sentences"]}
        false_of_source = [c for c in captions if not caption_is_true(c, objects_of[source["filename"]])]
        assert false_of_source, (twin["variant"], captions, objects_of[source["filename"]])


def test_twins_are_told_apart_in_a_larger_plan():
    """The rarer twins too (colour swaps of two same shapes, unsayable position swaps), without drawing."""
    specs = plan_images(ShapesConfig(images=1500, seed=7, size=SIZE))
    boxes = [[Box(o.shape, o.color, o.size, o.x, o.y, o.side) for o in spec.objects] for spec in specs]
    twins = [spec for spec in specs if spec.twin_of is not None]
    assert len(twins) >= 250
    for twin in twins:
        assert all(caption_is_true(caption, boxes[twin.index]) for caption in twin.captions), twin
        assert not all(caption_is_true(caption, boxes[twin.twin_of]) for caption in twin.captions), twin


# ---------------------------------------------------------------- settings and folders


def test_settings_shape_the_output(tmp_path):
    summary = make_shapes(tmp_path, ShapesConfig(images=40, seed=5, size=32, captions_per_image=3,
                                                 split=(0.5, 0.3), twin_fraction=0))
    assert summary.images == 40 and summary.captions == 120 and summary.splits == {"train": 20, "val": 12, "test": 8}
    images = karpathy(tmp_path)
    assert all(len(image["sentences"]) == 3 for image in images)
    assert not any("twin_of" in image for image in images)
    with Image.open(tmp_path / "Images" / images[0]["filename"]) as picture:
        assert picture.size == (32, 32)
    data = read_dataset(tmp_path)
    assert {split: len(paths) for split, paths in data.splits.items()} == {"train": 20, "val": 12, "test": 8}
    for split, name in SPLIT_FILES.items():
        assert (tmp_path / name).read_text().splitlines() == [i["filename"] for i in images if i["split"] == split]


@pytest.mark.parametrize("config, message", [
    (ShapesConfig(images=0), "--images must be at least 1"),
    (ShapesConfig(size=31), "--size must be at least 32"),
    (ShapesConfig(captions_per_image=0), "--captions-per-image must be at least 1"),
    (ShapesConfig(split=(0.9, 0.2)), "--split fractions"),
    (ShapesConfig(split=(-0.1, 0.5)), "--split fractions"),
    (ShapesConfig(twin_fraction=0.6), "--twin-fraction"),
    (ShapesConfig(twin_fraction=-0.1), "--twin-fraction"),
])
def test_bad_settings_are_user_errors_before_anything_is_written(tmp_path, config, message):
    with pytest.raises(UserError, match=message):
        make_shapes(tmp_path / "out", config)
    assert not (tmp_path / "out").exists()


def test_refuses_to_write_into_someone_elses_folder(tmp_path):
    (tmp_path / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(UserError, match="not empty"):
        make_shapes(tmp_path, ShapesConfig(images=5, size=48))
    assert [p.name for p in tmp_path.iterdir()] == ["holiday.jpg"]


def test_refuses_a_file_as_the_output_folder(tmp_path):
    (tmp_path / "shapes").write_text("a file")
    with pytest.raises(UserError, match="is a file"):
        make_shapes(tmp_path / "shapes", ShapesConfig(images=5, size=48))
    assert (tmp_path / "shapes").read_text() == "a file"


def test_an_empty_folder_is_fine(tmp_path):
    make_shapes(tmp_path, ShapesConfig(images=5, size=48))
    assert len(read_dataset(tmp_path).images) == 5


def test_rerun_into_an_old_output_leaves_exactly_a_fresh_output(tmp_path):
    """A smaller run into a previous output removes the stale images: the reader must not index them."""
    make_shapes(tmp_path / "old", ShapesConfig(images=30, seed=1, size=48))
    make_shapes(tmp_path / "old", ShapesConfig(images=10, seed=2, size=48))
    make_shapes(tmp_path / "fresh", ShapesConfig(images=10, seed=2, size=48))
    assert file_bytes(tmp_path / "old") == file_bytes(tmp_path / "fresh")
    assert [p.name for p in (tmp_path / "old").iterdir() if p.name.startswith(".")] == []
    data = read_dataset(tmp_path / "old")
    assert len(data.images) == 10 and len(data.captions) == 50
