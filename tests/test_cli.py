"""The command line as a user meets it: exit codes, one-line errors, JSON output, help examples."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from vqa_search.cli import app

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


@pytest.mark.parametrize("command", ["index", "query", "export", "make-shapes", "bench recall", "bench report"])
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
    assert lines[1].split()[:3] == ["1", "1.000", "photo_2.png"]
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
