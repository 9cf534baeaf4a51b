"""The command line as a user meets it: exit codes, one-line errors, JSON output, help examples."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import typer
from typer.testing import CliRunner

from conftest import COLOURS, write_photo
from vqa_search import __version__
from vqa_search.cli import app
from vqa_search.core.threads import ThreadPlan, default_workers, plan_threads, torch_threads

runner = CliRunner()
TINY = ["--model", "vqa-tiny", "--pretrained", "none", "--workers", "0", "--batch-size", "4"]


def _run(*args: str, cwd=None, monkeypatch=None):
    if cwd is not None:
        monkeypatch.chdir(cwd)
    return runner.invoke(app, list(args))


@pytest.fixture
def indexed(photos):
    result = _run("index", str(photos), *TINY, "--quiet")
    assert result.exit_code == 0, result.output + result.stderr
    return photos


def _assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output + result.stderr


@pytest.mark.parametrize("command", ["index", "query", "ask", "export", "info", "make-shapes", "regions",
                                     "bench recall", "bench report", "bench vqa", "train finetune", "train rerank",
                                     "train vqa"])
def test_every_command_has_help_with_an_example(command):
    result = _run(*command.split(), "--help")
    assert result.exit_code == 0
    assert "Example" in result.output and f"vqa-search {command}" in result.output


def test_index_reports_json(photos):
    result = _run("index", str(photos), *TINY, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == 6 and report["captions"] == 12 and report["skipped"] == []
    again = json.loads(_run("index", str(photos), *TINY, "--json").stdout)
    assert again["up_to_date"] is True and again["embedded_images"] == 0


def test_index_summary_goes_to_stderr(photos):
    result = _run("index", str(photos), *TINY)
    assert result.exit_code == 0
    assert "indexed 6 images" in result.stderr and result.stdout == ""


def test_query_json_schema(indexed, monkeypatch):
    result = _run("query", "a picture, number 3", "-k", "2", "--json", cwd=indexed, monkeypatch=monkeypatch)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["query"] == "a picture, number 3" and data["target"] == "images"
    assert len(data["results"]) == 2
    hit = data["results"][0]
    assert set(hit) == {"rank", "score", "image", "image_id", "caption", "captions", "caption_id"}
    assert hit["rank"] == 1 and isinstance(hit["score"], float) and hit["image"].startswith("photo_")
    assert hit["caption"] == hit["captions"][0]


def test_query_table_and_sheet(indexed, tmp_path):
    sheet = tmp_path / "sheet.png"
    result = _run("query", "--image", str(indexed / "Images" / "photo_2.png"), "--index", str(indexed),
                  "-k", "3", "--sheet", str(sheet))
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["rank", "score", "image"]
    rank, score, image = lines[1].split()[:3]
    # an int8 plan quantises activations per batch, so an indexed image queried alone may score just
    # under 1 (core/inference.py); fp32 gives 1.000 up to ONNX Runtime's rounding
    assert (rank, image) == ("1", "photo_2.png") and float(score) >= 0.99
    assert sheet.stat().st_size > 0


def test_query_captions_target(indexed):
    result = _run("query", "a picture, number 5", "--index", str(indexed), "--target", "captions", "--json")
    assert json.loads(result.stdout)["results"][0]["caption"] == "a picture, number 5"


def test_no_index_says_what_to_run(tmp_path, monkeypatch):
    result = _run("query", "dog", cwd=tmp_path, monkeypatch=monkeypatch)
    _assert_one_line_error(result, "vqa-search index")


@pytest.mark.parametrize("args, fragment", [
    (["query", ""], "query text is empty"),
    (["query", "dog", "-k", "0"], "k must be at least 1"),
    (["query", "dog", "--pretrained", "laion2b_s34b_b79k", "--model", "ViT-B-32"], "was built with vqa-tiny"),
])
def test_query_user_errors(indexed, args, fragment):
    _assert_one_line_error(_run(*args, "--index", str(indexed)), fragment)


def test_index_user_errors(tmp_path):
    _assert_one_line_error(_run("index", str(tmp_path / "missing"), *TINY), "missing")
    (tmp_path / "empty").mkdir()
    _assert_one_line_error(_run("index", str(tmp_path / "empty"), *TINY), "no images in")


def test_offline_pretrained_tag_is_one_clear_error(photos, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = _run("index", str(photos), "--workers", "0")
    _assert_one_line_error(result, "ViT-B-32", "laion2b_s34b_b79k", "--pretrained")


def test_export_npz_and_parquet(indexed, tmp_path):
    npz_path, parquet_path = tmp_path / "v.npz", tmp_path / "v.parquet"
    assert _run("export", str(indexed), "--out", str(npz_path)).exit_code == 0
    assert _run("export", str(indexed), "--out", str(parquet_path)).exit_code == 0
    with np.load(npz_path) as data:
        assert data["image_embeddings"].shape[0] == 6 and data["caption_embeddings"].shape[0] == 12
        assert list(data["caption_image_ids"]) == [i // 2 for i in range(12)]
        assert data["image_paths"][0] == "photo_0.png"
    table = pq.read_table(parquet_path).to_pydict()
    assert table["kind"].count("image") == 6 and table["kind"].count("caption") == 12
    np.testing.assert_allclose(np.asarray(table["embedding"][0]), data_first_image(npz_path))
    _assert_one_line_error(_run("export", str(indexed), "--out", str(tmp_path / "v.csv")), ".npz or .parquet")


def data_first_image(npz_path):
    with np.load(npz_path) as data:
        return data["image_embeddings"][0]


# ---- answering at once (issue 16) ------------------------------------------------------------


def test_version():
    result = _run("--version")
    assert result.exit_code == 0 and result.stdout == f"vqa-search {__version__}\n"


@pytest.mark.parametrize("args", [[], ["index"], ["train"], ["train", "rerank"], ["bench", "recall"]])
def test_h_is_help(args):
    short, long = _run(*args, "-h"), _run(*args, "--help")
    assert short.exit_code == 0 and "Usage: " in short.stdout
    assert short.stdout == long.stdout
    assert "-h, --help" in short.stdout


@pytest.mark.parametrize("group", ["", "train", "bench"])
def test_top_level_and_group_help_show_examples(group):
    result = _run(*group.split(), "--help")
    assert result.exit_code == 0
    examples = result.stdout.split("Examples:", 1)[1]
    commands = [line.split()[:3] for line in examples.splitlines() if line.strip().startswith("vqa-search ")]
    assert len(commands) >= 3
    assert all(group in " ".join(command) for command in commands)


def test_quiet_hides_progress_not_the_result(photos):
    first = _run("index", str(photos), *TINY, "-q")
    assert first.exit_code == 0, first.stderr
    assert first.stderr.splitlines()[0].startswith("indexed 6 images")
    again = _run("index", str(photos), *TINY, "--quiet")
    assert again.stderr.startswith(f"index at {photos / '.vqa-search'} is up to date: 6 images, 12 captions")


def test_info_reports_counts_model_generations_skipped_regions_and_reranker(photos):
    from vqa_search.align.reranker import CrossAttentionReranker, RerankerConfig, save_reranker

    (photos / "Images" / "broken.png").write_bytes(b"not an image")
    assert _run("index", str(photos), *TINY, "-q").exit_code == 0
    write_photo(photos / "Images" / "photo_9.png", COLOURS[9])  # a second generation
    assert _run("index", str(photos), *TINY, "-q").exit_code == 0
    regions = _run("regions", str(photos), "--source", "clip-patches", "--workers", "0", "-q")
    assert regions.exit_code == 0, regions.stderr
    index_dir = photos / ".vqa-search"
    feature_dim = json.loads((index_dir / "regions" / "clip-patches" / "manifest.json").read_text())["feature_dim"]
    clip = {"model": "vqa-tiny", "pretrained": "none", "sha256": None}
    save_reranker(CrossAttentionReranker(RerankerConfig(token_dim=64, region_dim=feature_dim, lam=0.5,
                                                        regions="clip-patches", clip=clip)),
                  index_dir / "reranker.safetensors")

    result = _run("info", str(photos), "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["path"] == str(index_dir.resolve())
    assert data["model"] == {**clip, "description": "vqa-tiny with weights none"}
    assert (data["images"], data["captions"], data["dim"]) == (7, 12, 64)
    assert data["index_types"] == {"requested": "auto", "images": "flat", "captions": "flat"}
    assert data["generation"] == 2 and data["generations_on_disk"] == [1, 2] and data["pending"] is None
    assert [entry["path"] for entry in data["skipped"]] == ["broken.png"] and data["skipped"][0]["reason"]
    assert data["bytes"] > data["live_bytes"] > 0
    [region_set] = data["region_sets"]
    assert (region_set["name"], region_set["source"], region_set["rows"]) == ("clip-patches", "clip-patches", 7)
    assert region_set["index_generation"] == 2 and region_set["error"] is None
    assert data["reranker"]["lam"] == 0.5 and data["reranker"]["regions"] == "clip-patches"
    assert data["reranker"]["matches_index"] is True and data["reranker"]["error"] is None

    text = _run("info", str(index_dir)).stdout
    for fragment in ("vqa-tiny with weights none", "7 images, 12 captions", "generation  2", "(on disk: 1, 2)",
                     "1 file: broken.png", "clip-patches: ", " per image", "7 images", "λ 0.5", "(the index's)"):
        assert fragment in text, (fragment, text)


def test_info_finds_the_index_from_a_subfolder(indexed, monkeypatch):
    result = _run("info", cwd=indexed / "Images", monkeypatch=monkeypatch)
    assert result.exit_code == 0 and "6 images, 12 captions" in result.stdout


def test_info_without_an_index_is_one_line(tmp_path, monkeypatch):
    _assert_one_line_error(_run("info", str(tmp_path)), f"no vqa-search index at {tmp_path}", "vqa-search index")
    _assert_one_line_error(_run("info", cwd=tmp_path, monkeypatch=monkeypatch), "no vqa-search index in")


def test_info_reports_a_damaged_reranker_instead_of_failing(indexed):
    (indexed / ".vqa-search" / "reranker.safetensors").write_bytes(b"\xff" * 64)
    result = _run("info", str(indexed), "--json")
    assert result.exit_code == 0
    assert "not a safetensors file" in json.loads(result.stdout)["reranker"]["error"]


def test_threads_and_workers_never_exceed_the_cores():
    for cores in range(1, 65):
        for threads in [None, *range(1, cores + 1)]:
            plan = plan_threads(threads=threads, cores=cores)
            assert plan.threads >= 1 and plan.workers >= 0 and plan.threads + plan.workers <= cores
            assert threads is None or plan.threads == threads
        for workers in range(cores):
            plan = plan_threads(workers=workers, cores=cores)
            assert plan.workers == workers and plan.threads >= 1 and plan.threads + plan.workers <= cores
    assert plan_threads(cores=1) == ThreadPlan(threads=1, workers=0)
    assert plan_threads(cores=2) == ThreadPlan(threads=1, workers=1)
    assert plan_threads(cores=16) == ThreadPlan(threads=12, workers=4)
    assert plan_threads(threads=3, workers=3, cores=2) == ThreadPlan(threads=3, workers=3)  # both given: as given
    assert default_workers() == plan_threads().workers


def test_torch_threads_are_capped_while_a_command_runs_and_restored():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("option, value, fragment", [("--threads", "0", "--threads must be at least 1"),
                                                     ("--workers", "-1", "--workers must be 0 or more")])
def test_thread_options_are_checked(photos, option, value, fragment):
    _assert_one_line_error(_run("index", str(photos), *TINY, option, value), fragment)


def test_train_rerank_region_set_and_its_old_name(indexed):
    args = ["train", "rerank", str(indexed), "--model", "vqa-tiny", "--pretrained", "none"]
    renamed = _run(*args, "--region-set", "clip-patches")
    _assert_one_line_error(renamed, "clip-patches")
    old = _run(*args, "--regions", "clip-patches")
    assert old.exit_code == 2
    warning, error = old.stderr.strip().splitlines()
    assert warning.startswith("warning: `train rerank --regions` is now --region-set") and error == renamed.stderr.strip()
    _assert_one_line_error(_run(*args, "--regions", "a", "--region-set", "b"), "give only --region-set")
    assert "--regions" not in _run("train", "rerank", "--help").stdout



def test_train_rerank_pretrained_and_its_old_name(indexed):
    args = ["train", "rerank", str(indexed), "--model", "vqa-tiny", "--region-set", "clip-patches"]
    renamed = _run(*args, "--pretrained", "none")
    _assert_one_line_error(renamed, "clip-patches")
    old = _run(*args, "--checkpoint", "none")
    assert old.exit_code == 2
    warning, error = old.stderr.strip().splitlines()
    assert warning.startswith("warning: `train rerank --checkpoint` is now --pretrained") and error == renamed.stderr.strip()
    _assert_one_line_error(_run(*args, "--checkpoint", "a", "--pretrained", "b"), "give only --pretrained")
    assert "--checkpoint" not in _run("train", "rerank", "--help").stdout

def _command(path: str):
    command = typer.main.get_command(app)
    for name in path.split():
        command = command.commands[name]
    return command


def _configs():
    from vqa_search.align.finetune import FinetuneConfig
    from vqa_search.align.regions import RegionConfig
    from vqa_search.align.train_rerank import RerankTrainConfig
    from vqa_search.indexer.build import BuildConfig
    from vqa_search.retrieval.recall import RecallConfig
    from vqa_search.vqa.bench import VqaBenchConfig
    from vqa_search.vqa.train import VqaTrainConfig

    return [("index", BuildConfig, {}), ("regions", RegionConfig, {"num_regions": "regions"}),
            ("bench recall", RecallConfig, {"index_dir": "index"}), ("bench vqa", VqaBenchConfig, {"index_dir": "index"}),
            ("train finetune", FinetuneConfig, {}),
            ("train rerank", RerankTrainConfig, {"index_dir": "index", "region_set": "regions", "region_mlp": "region_hidden"}),
            ("train vqa", VqaTrainConfig, {})]


def test_cli_defaults_are_the_library_defaults():
    """The help shows defaults without importing the library; they must still be the library's."""
    compared = 0
    for path, config, renamed in _configs():
        defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
        for parameter in _command(path).params:
            name = renamed.get(parameter.name, parameter.name)
            if name not in defaults or parameter.default is None or parameter.name in ("lam",):
                continue
            assert parameter.default == defaults[name], (path, parameter.name, parameter.default, defaults[name])
            compared += 1
    assert compared >= 40
