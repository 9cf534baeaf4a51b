"""The shapes world: a generated dataset on which a tiny CLIP trained from scratch on CPU can learn.

Captions bind colours and sizes to shapes and state relations between objects, and a quarter of the
images are near-miss twins of an earlier one (colours or positions swapped), so a bag of words is not
enough to retrieve the right picture. VQA answers are balanced within each question type, so
guessing the commonest answer stays weak. The layout mimics Flickr8k, which the dataset reader
detects without options.
"""

from __future__ import annotations

import csv
import math
import random
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from vqa_search.core.atomic import atomic_path, write_json, write_json_lines, write_text
from vqa_search.core.errors import UserError

SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 20),
    "white": (250, 250, 250),
}
SIZES = {"small": 0.2, "large": 0.36}  # box side as a fraction of the image side
LEFT, RIGHT, ABOVE, BELOW = "to the left of", "to the right of", "above", "below"
OPPOSITE = {LEFT: RIGHT, RIGHT: LEFT, ABOVE: BELOW, BELOW: ABOVE}
NUMBER_WORDS = ("no", "one", "two", "three", "four")
MAX_OBJECTS = 4
SUPERSAMPLE = 2  # draw at twice the size and shrink: cheap antialiasing
PLACEMENT_TRIES = 200
REPEAT_SHAPE_CHANCE = 0.35  # repeated shapes give count questions answers above one
REPEAT_COLOR_CHANCE = 0.2
CLEAR_RATIO = 1.5  # a relation is clear when one axis dominates the other by this much
ANSWER_COPIES = 10  # VQA lists ten annotator answers per question
PNG_COMPRESS_LEVEL = 3  # twice as fast as the default 6, and no larger on these images
WRITER_THREADS = 8

MARKER_NAME = "dataset_shapes.json"
IMAGES_DIR = "Images"
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}
ANSWER_TYPES = {"yes/no": "yes/no", "color": "other", "count": "number", "shape": "other"}
SUGARCREPE_DIR = "sugarcrepe"  # swap_att.json ... in SugarCrepe's format, for `bench compositional`
SUGARCREPE_FILES = ("swap_att", "swap_obj", "replace_att", "replace_obj")
WINOGROUND_FILE = "winoground.jsonl"  # twin pairs in Winoground's format


@dataclass
class ShapesConfig:
    images: int = 4000
    seed: int = 0
    size: int = 96
    captions_per_image: int = 5
    split: tuple[float, float] = (0.8, 0.1)  # train, val fractions; rest test
    twin_fraction: float = 0.25  # share of twins aimed for; scenes with no valid swap lower it (20.6% at 4,000)


@dataclass
class ShapesSummary:
    out: Path
    images: int
    captions: int
    questions: int
    seconds: float
    splits: dict[str, int]
    # question type -> accuracy (%) of always giving the test split's commonest answer of that type
    majority_baseline: dict[str, float]


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    x: int  # left edge of the square box, pixels
    y: int  # top edge
    side: int

    @property
    def center(self) -> tuple[float, float]:
        return self.x + self.side / 2, self.y + self.side / 2

    def moved_to(self, center: tuple[float, float]) -> SceneObject:
        return replace(self, x=round(center[0] - self.side / 2), y=round(center[1] - self.side / 2))


@dataclass
class ImageSpec:
    """Everything about one image, decided before any pixel is drawn."""

    index: int
    split: str
    objects: list[SceneObject]
    gray: int  # background level
    texture_seed: int | None  # None for a plain background; twins reuse their source's texture
    relation_pair: tuple[int, int] | None = None  # the objects the relation caption is about
    twin_of: int | None = None
    variant: str | None = None
    captions: list[str] = field(default_factory=list)
    questions: list[dict] = field(default_factory=list)

    @property
    def filename(self) -> str:
        return f"shape_{self.index:06d}.png"


