"""End to end on 300 real Flickr8k photos whose caption files name all 8,091 (a partial download)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from vqa_search.cli import app

runner = CliRunner()
TINY = ["--model", "vqa-tiny", "--pretrained", "none", "--workers", "0"]


def test_index_and_query_the_shared_sample(shared_sample, tmp_path):
    out = tmp_path / "index"
    indexed = runner.invoke(app, ["index", str(shared_sample), "--out", str(out), *TINY, "--json"])

    assert indexed.exit_code == 0, indexed.stderr
    report = json.loads(indexed.stdout)
    assert (report["images"], report["captions"], report["skipped"]) == (300, 1500, [])
    assert "7791 images named in captions.txt are not on disk" in indexed.stderr

    found = runner.invoke(app, ["query", "a dog runs on the beach", "--index", str(out), "-k", "3", "--json"])

    assert found.exit_code == 0, found.stderr
    results = json.loads(found.stdout)["results"]
    assert [r["rank"] for r in results] == [1, 2, 3]
    assert all((shared_sample / "Images" / r["image"]).is_file() and len(r["captions"]) == 5 for r in results)
