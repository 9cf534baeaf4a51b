"""`bench compositional`: SugarCrepe and Winoground scores, the readers, and the shapes world's files.

Scores are compared with a naive loop that embeds each caption and image of an item on its own (and,
with a re-ranker, runs the model's forward on that one pair); the shapes world's captions are judged
against boxes.json with test_shapes.py's own geometry, not with the generator's helpers.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vqa_search.align.compositional import CompositionalConfig, run_compositional
from vqa_search.align.region_store import RegionSet, compute_regions
from vqa_search.align.regions import RegionConfig
from vqa_search.align.rerank import caption_tokens
from vqa_search.align.reranker import save_reranker
from vqa_search.cli import app
from vqa_search.core.encode import encode_images, encode_texts
from vqa_search.core.errors import UserError
from vqa_search.core.identity import TINY_MODEL, resolve_identity
from vqa_search.core.images import load_named_image
from vqa_search.core.models import load_clip
from vqa_search.indexer.build import BuildConfig, build_index
from vqa_search.retrieval.compositional import (SUGARCREPE_CHANCE, WINOGROUND_CHANCE, markdown_table,
                                                read_compositional, winoground_outcomes, winoground_scores)
from vqa_search.retrieval.searcher import Index
from vqa_search.shapes import SUGARCREPE_FILES, ShapesConfig, make_shapes, plan_images

from conftest import COLOURS, tiny_config, write_photo
from test_rerank import trained_like
from test_shapes import caption_is_true, karpathy, scenes

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = {"model": TINY_MODEL, "pretrained": "none", "workers": 0, "progress": False}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A shapes world, most of it test split, indexed by the tiny random CLIP with patch-token regions."""
    root = tmp_path_factory.mktemp("compositional") / "shapes"
    make_shapes(root, ShapesConfig(images=80, size=32, seed=4, split=(0.2, 0.0)))
    build_index(root, BuildConfig(**tiny_config()))
    compute_regions(root, RegionConfig(source="clip-patches", workers=0, progress=False))
    return root


def sugarcrepe_items(world) -> list[tuple[str, dict]]:
    return [(name, item) for name in SUGARCREPE_FILES
            for item in json.loads((world / "sugarcrepe" / f"{name}.json").read_text()).values()]


