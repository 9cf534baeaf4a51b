"""`bench recall` and `bench report`: the protocol's gallery, embedding reuse, outputs a user reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_config, write_photo
from vqa_search.cli import app
from vqa_search.core.errors import UserError
from vqa_search.indexer.build import BuildConfig, build_index
from vqa_search.core.models import load_clip
from vqa_search.core.identity import TINY_MODEL, resolve_identity
from vqa_search.core.faiss_index import choose_spec
from vqa_search.retrieval.recall import RecallConfig, gallery_scores, run_recall

runner = CliRunner()
TINY = ["--model", "vqa-tiny", "--pretrained", "none", "--workers", "0", "--quiet"]


def tiny_recall(**overrides) -> RecallConfig:
    shared = {key: value for key, value in tiny_config().items() if key not in ("backend", "precision")}
    return RecallConfig(**{**shared, **overrides})  # recall embeds with the PyTorch reference


@pytest.fixture
def split_photos(photos):
    """Four test images (one of them missing on disk, one without captions) and two train images."""
    write_photo(photos / "Images" / "uncaptioned.png", (5, 5, 5))
    (photos / "Flickr_8k.testImages.txt").write_text(
        "photo_0.png\nphoto_1.png\nphoto_2.png\nuncaptioned.png\ngone.png\n")
    (photos / "Flickr_8k.trainImages.txt").write_text("photo_3.png\nphoto_4.png\n")
    return photos


def test_gallery_is_the_split_on_disk_with_its_captions(split_photos):
    run = run_recall(split_photos, tiny_recall())

    assert (run.n_images, run.n_captions, run.missing_images) == (3, 6, 1)
    assert run.gallery.images == ["photo_0.png", "photo_1.png", "photo_2.png"]
    assert run.gallery.caption_image.tolist() == [0, 0, 1, 1, 2, 2]
    assert run.embeddings == "computed"
    assert len(run.ranks["t2i"]) == 6 and len(run.ranks["i2t"]) == 3
    assert run.chance["t2i"]["R@1"] == pytest.approx(100 / 3)
    assert run.chance["i2t"]["R@10"] == pytest.approx(100.0)
    assert len(run.curves["t2i"]) == 50 and run.curves["t2i"][-1] == 100.0


def test_matching_index_is_reused_and_gives_the_same_numbers(split_photos):
    computed = run_recall(split_photos, tiny_recall())
    build_index(split_photos, BuildConfig(**tiny_config()))

    reused = run_recall(split_photos, tiny_recall())

    assert reused.embeddings == "index"
    np.testing.assert_allclose(reused.gallery.image_vectors, computed.gallery.image_vectors, atol=1e-5)
    np.testing.assert_allclose(reused.gallery.caption_vectors, computed.gallery.caption_vectors, atol=1e-5)
    assert reused.t2i == computed.t2i and reused.i2t == computed.i2t


def test_stale_or_foreign_index_is_not_reused_nor_touched(split_photos, tmp_path):
    build_index(split_photos, BuildConfig(**tiny_config()))
    manifest = (split_photos / ".vqa-search" / "manifest.json").read_bytes()
    checkpoint = tmp_path / "other.pt"
    torch.save(load_clip(resolve_identity(TINY_MODEL, "none")).model.state_dict(), checkpoint)

    assert run_recall(split_photos, tiny_recall(pretrained=str(checkpoint))).embeddings == "computed"
    write_photo(split_photos / "Images" / "photo_1.png", (1, 2, 3), size=(50, 40))
    assert run_recall(split_photos, tiny_recall()).embeddings == "computed"
    assert (split_photos / ".vqa-search" / "manifest.json").read_bytes() == manifest


def test_ivf_probing_every_list_scores_like_exact_search():
    rng = np.random.default_rng(0)
    items = rng.normal(size=(400, 16)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    queries = items[:50] + 0.1 * rng.normal(size=(50, 16)).astype(np.float32)
    nlist = choose_spec(len(items), "ivf").nlist

    exact = gallery_scores(queries, items, "flat", None)
    np.testing.assert_allclose(gallery_scores(queries, items, "ivf", nlist), exact, atol=1e-5)
    partial = gallery_scores(queries, items, "ivf", 1)
    assert np.isneginf(partial).any()  # unvisited lists rank last
    found = np.isfinite(partial)
    np.testing.assert_allclose(partial[found], exact[found], atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    ({"split": "val"}, "no 'val' split"),
    ({"index_type": "auto"}, "--index-type must be one of"),
    ({"ks": (0, 5)}, "--k needs positive integers"),
])
def test_recall_mistakes(split_photos, overrides, message):
    with pytest.raises(UserError, match=message):
        run_recall(split_photos, tiny_recall(**overrides))


@pytest.mark.parametrize("args, fragment", [([], "dataset_*.json"), (["--k", "1,five"], "--k takes comma-separated")])
def test_cli_mistakes_are_one_line(photos, args, fragment):
    result = runner.invoke(app, ["bench", "recall", str(photos), *TINY, *args])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_writes_json_ranks_results_and_plots(split_photos, tmp_path):
    out = {name: tmp_path / name for name in ("recall.json", "ranks.jsonl", "results.jsonl", "one.png")}
    result = runner.invoke(app, ["bench", "recall", str(split_photos), *TINY, "--json", str(out["recall.json"]),
                                 "--save-ranks", str(out["ranks.jsonl"]), "--append", str(out["results.jsonl"]),
                                 "--plot", str(out["one.png"]), "--name", "tiny"])

    assert result.exit_code == 0, result.stderr
    assert "text→image" in result.stdout and "chance" in result.stdout
    report = json.loads(out["recall.json"].read_text())
    assert {"model", "pretrained", "split", "n_images", "n_captions", "t2i", "i2t"} <= set(report)
    assert set(report["t2i"]) == {"R@1", "R@5", "R@10", "median_rank", "mean_rank"}
    ranks = [json.loads(line) for line in out["ranks.jsonl"].read_text().splitlines()]
    assert len(ranks) == 6 + 3
    assert ranks[0]["query_id"] == "photo_0.png#0" and ranks[0]["correct"] == ["photo_0.png"]
    assert ranks[-1] == {"direction": "i2t", "query_id": "photo_2.png", "query": "photo_2.png",
                         "correct": ["photo_2.png#0", "photo_2.png#1"], "rank": ranks[-1]["rank"],
                         "run": report["name"]}
    t2i_ranks = np.array([r["rank"] for r in ranks if r["direction"] == "t2i"])
    assert report["t2i"]["R@1"] == pytest.approx(100 * np.mean(t2i_ranks <= 1))
    assert out["one.png"].read_bytes().startswith(b"\x89PNG")


def test_report_puts_runs_in_one_table_with_chance(split_photos, tmp_path):
    results = tmp_path / "results.jsonl"
    for name in ("zero-shot", "ivf"):
        extra = ["--index-type", "ivf"] if name == "ivf" else []
        assert runner.invoke(app, ["bench", "recall", str(split_photos), *TINY, "--name", name,
                                   "--append", str(results), *extra]).exit_code == 0

    result = runner.invoke(app, ["bench", "report", str(results), "--out", str(tmp_path / "table.md"),
                                 "--plot", str(tmp_path / "curves.png")])

    assert result.exit_code == 0, result.stderr
    rows = (tmp_path / "table.md").read_text().splitlines()
    assert [row.split(" | ")[0] for row in rows[2:]] == ["| zero-shot", "| ivf", "| *chance*"]
    assert "| 33.3 |" in rows[-1]  # R@1 chance of 3 images
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_report_names_the_bad_line(tmp_path):
    results = tmp_path / "results.jsonl"
    results.write_text('{"name": "x"}\nnot json\n')
    result = runner.invoke(app, ["bench", "report", str(results)])
    assert result.exit_code == 2
    assert "results.jsonl, line 1: not a `bench recall` result" in result.stderr