def make_shapes(out: Path | str, config: ShapesConfig = ShapesConfig(), progress: bool = False) -> ShapesSummary:
    """Generate the dataset into `out`; the same config always gives byte-identical files."""
    started = time.perf_counter()
    _validate(config)
    out = Path(out)
    _prepare_out(out)
    specs = plan_images(config)
    # The marker goes first so that an interrupted run can be repeated into the same folder.
    write_json(out / MARKER_NAME, karpathy_json(specs))
    _write_images(out / IMAGES_DIR, specs, config, progress)
    _remove_stale_images(out / IMAGES_DIR, specs)
    _write_captions(out / "captions.txt", specs)
    _write_split_files(out, specs)
    _write_questions(out / "vqa.jsonl", specs)
    write_json(out / "boxes.json", coco_boxes(specs, config.size))
    _write_compositional(out, specs, config.seed)
    return ShapesSummary(
        out=out,
        images=len(specs),
        captions=sum(len(spec.captions) for spec in specs),
        questions=sum(len(spec.questions) for spec in specs),
        seconds=time.perf_counter() - started,
        splits={split: sum(spec.split == split for spec in specs) for split in SPLIT_FILES},
        majority_baseline=majority_baseline(specs),
    )


def _validate(config: ShapesConfig) -> None:
    if config.images < 1:
        raise UserError(f"--images must be at least 1, got {config.images}")
    if config.size < 32:
        raise UserError(f"--size must be at least 32 pixels so small shapes stay recognisable, got {config.size}")
    if config.captions_per_image < 1:
        raise UserError(f"--captions-per-image must be at least 1, got {config.captions_per_image}")
    train, val = config.split
    if min(train, val) < 0 or train + val > 1:
        raise UserError(f"--split fractions must be non-negative and sum to at most 1, got {train}, {val}")
    if not 0 <= config.twin_fraction <= 0.5:
        raise UserError(f"--twin-fraction must be between 0 and 0.5 (a twin needs a source), got {config.twin_fraction}")