def winoground_items(world) -> list[dict]:
    return [json.loads(line) for line in (world / "winoground.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- scoring rules


def test_winoground_scores_on_a_hand_made_matrix():
    # s[caption, image]. text_only: each image prefers its own caption, but caption 0 prefers image 1.
    text_only = np.array([[0.9, 0.95], [0.1, 0.96]])
    both = np.array([[0.9, 0.2], [0.1, 0.8]])
    tie = np.array([[0.5, 0.5], [0.5, 0.5]])
    outcomes = winoground_outcomes(np.stack([text_only, both, tie]))
    assert outcomes["text"].tolist() == [True, True, False]
    assert outcomes["image"].tolist() == [False, True, False]
    assert outcomes["group"].tolist() == [False, True, False]
    assert winoground_scores(text_only[None]) == {"text": 100.0, "image": 0.0, "group": 0.0}
    image_only = np.array([[0.9, 0.1], [0.95, 0.96]])  # s(c1,i0) > s(c0,i0): text fails, image holds
    assert winoground_scores(image_only[None]) == {"text": 0.0, "image": 100.0, "group": 0.0}


def test_chance_levels():
    assert SUGARCREPE_CHANCE == 50.0
    assert WINOGROUND_CHANCE == pytest.approx({"text": 25.0, "image": 25.0, "group": 100 / 6})
    # The chance levels are what random scores earn: Winoground's group is 4 of the 24 orderings.
    scores = np.random.default_rng(0).normal(size=(200_000, 2, 2))
    measured = winoground_scores(scores)
    assert measured == pytest.approx(WINOGROUND_CHANCE, abs=0.5)


# ---------------------------------------------------------------- readers


def test_sugarcrepe_reader_takes_a_folder_of_files_one_category_each(tmp_path):
    write_photo(tmp_path / "images" / "a.jpg", COLOURS[0])
    write_photo(tmp_path / "images" / "b.jpg", COLOURS[1])
    folder = tmp_path / "sugarcrepe"
    folder.mkdir()
    (folder / "swap_att.json").write_text(json.dumps({
        "0": {"filename": "a.jpg", "caption": "a red cat on a black couch",
              "negative_caption": "a black cat on a red couch"},
        "7": {"filename": "b.jpg", "caption": "x", "negative_caption": "y"}}))
    (folder / "replace_rel.json").write_text(json.dumps({
        "0": {"filename": "a.jpg", "caption": "a cat on a couch", "negative_caption": "a cat under a couch"}}))

    data = read_compositional(folder, tmp_path / "images")

    assert data.benchmark == "sugarcrepe" and data.categories == ["replace_rel", "swap_att"]
    assert [path.name for path in data.images] == ["a.jpg", "b.jpg"]  # each image once
    assert [(category, data.texts[c], data.texts[n], data.images[i].name) for category, c, n, i in data.items] == [
        ("replace_rel", "a cat on a couch", "a cat under a couch", "a.jpg"),
        ("swap_att", "a red cat on a black couch", "a black cat on a red couch", "a.jpg"),
        ("swap_att", "x", "y", "b.jpg")]
    assert data.pairs()[:, 0].tolist() == [0, 1, 2, 3, 4, 5]
    scores, counts, chance = data.evaluate(np.array([1.0, 0.0, 0.0, 1.0, 0.3, 0.3]))  # a tie is a failure
    assert scores == {"replace_rel": 100.0, "swap_att": 0.0}
    assert counts == {"replace_rel": 1, "swap_att": 2} and chance == {"replace_rel": 50.0, "swap_att": 50.0}
    single = read_compositional(folder / "swap_att.json", tmp_path / "images")
    assert single.categories == ["swap_att"] and len(single.items) == 2


@pytest.mark.parametrize("layout", ["jsonl", "json list"])
def test_winoground_reader_takes_its_release_and_a_json_list(tmp_path, layout):
    write_photo(tmp_path / "images" / "ex_0_img_0.png", COLOURS[0])
    write_photo(tmp_path / "images" / "ex_0_img_1.jpg", COLOURS[1])
    records = [{"id": 0, "caption_0": "an old person kisses a young person",
                "caption_1": "a young person kisses an old person", "image_0": "ex_0_img_0", "image_1": "ex_0_img_1",
                "tag": "Object"}]
    if layout == "jsonl":
        path = tmp_path / "examples.jsonl"
        path.write_text("".join(json.dumps(record) + "\n" for record in records) + "\n")
    else:
        path = tmp_path / "examples.json"
        path.write_text(json.dumps(records))

    data = read_compositional(path, tmp_path / "images")

    assert data.benchmark == "winoground"
    assert [path.name for path in data.images] == ["ex_0_img_0.png", "ex_0_img_1.jpg"]  # the extension found
    assert data.texts == ["an old person kisses a young person", "a young person kisses an old person"]
    # s(c0,i0), s(c0,i1), s(c1,i0), s(c1,i1)
    assert data.pairs().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    scores, counts, chance = data.evaluate(np.array([0.9, 0.95, 0.1, 0.96]))
    assert scores == {"text": 100.0, "image": 0.0, "group": 0.0} and counts == {"text": 1, "image": 1, "group": 1}


def test_reader_mistakes_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_compositional(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no SugarCrepe files"):
        read_compositional(tmp_path / "empty")
    (tmp_path / "bad.jsonl").write_text('{"id": 0\n')
    with pytest.raises(UserError, match="bad.jsonl, line 1: not JSON"):
        read_compositional(tmp_path / "bad.jsonl")
    (tmp_path / "short.jsonl").write_text(json.dumps({"id": 3, "caption_0": "a", "image_0": "x", "image_1": "y"}))
    with pytest.raises(UserError, match=r"short.jsonl, item 3: no 'caption_1' text"):
        read_compositional(tmp_path / "short.jsonl")
    (tmp_path / "missing.json").write_text(json.dumps({"0": {"filename": "gone.jpg", "caption": "a",
                                                             "negative_caption": "b"}}))
    with pytest.raises(UserError, match="image 'gone.jpg' not found"):
        read_compositional(tmp_path / "missing.json")


# ---------------------------------------------------------------- the shapes world's files


def test_shapes_sugarcrepe_captions_are_true_and_negatives_false(world):
    objects_of = scenes(world)
    test_images = {image["filename"] for image in karpathy(world) if image["split"] == "test"}
    items = sugarcrepe_items(world)
    assert set(Counter(name for name, _ in items)) == set(SUGARCREPE_FILES)
    for name, item in items:
        image = item["filename"].removeprefix("Images/")
        assert image in test_images
        assert item["caption"] != item["negative_caption"]
        assert caption_is_true(item["caption"], objects_of[image]), (name, item)
        assert not caption_is_true(item["negative_caption"], objects_of[image]), (name, item)
        words, negative_words = item["caption"].split(), item["negative_caption"].split()
        if name.startswith("swap"):  # the same words in another order
            assert Counter(words) == Counter(negative_words), item
        else:  # one word replaced
            assert len(words) == len(negative_words) and sum(a != b for a, b in zip(words, negative_words)) <= 2
        if name == "swap_obj":
            assert "to the left of" in item["caption"] or "to the right of" in item["caption"]


def test_shapes_winoground_pairs_are_twins_each_caption_true_of_its_own_image_only(world):
    objects_of = scenes(world)
    by_name = {image["filename"]: image for image in karpathy(world)}
    pairs = winoground_items(world)
    assert pairs and [pair["id"] for pair in pairs] == list(range(len(pairs)))
    for pair in pairs:
        image_0, image_1 = (pair[key].removeprefix("Images/") for key in ("image_0", "image_1"))
        assert by_name[image_1]["twin_of"] == by_name[image_0]["imgid"] and by_name[image_1]["split"] == "test"
        assert pair["tag"] == by_name[image_1]["variant"]
        assert Counter(pair["caption_0"].split()) == Counter(pair["caption_1"].split())
        assert pair["caption_0"] != pair["caption_1"]
        assert caption_is_true(pair["caption_0"], objects_of[image_0])
        assert not caption_is_true(pair["caption_0"], objects_of[image_1])
        assert caption_is_true(pair["caption_1"], objects_of[image_1])
        assert not caption_is_true(pair["caption_1"], objects_of[image_0])


def test_a_larger_plan_gives_every_category_and_both_twin_kinds():
    from vqa_search.shapes import compositional_sets

    specs = plan_images(ShapesConfig(images=1500, seed=7, size=64))
    sugarcrepe, winoground = compositional_sets(specs, 7)
    test = sum(spec.split == "test" for spec in specs)
    assert all(len(sugarcrepe[name]) > 0.3 * test for name in SUGARCREPE_FILES), {k: len(v) for k, v in sugarcrepe.items()}
    assert {pair["tag"] for pair in winoground} == {"color-swap", "position-swap"}


# ---------------------------------------------------------------- scores with a model


def naive_global(clip, caption: str, image_path) -> float:
    text = encode_texts(clip, [caption])[0]
    image = encode_images(clip, [load_named_image(image_path)])[0]
    return float(text @ image)


def test_global_scores_equal_a_naive_per_pair_loop(world):
    clip = load_clip(resolve_identity(TINY_MODEL, "none"))
    [run] = run_compositional(world / "sugarcrepe", CompositionalConfig(**TINY))
    correct: dict[str, list[bool]] = {}
    for name, item in sugarcrepe_items(world):
        image = world / item["filename"]
        correct.setdefault(name, []).append(
            naive_global(clip, item["caption"], image) > naive_global(clip, item["negative_caption"], image))
    assert run["scores"] == {name: 100 * float(np.mean(flags)) for name, flags in correct.items()}
    assert run["counts"] == {name: len(flags) for name, flags in correct.items()}
    assert run["chance"] == dict.fromkeys(correct, 50.0) and run["kind"] == "compositional"

    [wino] = run_compositional(world / "winoground.jsonl", CompositionalConfig(**TINY))
    pairs = winoground_items(world)
    s = np.array([[[naive_global(clip, pair[c], world / pair[i]) for i in ("image_0", "image_1")]
                   for c in ("caption_0", "caption_1")] for pair in pairs])
    assert wino["scores"] == winoground_scores(s) and wino["counts"]["group"] == len(pairs)


@torch.no_grad()
def naive_reranked(model, clip, caption: str, image_path, regions: np.ndarray) -> float:
    tokens = caption_tokens(clip, [caption], dtype=torch.float32)[0][None]
    global_score = naive_global(clip, caption, image_path)
    return float(model(torch.tensor([[global_score]]), tokens, torch.ones(tokens.shape[:2], dtype=torch.bool),
                       torch.as_tensor(regions).float()[None, None])[0, 0])


def test_reranked_scores_equal_a_naive_per_pair_loop(world, tmp_path):
    index, regions = Index.open(world), RegionSet.open(world)
    model = trained_like(index, regions)
    path = save_reranker(model, tmp_path / "reranker.safetensors")
    clip = index.clip

    runs = run_compositional(world / "winoground.jsonl", CompositionalConfig(**TINY, reranker=path))

    assert [run["name"] for run in runs] == ["vqa-tiny none", "vqa-tiny none + re-ranker"]
    assert runs[1]["lambda"] == pytest.approx(0.8)
    pairs = winoground_items(world)
    region_of = lambda name: regions.features([regions.row_of(name.removeprefix("Images/"))])[0]  # noqa: E731
    s = np.array([[[naive_reranked(model, clip, pair[c], world / pair[i], region_of(pair[i]))
                    for i in ("image_0", "image_1")] for c in ("caption_0", "caption_1")] for pair in pairs])
    assert runs[1]["scores"] == winoground_scores(s)

    # The same pairs with the images outside the index: their regions are extracted now, and equal.
    outside = tmp_path / "outside"
    for pair in pairs:
        for key in ("image_0", "image_1"):
            (outside / pair[key]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(world / pair[key], outside / pair[key])
    shutil.copy(world / "winoground.jsonl", outside / "winoground.jsonl")
    moved = run_compositional(outside / "winoground.jsonl", CompositionalConfig(**TINY, reranker=path, index=world))
    assert moved[1]["scores"] == runs[1]["scores"]


def test_the_index_weights_are_the_default(world, our_log):
    [run] = run_compositional(world / "winoground.jsonl", CompositionalConfig(workers=0, progress=False))
    assert (run["model"], run["pretrained"]) == (TINY_MODEL, "none")
    assert "scoring with the index's weights" in our_log.text


# ---------------------------------------------------------------- command line


def test_cli_json_append_and_report(world, tmp_path):
    runner = CliRunner()
    results = tmp_path / "results.jsonl"
    base = ["--model", TINY_MODEL, "--pretrained", "none", "--workers", "0", "-q", "--append", str(results)]
    done = runner.invoke(app, ["bench", "compositional", str(world / "sugarcrepe"), *base, "--json", "-"])
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert result["benchmark"] == "sugarcrepe" and set(result["scores"]) == set(SUGARCREPE_FILES)
    done = runner.invoke(app, ["bench", "compositional", str(world / "winoground.jsonl"), *base])
    assert done.exit_code == 0, done.output
    assert "group" in done.stdout and "16.7" in done.stdout

    report = runner.invoke(app, ["bench", "report", str(results)])
    assert report.exit_code == 0, report.output
    assert "| sugarcrepe run | data | replace_att | replace_obj | swap_att | swap_obj |" in report.stdout
    assert "| winoground run | data | text | image | group |" in report.stdout
    assert report.stdout.count("*chance*") == 2
    assert runner.invoke(app, ["bench", "report", str(results), "--plot", str(tmp_path / "p.png")]).exit_code == 2


@pytest.mark.parametrize("target, message", [
    ("nowhere", "error: not found:"),
    ("nowhere.jsonl", "error: not found:"),
    ("empty", "holds no SugarCrepe files"),
])
def test_cli_mistakes_are_one_line_errors(tmp_path, target, message):
    (tmp_path / "empty").mkdir()
    done = CliRunner().invoke(app, ["bench", "compositional", str(tmp_path / target), "-q"])
    assert done.exit_code == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_markdown_table_puts_chance_after_the_last_run_on_each_data_set():
    run = {"kind": "compositional", "benchmark": "winoground", "name": "a", "data": "w.jsonl",
           "scores": {"text": 30.0, "image": 10.0, "group": 5.0}, "counts": {}, "chance": dict(WINOGROUND_CHANCE)}
    table = markdown_table([run, {**run, "name": "b"}])
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == ["| a", "| b", "| *chance*"]


def test_help_loads_no_heavy_module():
    from test_startup import _probe

    result, stdout, _ = _probe("bench", "compositional", "--help")
    assert result == {"code": 0, "heavy": []}
    assert "Winoground" in stdout
