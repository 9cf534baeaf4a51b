"""Inference backends and precisions (core/inference.py, core/backends.py) against the PyTorch reference.

The tiny random CLIP's ONNX export is made once per test session (conftest points the cache at a
session directory); every ONNX test after the first opens it.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import tiny_config
from vqa_search import Index
from vqa_search.cli import app
from vqa_search.core import backends, inference
from vqa_search.core.encode import encode_image_batch, encode_texts
from vqa_search.core.identity import TINY_MODEL, resolve_identity
from vqa_search.core.inference import REFERENCE, Plan, TowerRun, choose_plan, plan_for_queries
from vqa_search.core.models import load_clip

TEXTS = ["", "one", "a dog", "two children in red jackets play with a ball near the water",
         " ".join(["a dog runs on the beach"] * 20)]  # longer than the context: cut at 77 tokens
# A random 64-wide CLIP quantises worse than ViT-B-32, whose int8 embeddings keep cosine >= 0.999
# (benchmarks/precision.py); this bound still fails on a broken quantisation (cosine ~0 or negative).
TINY_INT8_COSINE = 0.98


def uniform(backend: str, precision: str) -> Plan:
    return Plan(TowerRun(backend, precision), TowerRun(backend, precision), (backend, precision))


@pytest.fixture(scope="module")
def reference():
    return load_clip(resolve_identity(TINY_MODEL, "none"), torch.device("cpu"))


def variant(clip, plan: Plan):
    return dataclasses.replace(clip, plan=plan, _towers=None)


def pixels(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("count", [1, 3, 7])
def test_onnx_image_tower_equals_torch(reference, count, one_torch_thread):
    onnx = variant(reference, uniform("onnx", "fp32"))
    batch = pixels(count, seed=count)
    np.testing.assert_allclose(encode_image_batch(onnx, batch), encode_image_batch(reference, batch), atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_onnx_text_tower_equals_torch_for_every_length(reference, batch_size, one_torch_thread):
    """encode_texts cuts each batch to its longest caption: the graph takes any batch and length."""
    onnx = variant(reference, uniform("onnx", "fp32"))
    np.testing.assert_allclose(encode_texts(onnx, TEXTS, batch_size=batch_size), encode_texts(reference, TEXTS),
                               atol=1e-5)


def test_onnx_text_graph_also_takes_all_77_tokens(reference, one_torch_thread):
    tokens = reference.tokenizer(TEXTS)
    with torch.inference_mode():
        expected = reference.model.encode_text(tokens)
    got = variant(reference, uniform("onnx", "fp32")).towers.text(tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_int8_stays_close_to_fp32(reference, backend, one_torch_thread):
    int8 = variant(reference, uniform(backend, "int8"))
    batch = pixels(6)
    image_cosine = np.einsum("nd,nd->n", encode_image_batch(int8, batch), encode_image_batch(reference, batch))
    text_cosine = np.einsum("nd,nd->n", encode_texts(int8, TEXTS), encode_texts(reference, TEXTS))
    assert image_cosine.min() >= TINY_INT8_COSINE and text_cosine.min() >= TINY_INT8_COSINE
    assert image_cosine.min() < 1 - 1e-6 or text_cosine.min() < 1 - 1e-6  # int8 really ran


def test_bf16_autocast_stays_close_to_fp32(reference, one_torch_thread):
    bf16 = variant(reference, uniform("torch", "bf16"))
    cosine = np.einsum("nd,nd->n", encode_texts(bf16, TEXTS), encode_texts(reference, TEXTS))
    assert cosine.min() >= 0.999


def test_export_is_cached_and_made_again_for_other_weights(reference, tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setenv(backends.CACHE_VARIABLE, str(tmp_path / "cache"))
    first = backends.ensure_export(reference, "image", "fp32")
    exported = [path for path in first.parent.parent.rglob("*") if path.is_file()]
    assert first.is_file() and json.loads((first.parent.parent / "export.json").read_text())["key"] == first.parent.parent.name

    def no_export(*args):
        raise AssertionError("exported again")

    with monkeypatch.context() as patch:
        patch.setattr(backends, "_export", no_export)
        assert backends.ensure_export(load_clip(reference.identity, torch.device("cpu")), "image", "fp32") == first
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # no temporary directory left beside the export

    state = {key: value.clone() for key, value in reference.model.state_dict().items()}
    state["visual.proj"] += 0.05
    checkpoint = tmp_path / "changed.safetensors"
    save_file(state, checkpoint)
    changed = load_clip(resolve_identity(TINY_MODEL, str(checkpoint)), torch.device("cpu"))
    second = backends.ensure_export(changed, "image", "fp32")
    assert second != first and all(path.is_file() for path in exported)
    batch = pixels(2)
    np.testing.assert_allclose(encode_image_batch(variant(changed, uniform("onnx", "fp32")), batch),
                               encode_image_batch(changed, batch), atol=1e-5)


def test_auto_rule_per_device():
    # the CPU keeps the reference until benchmarks/precision.py has measured a faster faithful plan
    assert choose_plan(device="cpu", has_onnx=True) == Plan(REFERENCE.image, REFERENCE.text, ("auto", "auto"))
    assert choose_plan(device="cpu", has_onnx=False) == Plan(REFERENCE.image, REFERENCE.text, ("auto", "auto"))
    assert choose_plan("onnx", "auto", "cpu", has_onnx=True).image == TowerRun("onnx", "fp32")
    assert choose_plan("onnx", "int8", "cpu", has_onnx=True).text == TowerRun("onnx", "int8")
    assert choose_plan(device="cuda", has_onnx=True) == Plan(TowerRun("torch", "fp16"), TowerRun("torch", "fp16"))
    assert choose_plan("torch", "fp32", "cpu") == REFERENCE
    assert choose_plan("auto", "bf16", "cpu", has_onnx=True).text == TowerRun("torch", "bf16")
    assert choose_plan("auto", "int8", "cpu", has_onnx=False).text == TowerRun("torch", "int8")


@pytest.mark.parametrize("backend, precision, device, has_onnx, message", [
    ("auto", "fp16", "cpu", True, "fp16 needs a CUDA GPU"),
    ("onnx", "auto", "cpu", False, "pip install onnxruntime"),
    ("onnx", "bf16", "cpu", True, "runs fp32 or int8"),
    ("torch", "int8", "cuda", True, "int8 runs on the CPU only"),
    ("tensorrt", "auto", "cpu", True, "unknown --backend"),
])
def test_plans_that_cannot_run_are_user_errors(backend, precision, device, has_onnx, message):
    with pytest.raises(inference.UserError, match=message):
        choose_plan(backend, precision, device, has_onnx)


def test_queries_fall_back_where_the_recorded_plan_cannot_run(monkeypatch):
    gpu = Plan(TowerRun("torch", "fp16"), TowerRun("torch", "fp16"), ("auto", "auto"))
    monkeypatch.setattr(inference, "onnx_available", lambda: True)
    assert plan_for_queries(gpu, "cpu") == choose_plan("auto", "auto", "cpu")
    assert plan_for_queries(None, "cpu") == REFERENCE  # made before backends: embedded in fp32 PyTorch
    monkeypatch.setattr(inference, "onnx_available", lambda: False)
    recorded = choose_plan("onnx", "int8", "cpu", has_onnx=True)
    assert plan_for_queries(recorded, "cpu") == choose_plan("auto", "int8", "cpu")  # torch int8


def test_manifest_records_the_plan_and_queries_use_it(photos, one_torch_thread):
    built = Index.build(photos, **tiny_config(backend="onnx", precision="int8"))
    record = built.manifest["inference"]
    assert record["image"] == record["text"] == {"backend": "onnx", "precision": "int8"}
    assert record["onnx_export"] == backends.export_key(built.clip)
    assert "onnx int8" in built.report.summary()

    index = Index.open(photos / ".vqa-search")
    assert index.clip.plan == Plan.from_json(record)
    query = encode_texts(index.clip, ["a picture"])
    np.testing.assert_array_equal(index._query_vector("a picture", None)[0], query)
    reference = encode_texts(load_clip(index.identity, torch.device("cpu")), ["a picture"])
    assert float(query[0] @ reference[0]) >= TINY_INT8_COSINE  # an int8 index answers fp32 text too

    photos.joinpath("Images", "photo_0.png").unlink()  # an update without flags keeps the index's plan
    assert Index.build(photos, **tiny_config()).manifest["inference"]["image"]["precision"] == "int8"


def test_cli_refuses_what_cannot_run_here_in_one_line(photos, monkeypatch):
    monkeypatch.setattr(inference, "onnx_available", lambda: False)
    for flags, fragment in ((["--precision", "fp16"], "fp16 needs a CUDA GPU"),
                            (["--backend", "onnx"], "needs onnxruntime"),
                            (["--precision", "int4"], "unknown --precision")):
        if flags[1] == "fp16" and torch.cuda.is_available():
            continue
        result = CliRunner().invoke(app, ["index", str(photos), "--model", TINY_MODEL, "--pretrained", "none",
                                          "--workers", "0", *flags])
        assert result.exit_code == 2, result.output + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert not (photos / ".vqa-search").exists()