def _prepare_out(out: Path) -> None:
    """Overwrite only a previous shapes output: never mix generated files into someone's photos."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a folder for the shapes dataset")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER_NAME).is_file():
        raise UserError(f"{out} is not empty and holds no {MARKER_NAME}; choose a new or empty folder")
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------- planning


def plan_images(config: ShapesConfig) -> list[ImageSpec]:
    """Scenes, captions and questions for every image, from one seeded generator in a fixed order."""
    rng = random.Random(config.seed)
    splits = assign_splits(config.images, config.split, rng)
    tallies: dict[tuple[str, str], Counter] = {}
    # Per split, so twins and their sources share a gallery; one twin per source, so no two twins repeat.
    last_base: dict[str, ImageSpec] = {}
    # Each twin uses up its source, so twinning a waiting source with chance f / (1 - f) makes about f twins.
    twin_chance = config.twin_fraction / (1 - config.twin_fraction)
    specs = []
    for index, split in enumerate(splits):
        spec = None
        if split in last_base and rng.random() < twin_chance:
            spec = make_twin(last_base.pop(split), index, config.size, rng)
        if spec is None:
            spec = make_base(index, split, config.size, rng)
            if len(spec.objects) >= 2:
                last_base[split] = spec
        spec.captions = write_captions(spec, config.captions_per_image, rng)
        spec.questions = ask_questions(spec.objects, rng, tallies, split)
        specs.append(spec)
    return specs


def assign_splits(count: int, fractions: tuple[float, float], rng: random.Random) -> list[str]:
    train = round(count * fractions[0])
    val = min(round(count * fractions[1]), count - train)
    labels = ["train"] * train + ["val"] * val + ["test"] * (count - train - val)
    rng.shuffle(labels)
    return labels


def make_base(index: int, split: str, size: int, rng: random.Random) -> ImageSpec:
    objects = sample_scene(size, rng)
    texture_seed = index if rng.random() < 0.5 else None
    spec = ImageSpec(index, split, objects, gray=rng.randint(105, 150), texture_seed=texture_seed)
    spec.relation_pair = choose_relation_pair(objects, None, rng)
    return spec


def sample_scene(size: int, rng: random.Random) -> list[SceneObject]:
    objects: list[SceneObject] = []
    for _ in range(rng.randint(1, MAX_OBJECTS)):
        placed = place_object(_sample_attributes(objects, rng), objects, size, rng)
        if placed:
            objects.append(placed)
    return objects


def _sample_attributes(objects: list[SceneObject], rng: random.Random) -> tuple[str, str, str]:
    shape = rng.choice(objects).shape if objects and rng.random() < REPEAT_SHAPE_CHANCE else rng.choice(SHAPES)
    color = rng.choice(objects).color if objects and rng.random() < REPEAT_COLOR_CHANCE else rng.choice(list(COLORS))
    return shape, color, rng.choice(list(SIZES))


def place_object(attributes: tuple[str, str, str], objects: list[SceneObject], size: int,
                 rng: random.Random) -> SceneObject | None:
    """Rejection sampling on boxes; a large shape that does not fit is tried small before giving up."""
    shape, color, size_name = attributes
    for name in dict.fromkeys([size_name, "small"]):
        side = round(SIZES[name] * size)
        for _ in range(PLACEMENT_TRIES):
            candidate = SceneObject(shape, color, name, rng.randint(1, size - side - 1), rng.randint(1, size - side - 1), side)
            if fits(candidate, objects, size):
                return candidate
    return None


def fits(candidate: SceneObject, others: list[SceneObject], size: int) -> bool:
    """Inside the image, with a gap to every other box so no two shapes touch."""
    gap = max(2, size // 32)
    inside = candidate.x >= 1 and candidate.y >= 1 and max(candidate.x, candidate.y) + candidate.side <= size - 1
    return inside and not any(
        candidate.x < other.x + other.side + gap and other.x < candidate.x + candidate.side + gap
        and candidate.y < other.y + other.side + gap and other.y < candidate.y + candidate.side + gap
        for other in others
    )


def make_twin(source: ImageSpec, index: int, size: int, rng: random.Random) -> ImageSpec | None:
    """A near miss of `source`: the same objects with two colours or two positions swapped."""
    variants = ["color-swap", "position-swap"]
    rng.shuffle(variants)
    for variant in variants:
        objects = swap_colors(source.objects, rng) if variant == "color-swap" else swap_positions(source, size, rng)
        if objects:
            spec = replace(source, index=index, objects=objects, twin_of=source.index, variant=variant,
                           captions=[], questions=[])
            # Only the swapped pair's relation tells a position swap apart, so that is the pair captioned.
            moved = tuple(k for k, (old, new) in enumerate(zip(source.objects, objects)) if old != new)
            preferred = moved if variant == "position-swap" else source.relation_pair
            spec.relation_pair = choose_relation_pair(objects, preferred, rng)
            return spec
    return None


def swap_colors(objects: list[SceneObject], rng: random.Random) -> list[SceneObject] | None:
    """Two different shapes: 'red circle, blue square' becomes 'blue circle, red square'.

    Swapping the colours of two circles is a position swap in disguise that the listing cannot tell.
    """
    pairs = [(i, j) for i, j in _pairs(objects) if objects[i].color != objects[j].color]
    different_shapes = [(i, j) for i, j in pairs if objects[i].shape != objects[j].shape]
    if not different_shapes:
        return None
    i, j = rng.choice(different_shapes)
    swapped = list(objects)
    swapped[i], swapped[j] = replace(objects[i], color=objects[j].color), replace(objects[j], color=objects[i].color)
    return swapped


def swap_positions(source: ImageSpec, size: int, rng: random.Random) -> list[SceneObject] | None:
    """Swap the centres of two objects a caption can name, the captioned pair first so its relation flips."""
    objects = source.objects
    pairs = _describable_pairs(objects)
    rng.shuffle(pairs)
    if source.relation_pair in pairs:
        pairs.insert(0, pairs.pop(pairs.index(source.relation_pair)))
    for i, j in pairs:
        swapped = list(objects)
        swapped[i], swapped[j] = objects[i].moved_to(objects[j].center), objects[j].moved_to(objects[i].center)
        if all(fits(obj, swapped[:k] + swapped[k + 1:], size) for k, obj in enumerate(swapped)):
            return swapped
    return None


def _pairs(objects: list[SceneObject]) -> list[tuple[int, int]]:
    return [(i, j) for i in range(len(objects)) for j in range(i + 1, len(objects))]


# ---------------------------------------------------------------- geometry and wording


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where `a` is relative to `b`, along the axis on which their centres differ most (y grows down)."""
    (ax, ay), (bx, by) = a.center, b.center
    if abs(ax - bx) >= abs(ay - by):
        return LEFT if ax < bx else RIGHT
    return ABOVE if ay < by else BELOW


