"""Stage 1 on a small shapes world with a tiny CLIP from scratch: it learns, keeps its best epoch,
stops early, is reproducible, and its checkpoint loads wherever weights do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import tiny_config
from vqa_search.align import finetune as stage1
from vqa_search.align.finetune import FinetuneConfig, contrastive_loss, finetune, mean_recall, validate
from vqa_search.cli import app
from vqa_search.core.encode import token_lengths
from vqa_search.core.feature_cache import CacheConfig, FeatureCache
from vqa_search.indexer.build import BuildConfig, build_index
from vqa_search.indexer.datasets import read_dataset
from vqa_search.core.images import load_rgb
from vqa_search.core.models import load_clip
from vqa_search.core.identity import TINY_MODEL, resolve_identity, sha256_file
from vqa_search.retrieval.recall import RecallConfig, run_recall, split_texts
from vqa_search.shapes import ShapesConfig, make_shapes

WORLD = ShapesConfig(images=400, seed=7, size=64)  # 320 train, 40 val images
TINY = {"model": TINY_MODEL, "pretrained": "none", "workers": 0}
LEARNS = FinetuneConfig(**TINY, lr=1e-3, batch_size=32, epochs=6, weight_decay=0.1, patience=6)
SHORT = FinetuneConfig(**TINY, lr=1e-3, batch_size=64, epochs=1)
TIMINGS = ("seconds", "val_seconds")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, WORLD)
    return out


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory) -> stage1.FinetuneResult:
    return finetune(world, tmp_path_factory.mktemp("ft") / "tiny.safetensors", LEARNS, progress=False)


def _tiny_clip(pretrained: str = "none"):
    return load_clip(resolve_identity(TINY_MODEL, pretrained), torch.device("cpu"))


def _without_timings(history: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key not in TIMINGS} for record in history]


def test_loss_falls_and_val_recall_beats_chance(trained):
    losses = [record["loss"] for record in trained.history]
    assert losses[-1] < 0.85 * losses[0]
    chance = 100 * (1 + 5 + 10) / 3 / 40  # mean of R@1/5/10 of a random ranking of 40 images, both ways
    assert trained.best["mean_recall"] > 2 * chance
    assert trained.best["t2i"]["R@10"] > 100 * 10 / 40 + 10


def test_the_kept_checkpoint_is_the_best_val_epoch(trained, world):
    scores = [record["mean_recall"] for record in trained.history]
    assert trained.best_epoch == 1 + scores.index(max(scores))
    with safe_open(str(trained.checkpoint), "pt") as handle:
        assert handle.metadata()["epoch"] == str(trained.best_epoch)
    # Loaded like any weights, the file scores exactly what was recorded for that epoch.
    clip = _tiny_clip(str(trained.checkpoint))
    val = validate(clip, read_dataset(world), "val", LEARNS)
    assert val == {direction: trained.best[direction] for direction in ("t2i", "i2t")}
    on_disk = json.loads(trained.history_path.read_text())
    assert on_disk["best_epoch"] == trained.best_epoch and on_disk["history"] == trained.history
    assert trained.curve.read_bytes().startswith(b"\x89PNG")


def test_checkpoint_round_trip_and_use_as_pretrained(world, photos, tmp_path):
    clip = _tiny_clip()
    path = stage1.save_checkpoint(clip.model, tmp_path / "copy.safetensors", clip.identity, {"epoch": 1, "t2i": {},
                                  "i2t": {}}, SHORT)
    loaded = _tiny_clip(str(path))
    pixels, tokens = torch.randn(3, 3, 64, 64), clip.tokenizer(["a red circle", "two squares", "a star"])
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_image(pixels), clip.model.encode_image(pixels))
        assert torch.equal(loaded.model.encode_text(tokens), clip.model.encode_text(tokens))
    build_index(photos, BuildConfig(**tiny_config(pretrained=str(path))))
    manifest = json.loads((photos / ".vqa-search" / "manifest.json").read_text())
    assert manifest["model"]["sha256"] == sha256_file(path) and manifest["counts"]["images"] == 6
    run = run_recall(world, RecallConfig(split="val", model=TINY_MODEL, pretrained=str(path), workers=0,
                                         progress=False))
    assert run.sha256 == sha256_file(path) and run.n_images == 40


def test_early_stopping_keeps_the_best_epoch(world, tmp_path, monkeypatch):
    scores = iter([10.0, 30.0, 20.0, 25.0, 50.0, 60.0])
    monkeypatch.setattr(stage1, "validate", lambda *args: _val(next(scores)))
    result = finetune(world, tmp_path / "ft.safetensors", FinetuneConfig(**{**vars(SHORT), "epochs": 6,
                                                                           "patience": 2}), progress=False)
    assert [record["mean_recall"] for record in result.history] == [10.0, 30.0, 20.0, 25.0]
    assert result.stopped_early and result.best_epoch == 2
    with safe_open(str(result.checkpoint), "pt") as handle:
        assert handle.metadata()["epoch"] == "2"


def _val(score: float) -> dict:
    return {direction: {"R@1": score, "R@5": score, "R@10": score} for direction in ("t2i", "i2t")}


def test_same_seed_same_run_from_memory_or_decoded_every_epoch(world, tmp_path, monkeypatch):
    first = finetune(world, tmp_path / "a.safetensors", SHORT, progress=False)
    monkeypatch.setattr(stage1, "PIXEL_CACHE_BYTES", 0)  # as if the split did not fit in memory
    again = finetune(world, tmp_path / "b.safetensors", SHORT, progress=False)
    other = finetune(world, tmp_path / "c.safetensors", FinetuneConfig(**{**vars(SHORT), "seed": 1}), progress=False)
    assert _without_timings(first.history) == _without_timings(again.history)
    assert first.history[0]["loss"] != other.history[0]["loss"]
    a, b = load_file(first.checkpoint), load_file(again.checkpoint)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_cached_prefix_gives_the_full_forward(world):
    clip = _tiny_clip()
    model = clip.model.eval()
    data = read_dataset(world)
    texts_of = split_texts(data, "val")
    paths = list(texts_of)[:6]
    image_blocks, text_blocks = stage1.frozen_blocks(model, 1)
    assert (image_blocks, text_blocks) == (1, 1)
    in_memory = FeatureCache(CacheConfig("memory"), world)
    images = stage1._TrainImages.load(clip, data, paths, image_blocks, SHORT, progress=False, cache=in_memory)
    texts = stage1._TrainTexts.build(clip, [texts_of[path] for path in paths], text_blocks, in_memory)
    pixels = torch.stack([clip.preprocess(load_rgb(data.images_dir / path).image) for path in paths])
    all_texts = [text for path in paths for text in texts_of[path]]
    rows = torch.arange(len(all_texts))
    assert len(set(token_lengths(texts.tokens).tolist())) > 1  # padding really happens
    with torch.no_grad():
        torch.testing.assert_close(images.features(model, torch.from_numpy(images.cache)), model.encode_image(pixels),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(texts.features(model, rows, clip.device),
                                   model.encode_text(clip.tokenizer(all_texts)), atol=1e-5, rtol=0)


def test_unfreeze_last_trains_only_the_last_blocks(world, tmp_path):
    before = _tiny_clip().model.state_dict()
    result = finetune(world, tmp_path / "tail.safetensors",
                      FinetuneConfig(**{**vars(SHORT), "epochs": 2, "unfreeze_last": 1}), progress=False)
    after = load_file(result.checkpoint)
    tail = ("visual.transformer.resblocks.1.", "visual.ln_post.", "visual.proj", "transformer.resblocks.1.",
            "ln_final.", "text_projection", "logit_scale")
    trained = {name for name in after if name.startswith(tail)}
    assert all(torch.equal(after[name], before[name]) for name in after if name not in trained)
    assert all(not torch.equal(after[name], before[name]) for name in trained if after[name].ndim >= 2)
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" not in trained  # the frozen block really is frozen


def test_contrastive_loss_is_symmetric_infonce():
    image, text = torch.randn(5, 8), torch.randn(5, 8)
    logits = 3.0 * image @ text.T
    naive = sum(-(logits[i, i] - logits[i].logsumexp(0)) - (logits[i, i] - logits[:, i].logsumexp(0))
                for i in range(5)) / 10
    torch.testing.assert_close(contrastive_loss(image, text, torch.tensor(3.0)), naive)


def test_mean_recall_is_the_mean_of_six_recalls():
    val = _val(0.0)
    val["t2i"]["R@1"], val["i2t"]["R@10"] = 6.0, 12.0
    assert mean_recall(val) == 3.0


runner = CliRunner()


def test_cli_prints_json(world, tmp_path):
    out = tmp_path / "cli.safetensors"
    result = runner.invoke(app, ["train", "finetune", str(world), "--out", str(out), "--model", TINY_MODEL,
                                 "--pretrained", "none", "--epochs", "1", "--workers", "0", "-q", "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.stdout)
    assert report["checkpoint"] == str(out) and report["best_epoch"] == 1 and len(report["history"]) == 1
    assert out.is_file() and Path(report["curve"]).is_file()


@pytest.mark.parametrize("extra, message", [
    (["--out", "model.pt"], "must end in .safetensors"),
    (["--out", "x.safetensors", "--unfreeze-last", "3"], "more than the model has"),
])
def test_cli_user_errors(world, tmp_path, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "finetune", str(world), "--model", TINY_MODEL, "--pretrained", "none",
                                 *extra])
    _one_line_error(result, message)


def test_cli_refuses_a_dataset_without_splits(photos, tmp_path):
    result = runner.invoke(app, ["train", "finetune", str(photos), "--out", str(tmp_path / "x.safetensors")])
    _one_line_error(result, "no split information")


def _one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
