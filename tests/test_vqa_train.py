"""`train vqa`, `bench vqa` and `ask` end to end on a small generated shapes world, offline and fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from vqa_search.cli import app
from vqa_search.indexer.build import BuildConfig, build_index
from vqa_search.core.models import load_clip
from vqa_search.core.identity import TINY_MODEL, resolve_identity
from vqa_search.shapes import ShapesConfig, make_shapes
from vqa_search.vqa.answerer import load_answerer
from vqa_search.vqa.bench import VqaBenchConfig, run_vqa_bench
from vqa_search.vqa.data import read_vqa
from vqa_search.vqa.features import LocalEncoder, image_features, question_vectors
from vqa_search.vqa.train import VqaTrainConfig, image_grouped_batches, train_vqa

pytestmark = pytest.mark.usefixtures("one_torch_thread")

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vqa") / "shapes"
    make_shapes(out, ShapesConfig(images=60, seed=3, size=64), progress=False)
    return out


def tiny(**overrides) -> VqaTrainConfig:
    return VqaTrainConfig(**{"model": TINY_MODEL, "pretrained": "none", "local_model": TINY_MODEL,
                             "local_pretrained": "none", "epochs": 2, "batch_size": 32, "hidden": 32,
                             "workers": 0, **overrides})


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory) -> tuple[Path, object]:
    head = tmp_path_factory.mktemp("heads") / "head.safetensors"
    return head, train_vqa(world, head, tiny(variant="dual-attention", unfreeze_last=1), progress=False)


def test_training_keeps_the_best_val_epoch_with_its_history_and_curve(trained):
    head, result = trained
    assert head.is_file() and result.curve.is_file()
    history = json.loads(result.history_path.read_text())
    assert [record["epoch"] for record in history["history"]] == [1, 2]
    best = max(result.history, key=lambda record: record["val"]["overall"])
    assert result.best_epoch == best["epoch"] == history["best_epoch"]
    with safe_open(str(head), framework="pt") as handle:
        names = list(handle.keys())
        metadata = handle.metadata()
    assert json.loads(metadata["record"])["epoch"] == result.best_epoch
    assert any(name.startswith("local.visual.transformer.resblocks.1.") for name in names)  # the trained block
    assert not any(name.startswith("local.visual.transformer.resblocks.0.") for name in names)  # frozen: not stored


def test_a_loaded_head_answers_like_the_kept_epoch(world, trained):
    head, result = trained
    answerer = load_answerer(head, torch.device("cpu"))
    val = read_vqa(world).split("val")
    features = image_features(answerer.clip, answerer.local, [question.image for question in val])
    rows, vectors = question_vectors(answerer.clip, [question.question for question in val])
    answers, probabilities = answerer.top_answers(features, [q.image for q in val],
                                                  vectors[[rows[q.question] for q in val]], k=3)
    assert len(answers) == len(val) and all(len(top) == 3 for top in answers)
    assert (probabilities[:, :-1] >= probabilities[:, 1:]).all()  # most probable first
    bench = run_vqa_bench(world, VqaBenchConfig(head=head, split="val", workers=0, progress=False))
    assert bench["head"]["overall"] == pytest.approx(result.best["val"]["overall"])


def test_the_frozen_clip_and_the_frozen_local_blocks_do_not_move(world, tmp_path):
    identity = resolve_identity(TINY_MODEL, "none")
    before = {name: tensor.clone() for name, tensor in load_clip(identity).model.state_dict().items()}
    head = tmp_path / "head.safetensors"
    train_vqa(world, head, tiny(variant="dual-attention", unfreeze_last=1, epochs=1), progress=False)
    answerer = load_answerer(head)
    for name, tensor in answerer.clip.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    local = answerer.local.model.state_dict()
    assert torch.equal(local["visual.transformer.resblocks.0.mlp.c_fc.weight"],
                       before["visual.transformer.resblocks.0.mlp.c_fc.weight"])
    assert not torch.equal(local["visual.transformer.resblocks.1.mlp.c_fc.weight"],
                           before["visual.transformer.resblocks.1.mlp.c_fc.weight"])


def test_cached_local_streams_equal_the_full_forward():
    clip = load_clip(resolve_identity(TINY_MODEL, "none"))
    local = LocalEncoder(clip, unfreeze_last=1)
    pixels = torch.randn(3, 3, 64, 64)
    tokens, pooled = local(local.prefix(pixels))
    clip.model.visual.output_tokens = True
    expected_pooled, expected_tokens = clip.model.visual(pixels)
    clip.model.visual.output_tokens = False
    torch.testing.assert_close(pooled, expected_pooled, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tokens, expected_tokens, atol=1e-5, rtol=1e-4)


def test_batches_hold_whole_images_and_cover_every_question_once():
    image_rows = torch.randint(0, 30, (200,)).numpy()
    batches = image_grouped_batches(image_rows, 16, torch.Generator().manual_seed(0))
    assert sorted(position for batch in batches for position in batch) == list(range(200))
    seen = [set(image_rows[batch]) for batch in batches]
    for k, images in enumerate(seen):
        assert all(not images & other for other in seen[k + 1:])  # an image never spans two batches
    assert all(len(batch) >= 16 for batch in batches[:-1])


@pytest.mark.parametrize("variant", ["baseline", "dual-concat"])
def test_other_variants_train_and_load(world, tmp_path, variant):
    head = tmp_path / f"{variant}.safetensors"
    result = train_vqa(world, head, tiny(variant=variant, epochs=1, loss="ce"), progress=False)
    assert load_answerer(head).head.config.variant == variant
    assert 0 <= result.best["val"]["overall"] <= 100


def test_cli_train_bench_and_ask(world, trained, tmp_path):
    head, _ = trained
    out = runner.invoke(app, ["bench", "vqa", str(world), "--head", str(head), "--split", "val", "--workers", "0",
                              "--json", "-", "--quiet"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert set(report) >= {"head", "majority", "split", "questions"}
    image = world / "Images" / "shape_000000.png"
    out = runner.invoke(app, ["ask", str(image), "what color is the circle?", "--head", str(head), "--json"])
    assert out.exit_code == 0, out.output
    answers = json.loads(out.output)["head"]
    assert len(answers) == 5 and answers[0]["probability"] >= answers[-1]["probability"]
    assert json.loads(out.output)["captions"] is None  # no index anywhere: the head alone answers


def test_ask_shows_the_captions_of_an_indexed_image(world, trained):
    build_index(world, BuildConfig(model=TINY_MODEL, pretrained="none", workers=0, progress=False))
    image = world / "Images" / "shape_000001.png"
    question = "is there a circle?"
    out = runner.invoke(app, ["ask", str(image), question, "--index", str(world), "--head", str(trained[0])])
    assert out.exit_code == 0, out.output
    assert out.output.startswith(f"Q: {question}\nhead: ") and "\ncaptions: " in out.output
    out = runner.invoke(app, ["ask", str(image), question, "--index", str(world), "--json"])
    captions = json.loads(out.output)["captions"]
    assert captions["kind"] == "yes/no" and captions["answer"] in ("yes", "no")
    assert captions["evidence"] and all(item["own"] and item["image"] == image.name for item in captions["evidence"])


@pytest.mark.parametrize("args, message", [
    (["train", "vqa", "{world}", "--out", "{tmp}/head.pt"], "--out must end in .safetensors"),
    (["train", "vqa", "{world}", "--out", "{tmp}/h.safetensors", "--variant", "triple"], "--variant must be one of"),
    (["bench", "vqa", "{world}", "--head", "{tmp}/missing.safetensors"], "head file not found"),
    (["bench", "vqa", "{world}"], "needs --head"),
    (["ask", "{world}/Images/shape_000000.png", "  ", "--head", "{tmp}/missing.safetensors"], "question is empty"),
    (["ask", "{world}/Images/shape_000000.png", "what?", "--head", "{tmp}/missing.safetensors"], "head file not found"),
    (["ask", "{tmp}/nothing.png", "what?", "--head", "{head}"], "image not found"),
    (["ask", "{world}/captions.txt", "what?", "--head", "{head}"], "cannot read image"),
])
def test_user_errors_are_one_line_and_exit_2(world, trained, tmp_path, args, message):
    values = {"world": world, "tmp": tmp_path, "head": trained[0]}
    out = runner.invoke(app, [arg.format(**values) for arg in args])
    assert out.exit_code == 2, out.output
    assert message in out.output
    assert "Traceback" not in out.output