def is_clear(a: SceneObject, b: SceneObject) -> bool:
    """True when one axis dominates, so a person would name the same relation as `relation`."""
    (ax, ay), (bx, by) = a.center, b.center
    dx, dy = abs(ax - bx), abs(ay - by)
    return max(dx, dy) >= CLEAR_RATIO * min(dx, dy)


def _phrase(obj: SceneObject, with_size: bool) -> str:
    return f"{obj.size} {obj.color} {obj.shape}" if with_size else f"{obj.color} {obj.shape}"


def unique_phrase(obj: SceneObject, objects: list[SceneObject], rng: random.Random | None = None) -> str | None:
    """The shortest noun phrase naming only `obj` in the scene (sometimes with a spare size), or None."""
    for with_size in (False, True):
        phrase = _phrase(obj, with_size)
        if sum(_phrase(other, with_size) == phrase for other in objects) == 1:
            return _phrase(obj, True) if rng and rng.random() < 0.3 else phrase
    return None


def with_article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def plural(shape: str) -> str:
    return f"{shape}s"


def join_and(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def counted(count: int, noun: str) -> str:
    """'a circle', 'two circles': how captions name a number of things."""
    return with_article(noun) if count == 1 else f"{NUMBER_WORDS[count]} {plural(noun)}"


def choose_relation_pair(objects: list[SceneObject], preferred: tuple[int, int] | None,
                         rng: random.Random) -> tuple[int, int] | None:
    """A pair whose members can be named uniquely; a twin keeps its source's pair to make a minimal contrast."""
    pairs = _describable_pairs(objects)
    if preferred in pairs:
        return preferred
    clear = [(i, j) for i, j in pairs if is_clear(objects[i], objects[j])]
    return rng.choice(clear or pairs) if pairs else None


# ---------------------------------------------------------------- captions

RELATION_TEMPLATES = ("{a} {rel} {b}", "{a} is {rel} {b}", "there is {a} {rel} {b}")
EXISTENCE_TEMPLATES = ("there is {a}", "a picture of {a}", "{a} on a gray background", "an image with {a}", "{a}")
LISTING_TEMPLATES = ("{n} shapes: {parts}", "{n} objects on a gray background: {parts}", "a gray picture with {parts}")


def write_captions(spec: ImageSpec, count: int, rng: random.Random) -> list[str]:
    """A listing, the relation of the chosen pair, groups, then shuffled extras; exactly `count`."""
    objects = spec.objects
    pool = [listing_caption(objects, rng)]
    if spec.relation_pair:
        pool.append(relation_caption(objects, spec.relation_pair, rng))
    pool += group_captions(objects)
    extras = [listing_caption(objects, rng)]
    extras += [relation_caption(objects, (i, j), rng)
               for i, j in _describable_pairs(objects) if is_clear(objects[i], objects[j])]
    extras += [template.format(a=with_article(_phrase(obj, rng.random() < 0.5)))
               for obj in objects for template in EXISTENCE_TEMPLATES]
    rng.shuffle(extras)
    unique = list(dict.fromkeys(pool + extras))
    chosen = [unique[k % len(unique)] for k in range(count)]
    rng.shuffle(chosen)
    return chosen


def _describable_pairs(objects: list[SceneObject]) -> list[tuple[int, int]]:
    return [(i, j) for i, j in _pairs(objects)
            if unique_phrase(objects[i], objects) and unique_phrase(objects[j], objects)]


def listing_caption(objects: list[SceneObject], rng: random.Random) -> str:
    if len(objects) == 1:
        return f"a single {_phrase(objects[0], rng.random() < 0.5)}"
    parts = [with_article(_phrase(obj, rng.random() < 0.5)) for obj in rng.sample(objects, len(objects))]
    template = rng.choice(LISTING_TEMPLATES)
    return template.format(n=NUMBER_WORDS[len(objects)], parts=join_and(parts))


def relation_caption(objects: list[SceneObject], pair: tuple[int, int], rng: random.Random) -> str:
    """Either member may come first; `relation` is antisymmetric, so both readings are true."""
    first, second = (objects[k] for k in rng.sample(pair, 2))
    return rng.choice(RELATION_TEMPLATES).format(
        a=with_article(unique_phrase(first, objects, rng)),
        rel=relation(first, second),
        b=with_article(unique_phrase(second, objects, rng)),
    )


def group_captions(objects: list[SceneObject]) -> list[str]:
    """'two triangles, one green and one yellow', 'two red shapes: a circle and a star'."""
    captions = []
    for shape, members in _groups(objects, "shape"):
        colors = Counter(obj.color for obj in members)
        if len(colors) == 1:
            captions.append(f"{NUMBER_WORDS[len(members)]} {members[0].color} {plural(shape)}")
        else:
            parts = [f"{NUMBER_WORDS[n]} {color}" for color, n in colors.items()]
            captions.append(f"{NUMBER_WORDS[len(members)]} {plural(shape)}, {join_and(parts)}")
    for color, members in _groups(objects, "color"):
        shapes = Counter(obj.shape for obj in members)
        if len(shapes) > 1:
            parts = [counted(n, shape) for shape, n in shapes.items()]
            captions.append(f"{NUMBER_WORDS[len(members)]} {color} shapes: {join_and(parts)}")
    return captions


def _groups(objects: list[SceneObject], attribute: str) -> list[tuple[str, list[SceneObject]]]:
    """Attribute values shared by two or more objects, in order of first appearance."""
    values = Counter(getattr(obj, attribute) for obj in objects)
    return [(value, [obj for obj in objects if getattr(obj, attribute) == value])
            for value, n in values.items() if n >= 2]


# ---------------------------------------------------------------- questions


def ask_questions(objects: list[SceneObject], rng: random.Random,
                  tallies: dict[tuple[str, str], Counter], split: str) -> list[dict]:
    """One yes and one no question, then a colour, a count and a shape question when one is answerable."""
    yes_no = [_yes_no_question(objects, rng, answer) for answer in ("yes", "no")]
    rng.shuffle(yes_no)
    asked = [("yes/no", question, answer) for question, answer in yes_no]
    for kind, candidates in (("color", color_questions(objects)), ("count", count_questions(objects)),
                             ("shape", shape_questions(objects))):
        picked = pick_balanced(candidates, tallies.setdefault((split, kind), Counter()), rng)
        if picked:
            asked.append((kind, *picked))
    return [{"question": question, "answer": answer, "type": kind} for kind, question, answer in asked]


def pick_balanced(candidates: list[tuple[str, str]], tally: Counter,
                  rng: random.Random) -> tuple[str, str] | None:
    """Ask for the answer given least often so far, so the commonest answer stays a weak guess."""
    if not candidates:
        return None
    least = min(tally[answer] for _, answer in candidates)
    picked = rng.choice([candidate for candidate in candidates if tally[candidate[1]] == least])
    tally[picked[1]] += 1
    return picked


QUERY_FORMS = (("shape",), ("color", "shape"), ("size", "color", "shape"))


def _yes_no_question(objects: list[SceneObject], rng: random.Random, answer: str) -> tuple[str, str]:
    """'no' asks about a near miss of a present object (one attribute changed), so words alone don't tell."""
    form = rng.choice(QUERY_FORMS)
    described = rng.choice(objects)
    query = {name: getattr(described, name) for name in form}
    if answer == "no":
        query = _absent_variant(query, objects, rng)
    return f"is there {with_article(' '.join(query[name] for name in form))}?", answer


def _absent_variant(query: dict[str, str], objects: list[SceneObject], rng: random.Random) -> dict[str, str]:
    choices = {"shape": list(SHAPES), "color": list(COLORS), "size": list(SIZES)}
    variants = [{**query, name: value} for name in query for value in choices[name] if value != query[name]]
    rng.shuffle(variants)
    return next(variant for variant in variants if not any(_matches(obj, variant) for obj in objects))


def _matches(obj: SceneObject, query: dict[str, str]) -> bool:
    return all(getattr(obj, name) == value for name, value in query.items())


def color_questions(objects: list[SceneObject]) -> list[tuple[str, str]]:
    candidates = []
    for obj in objects:
        if sum(other.shape == obj.shape for other in objects) == 1:
            candidates.append((f"what color is the {obj.shape}?", obj.color))
        elif sum(_matches(other, {"size": obj.size, "shape": obj.shape}) for other in objects) == 1:
            candidates.append((f"what color is the {obj.size} {obj.shape}?", obj.color))
    return candidates


def count_questions(objects: list[SceneObject]) -> list[tuple[str, str]]:
    """Every shape and colour, present or not, so 'none' is as askable as any other number."""
    candidates = [("how many shapes are there?", str(len(objects)))]
    candidates += [(f"how many {plural(shape)} are there?", str(sum(obj.shape == shape for obj in objects)))
                   for shape in SHAPES]
    candidates += [(f"how many {color} shapes are there?", str(sum(obj.color == color for obj in objects)))
                   for color in COLORS]
    return candidates


def shape_questions(objects: list[SceneObject]) -> list[tuple[str, str]]:
    """'which shape is red?' and 'which shape is above the blue circle?', only with a single answer."""
    candidates = [(f"which shape is {obj.color}?", obj.shape)
                  for obj in objects if sum(other.color == obj.color for other in objects) == 1]
    for reference in objects:
        name = unique_phrase(reference, objects)
        if name is None:
            continue
        for rel in OPPOSITE:
            related = [obj for obj in objects if obj is not reference and relation(obj, reference) == rel]
            if len(related) == 1 and is_clear(related[0], reference):
                candidates.append((f"which shape is {rel} the {name}?", related[0].shape))
    return candidates


def majority_baseline(specs: list[ImageSpec]) -> dict[str, float]:
    """Per question type, the test accuracy (%) of always answering the commonest test answer.

    That is an upper bound for any language-only constant guess; all images count when the test
    split is empty.
    """
    test = [spec for spec in specs if spec.split == "test"] or specs
    answers: dict[str, Counter] = {}
    for spec in test:
        for question in spec.questions:
            answers.setdefault(question["type"], Counter())[question["answer"]] += 1
    return {kind: round(100 * max(counts.values()) / sum(counts.values()), 1)
            for kind, counts in sorted(answers.items())}


# ---------------------------------------------------------------- drawing


def render(spec: ImageSpec, size: int) -> Image.Image:
    big = size * SUPERSAMPLE
    canvas = _background(spec, big)
    draw = ImageDraw.Draw(canvas)
    for obj in spec.objects:
        _draw_object(draw, obj)
    return canvas.reduce(SUPERSAMPLE)


def _background(spec: ImageSpec, side: int) -> Image.Image:
    if spec.texture_seed is None:
        return Image.new("RGB", (side, side), (spec.gray,) * 3)
    noise = np.random.default_rng(spec.texture_seed).normal(0, 10, (side, side))
    pixels = np.clip(spec.gray + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "L").convert("RGB")


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    left, top, side = obj.x * SUPERSAMPLE, obj.y * SUPERSAMPLE, obj.side * SUPERSAMPLE
    fill = COLORS[obj.color]
    box = (left, top, left + side - 1, top + side - 1)
    if obj.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif obj.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon(outline(obj.shape, left, top, side), fill=fill)


def outline(shape: str, left: float, top: float, side: float) -> list[tuple[float, float]]:
    """Corner points of the polygon shapes inside the box (left, top, side)."""
    cx, cy, r = left + side / 2, top + side / 2, side / 2
    if shape == "triangle":
        return [(cx, top), (left + side, top + side), (left, top + side)]
    if shape == "diamond":
        return [(cx, top), (left + side, cy), (cx, top + side), (left, cy)]
    if shape == "star":
        radii = [r if k % 2 == 0 else r * 0.45 for k in range(10)]
        angles = [math.radians(-90 + 36 * k) for k in range(10)]
        return [(cx + radius * math.cos(a), cy + r * 0.1 + radius * math.sin(a)) for radius, a in zip(radii, angles)]
    raise ValueError(f"no outline for {shape}")


# ---------------------------------------------------------------- writing


def _write_images(images_dir: Path, specs: list[ImageSpec], config: ShapesConfig, progress: bool) -> None:
    """Threads, because writing is bound by the fsync of each atomic file, not by drawing."""
    write = partial(_write_image, images_dir, config.size)
    with ThreadPoolExecutor(WRITER_THREADS) as pool:
        for _ in tqdm(pool.map(write, specs), total=len(specs), desc="drawing shapes", unit="image",
                      disable=not progress):
            pass


def _write_image(images_dir: Path, size: int, spec: ImageSpec) -> None:
    with atomic_path(images_dir / spec.filename) as temp:
        render(spec, size).save(temp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def _remove_stale_images(images_dir: Path, specs: list[ImageSpec]) -> None:
    """A smaller run into an old output must not leave extra images for the reader to index."""
    current = {spec.filename for spec in specs}
    for path in images_dir.glob("shape_*.png"):
        if path.name not in current:
            path.unlink()


def _write_captions(target: Path, specs: list[ImageSpec]) -> None:
    with atomic_path(target) as temp, open(temp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows((spec.filename, caption) for spec in specs for caption in spec.captions)


def _write_split_files(out: Path, specs: list[ImageSpec]) -> None:
    for split, name in SPLIT_FILES.items():
        write_text(out / name, "".join(f"{spec.filename}\n" for spec in specs if spec.split == split))


def _write_questions(target: Path, specs: list[ImageSpec]) -> None:
    write_json_lines(target, (vqa_record(spec, question) for spec in specs for question in spec.questions))


def vqa_record(spec: ImageSpec, question: dict) -> dict:
    return {
        "image": f"{IMAGES_DIR}/{spec.filename}",
        "question": question["question"],
        "answers": [question["answer"]] * ANSWER_COPIES,
        "type": question["type"],
        "answer_type": ANSWER_TYPES[question["type"]],
        "split": spec.split,
    }


def tokenize(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def karpathy_json(specs: list[ImageSpec]) -> dict:
    """Karpathy-style captions; twins also name their source so near-miss retrieval can be scored."""
    images, sentid = [], 0
    for spec in specs:
        sentences = [{"raw": raw, "tokens": tokenize(raw), "imgid": spec.index, "sentid": sentid + k}
                     for k, raw in enumerate(spec.captions)]
        entry = {"imgid": spec.index, "filename": spec.filename, "split": spec.split,
                 "sentids": [s["sentid"] for s in sentences], "sentences": sentences}
        if spec.twin_of is not None:
            entry.update(twin_of=spec.twin_of, variant=spec.variant)
        images.append(entry)
        sentid += len(sentences)
    return {"dataset": "shapes", "images": images}


def coco_boxes(specs: list[ImageSpec], size: int) -> dict:
    category_ids = {shape: k + 1 for k, shape in enumerate(SHAPES)}
    annotations = []
    for spec in specs:
        for obj in spec.objects:
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": spec.index,
                "category_id": category_ids[obj.shape],
                "bbox": [obj.x, obj.y, obj.side, obj.side],
                "area": obj.side * obj.side,
                "iscrowd": 0,
                "attributes": {"color": obj.color, "size": obj.size},
            })
    return {
        "images": [{"id": spec.index, "file_name": spec.filename, "width": size, "height": size} for spec in specs],
        "annotations": annotations,
        "categories": [{"id": k, "name": shape, "supercategory": "shape"} for shape, k in category_ids.items()],
    }



# ---------------------------------------------------------------- compositional benchmarks


@dataclass(frozen=True)
class Claim:
    """A caption as a checkable statement: 'there is a red circle' or 'a red circle <rel> a blue square'.

    Objects are named by colour and shape only; a relation needs each name to fit exactly one object.
    """

    a: tuple[str, str]  # colour, shape
    rel: str | None = None
    b: tuple[str, str] | None = None

    @property
    def text(self) -> str:
        first = with_article(" ".join(self.a))
        return f"there is {first}" if self.rel is None else f"{first} {self.rel} {with_article(' '.join(self.b))}"

    def holds(self, objects: list[SceneObject]) -> bool:
        named = lambda name: [obj for obj in objects if (obj.color, obj.shape) == name]  # noqa: E731
        if self.rel is None:
            return bool(named(self.a))
        first, second = named(self.a), named(self.b)
        return (len(first) == len(second) == 1 and first[0] is not second[0]
                and relation(first[0], second[0]) == self.rel)


def _name(obj: SceneObject) -> tuple[str, str]:
    return obj.color, obj.shape


def sugarcrepe_candidates(objects: list[SceneObject]) -> dict[str, list[tuple[Claim, Claim]]]:
    """Every (true caption, false caption) pair of each SugarCrepe category for one scene.

    swap_att: the colours of two objects swapped in a relation caption; swap_obj: the two objects of
    a left/right relation swapped; replace_att / replace_obj: one object's colour / shape replaced
    by one no object of that shape / colour has.
    """
    pairs = [(i, j) for i in range(len(objects)) for j in range(len(objects))
             if i != j and is_clear(objects[i], objects[j])]
    found: dict[str, list[tuple[Claim, Claim]]] = {name: [] for name in SUGARCREPE_FILES}
    for i, j in pairs:
        a, b = objects[i], objects[j]
        rel = relation(a, b)
        true = Claim(_name(a), rel, _name(b))
        if a.color != b.color and a.shape != b.shape:
            found["swap_att"].append((true, Claim((b.color, a.shape), rel, (a.color, b.shape))))
        if rel in (LEFT, RIGHT):
            found["swap_obj"].append((true, Claim(_name(b), rel, _name(a))))
    for obj in dict.fromkeys(_name(obj) for obj in objects):  # each colour-shape name once, in scene order
        color, shape = obj
        found["replace_att"] += [(Claim(obj), Claim((other, shape))) for other in COLORS if other != color]
        found["replace_obj"] += [(Claim(obj), Claim((color, other))) for other in SHAPES if other != shape]
    return {name: [(true, false) for true, false in candidates if true.holds(objects) and not false.holds(objects)]
            for name, candidates in found.items()}


def winoground_pair(source: ImageSpec, twin: ImageSpec) -> tuple[Claim, Claim] | None:
    """Captions for (source, twin) with the same words in another order, each true of its own image only.

    The twin's two changed objects are the ones captioned: a colour swap swaps their colours in the
    caption, a position swap swaps the two names around the source's relation.
    """
    changed = [k for k, (old, new) in enumerate(zip(source.objects, twin.objects)) if old != new]
    if len(changed) != 2:
        return None
    a, b = (source.objects[k] for k in changed)
    if not is_clear(a, b):
        return None
    rel = relation(a, b)
    first = Claim(_name(a), rel, _name(b))
    second = (Claim((b.color, a.shape), rel, (a.color, b.shape)) if twin.variant == "color-swap"
              else Claim(_name(b), rel, _name(a)))
    valid = (first.holds(source.objects) and not first.holds(twin.objects)
             and second.holds(twin.objects) and not second.holds(source.objects))
    return (first, second) if valid else None


def compositional_sets(specs: list[ImageSpec], seed: int) -> tuple[dict[str, dict], list[dict]]:
    """SugarCrepe files (one true and one false caption per test image and category, where the scene
    allows one) and Winoground pairs (the test split's twins with their sources).

    Choices come from their own generator, so the rest of the dataset is the same with or without them.
    """
    rng = random.Random(f"compositional {seed}")
    sugarcrepe: dict[str, dict] = {name: {} for name in SUGARCREPE_FILES}
    test = [spec for spec in specs if spec.split == "test"]
    for spec in test:
        for name, candidates in sugarcrepe_candidates(spec.objects).items():
            if candidates:
                true, false = rng.choice(candidates)
                sugarcrepe[name][str(len(sugarcrepe[name]))] = {
                    "filename": f"{IMAGES_DIR}/{spec.filename}", "caption": true.text, "negative_caption": false.text}
    winoground = []
    for twin in (spec for spec in test if spec.twin_of is not None):
        source = specs[twin.twin_of]
        pair = winoground_pair(source, twin)
        if pair:
            winoground.append({"id": len(winoground), "caption_0": pair[0].text, "caption_1": pair[1].text,
                               "image_0": f"{IMAGES_DIR}/{source.filename}", "image_1": f"{IMAGES_DIR}/{twin.filename}",
                               "tag": twin.variant})
    return sugarcrepe, winoground


def _write_compositional(out: Path, specs: list[ImageSpec], seed: int) -> None:
    sugarcrepe, winoground = compositional_sets(specs, seed)
    (out / SUGARCREPE_DIR).mkdir(exist_ok=True)
    for name, items in sugarcrepe.items():
        write_json(out / SUGARCREPE_DIR / f"{name}.json", items)
    write_json_lines(out / WINOGROUND_FILE, winoground)
