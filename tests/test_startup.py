"""Start-up: the command line answers at once because it imports no torch, open_clip or FAISS unless a
command really runs a model. Each check runs the command in a fresh interpreter and looks at
sys.modules afterwards. How long start-up takes is measured by benchmarks/startup.py, never asserted
here (shared machines are too noisy for timed tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import COLOURS, tiny_config, write_captions, write_photo
from vqa_search import Index

HEAVY = ("torch", "open_clip", "faiss", "onnxruntime", "onnx")
# what an unchanged re-index must not pay for either: pyarrow.dataset (pq.read_table) and pandas
# (arrow tables built from Python lists): a third of an unchanged re-index's CPU time
NOT_FOR_AN_UNCHANGED_FOLDER = (*HEAVY, "torchvision", "pandas", "pyarrow.dataset")

# Runs `vqa-search ARGS...` as the console script does, then reports its exit code and heavy imports.
PROBE = f"""
import json, sys
from vqa_search.cli import main
watched = json.loads(sys.argv[2])
sys.argv = ["vqa-search", *json.loads(sys.argv[1])]
code = 0
try:
    main()
except SystemExit as exit:
    code = exit.code or 0
sys.stdout.flush()
print("\\nPROBE " + json.dumps({{"code": code, "heavy": [m for m in watched if m in sys.modules]}}))
"""


def _probe(*args: str, cwd: Path | None = None, watch: tuple[str, ...] = HEAVY) -> tuple[dict, str, str]:
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(list(args)), json.dumps(watch)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)
    marker = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    assert marker, done.stdout + done.stderr
    return json.loads(marker[-1][len("PROBE "):]), done.stdout, done.stderr


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory) -> Path:
    """A dataset folder with a committed tiny-model index, and one unreadable file it skipped."""
    root = tmp_path_factory.mktemp("startup") / "photos"
    rows = []
    for i, colour in enumerate(COLOURS[:4]):
        write_photo(root / "Images" / f"photo_{i}.png", colour)
        rows += [(f"photo_{i}.png", f"a picture, number {i}")]
    (root / "Images" / "broken.png").write_bytes(b"not an image")
    write_captions(root / "captions.txt", rows)
    Index.build(root, **tiny_config())
    return root


def test_importing_the_cli_loads_no_heavy_module():
    code = "import sys, vqa_search.cli; print([m for m in %r if m in sys.modules])" % (HEAVY,)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


@pytest.mark.parametrize("args", [
    ["--help"], ["-h"], ["--version"], ["make-shapes", "--help"], ["index", "--help"], ["query", "-h"],
    ["info", "--help"], ["bench", "--help"], ["train", "--help"], ["train", "finetune", "--help"],
    ["train", "rerank", "--help"], ["train", "vqa", "--help"], ["bench", "recall", "--help"], ["serve", "--help"],
])
def test_help_and_version_load_no_heavy_module(args):
    result, stdout, _ = _probe(*args)
    assert result == {"code": 0, "heavy": []}
    assert "vqa-search" in stdout


def test_make_shapes_loads_no_heavy_module(tmp_path):
    result, _, stderr = _probe("make-shapes", str(tmp_path / "shapes"), "--images", "10", "--size", "32", "-q")
    assert result == {"code": 0, "heavy": []}, stderr
    assert (tmp_path / "shapes" / "captions.txt").is_file()


def test_bench_report_loads_no_heavy_module(tmp_path):
    summary = {"R@1": 10.0, "R@5": 30.0, "R@10": 50.0, "median_rank": 10.0, "mean_rank": 20.0}
    chance = {"R@1": 1.0, "R@5": 5.0, "R@10": 10.0}
    run = {"name": "a run", "dataset": "shapes", "split": "test", "n_images": 100, "n_captions": 500,
           "t2i": summary, "i2t": summary, "chance": {"t2i": chance, "i2t": chance},
           "curves": {"t2i": [10.0] * 50, "i2t": [10.0] * 50}}
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(run) + "\n")
    result, stdout, stderr = _probe("bench", "report", str(results))
    assert result == {"code": 0, "heavy": []}, stderr
    assert "| a run |" in stdout


@pytest.mark.parametrize("args", [["info"], ["info", "--json"]])
def test_info_loads_no_heavy_module(tiny_index, args):
    result, stdout, stderr = _probe(*args, str(tiny_index))
    assert result == {"code": 0, "heavy": []}, stderr
    assert "vqa-tiny" in stdout


def test_export_loads_no_heavy_module(tiny_index, tmp_path):
    result, _, stderr = _probe("export", str(tiny_index), "--out", str(tmp_path / "vectors.npz"))
    assert result == {"code": 0, "heavy": []}, stderr
    assert (tmp_path / "vectors.npz").stat().st_size > 0


@pytest.mark.parametrize("weights", [[], ["--model", "vqa-tiny", "--pretrained", "none"]],
                         ids=["recorded weights", "same weights named"])
def test_unchanged_reindex_loads_no_heavy_module(tiny_index, weights):
    """An unchanged folder costs a scan, the manifest and two parquet files: no model, no FAISS, no pandas."""
    result, _, stderr = _probe("index", str(tiny_index), *weights, "--workers", "0", "-q",
                               watch=NOT_FOR_AN_UNCHANGED_FOLDER)
    assert result == {"code": 0, "heavy": []}, stderr
    assert "up to date" in stderr


def test_a_model_command_still_loads_the_model(tiny_index):
    """The other side: a query needs the model, and gets it."""
    result, stdout, stderr = _probe("query", "a picture", "--index", str(tiny_index), "-k", "1")
    assert result["code"] == 0, stderr
    assert {"torch", "open_clip", "faiss"} <= set(result["heavy"])
    assert "photo_" in stdout
