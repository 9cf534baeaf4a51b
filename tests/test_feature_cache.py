"""Frozen-feature caches (core/feature_cache.py): memory-mapped from disk, training is the very same as
from RAM for all three trainers; a cache is committed whole or not at all, reused by the next run and
computed again when what produced it changes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from vqa_search.align import finetune as stage1
from vqa_search.align.finetune import FinetuneConfig, finetune
from vqa_search.align.region_store import compute_regions
from vqa_search.align.regions import RegionConfig
from vqa_search.align.train_rerank import RerankTrainConfig, train_reranker
from vqa_search.core import feature_cache, runner
from vqa_search.core.feature_cache import CacheConfig, FeatureCache, RowWriter, take
from vqa_search.core.identity import TINY_MODEL, resolve_identity
from vqa_search.core.models import load_clip
from vqa_search.indexer.build import BuildConfig, build_index
from vqa_search.shapes import ShapesConfig, make_shapes
from vqa_search.vqa.data import read_vqa
from vqa_search.vqa.features import LocalEncoder, image_features
from vqa_search.vqa.train import VqaTrainConfig, train_vqa

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TIMINGS = ("seconds", "val_seconds")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A shapes world with an index and clip-patches regions: every trainer can run on it."""
    root = tmp_path_factory.mktemp("cache") / "shapes"
    make_shapes(root, ShapesConfig(images=80, size=32, seed=5), progress=False)
    build_index(root, BuildConfig(**tiny_config()))
    compute_regions(root, RegionConfig(source="clip-patches", workers=0, progress=False))
    return root


def _history(result) -> list[dict]:
    return [{key: value for key, value in record.items() if key not in TIMINGS} for record in result.history]


def _same_weights(a: Path, b: Path) -> None:
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def _entries(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir()) if directory.is_dir() else []


def _no_runner(monkeypatch) -> None:
    """Any image decoded or encoded from here on fails the test: the cache must answer."""
    def refuse(*args, **kwargs):
        raise AssertionError("the runner ran although the cache holds the features")
    monkeypatch.setattr(runner, "run", refuse)


# Exact, not within a tolerance: both modes store the same dtype, so a batch gathers the same bytes
# (from a memory-mapped file or from RAM) and every later operation runs on identical tensors.

def test_stage1_unfreeze_last_trains_the_same_epoch_from_disk_as_from_memory(world, tmp_path, monkeypatch):
    config = FinetuneConfig(model=TINY_MODEL, pretrained="none", workers=0, lr=1e-3, batch_size=16, epochs=1,
                            unfreeze_last=1, cache_dir=tmp_path / "cache")
    memory = finetune(world, tmp_path / "memory.safetensors", FinetuneConfig(**{**vars(config), "cache": "memory"}),
                      progress=False)
    assert _entries(tmp_path / "cache") == []  # memory mode writes nothing
    disk = finetune(world, tmp_path / "disk.safetensors", FinetuneConfig(**{**vars(config), "cache": "disk"}),
                    progress=False)
    assert [name.split("-")[:3] for name in _entries(tmp_path / "cache")] == [["finetune", "image", "prefix"],
                                                                             ["finetune", "text", "prefix"]]
    assert _history(memory) == _history(disk)
    _same_weights(memory.checkpoint, disk.checkpoint)

    monkeypatch.setattr(stage1, "_frozen_images", lambda *args: pytest.fail("image prefix computed again"))
    monkeypatch.setattr(stage1, "text_prefix", lambda *args: pytest.fail("text prefix computed again"))
    again = finetune(world, tmp_path / "again.safetensors", FinetuneConfig(**{**vars(config), "cache": "auto"}),
                     progress=False)
    assert _history(again) == _history(memory)
    _same_weights(memory.checkpoint, again.checkpoint)


@pytest.mark.parametrize("variant, cached", [("dual-attention", ["vqa-image-vectors", "vqa-local-streams"]),
                                             ("regions", ["vqa-image-vectors", "vqa-regions"])])
def test_vqa_head_trains_the_same_epoch_from_disk_as_from_memory(world, tmp_path, monkeypatch, variant, cached):
    config = VqaTrainConfig(variant=variant, model=TINY_MODEL, pretrained="none", local_model=TINY_MODEL,
                            local_pretrained="none", unfreeze_last=1, epochs=1, batch_size=32, hidden=32,
                            workers=0, cache_dir=tmp_path / "cache")
    memory = train_vqa(world, tmp_path / "memory.safetensors", VqaTrainConfig(**{**vars(config), "cache": "memory"}),
                       progress=False)
    disk = train_vqa(world, tmp_path / "disk.safetensors", VqaTrainConfig(**{**vars(config), "cache": "disk"}),
                     progress=False)
    assert [name.rsplit("-", 1)[0] for name in _entries(tmp_path / "cache")] == cached
    assert _history(memory) == _history(disk)
    _same_weights(tmp_path / "memory.safetensors", tmp_path / "disk.safetensors")

    _no_runner(monkeypatch)  # a second run decodes no image at all
    again = train_vqa(world, tmp_path / "again.safetensors", VqaTrainConfig(**{**vars(config), "cache": "disk"}),
                      progress=False)
    assert _history(again) == _history(memory)


def test_stage2_trains_the_same_epoch_from_disk_as_from_memory(world, tmp_path, monkeypatch):
    config = RerankTrainConfig(model=TINY_MODEL, pretrained="none", negatives=4, epochs=1, batch_size=32,
                               attention_dim=16, top=8, progress=False, cache_dir=tmp_path / "cache")
    memory = train_reranker(world, RerankTrainConfig(**{**vars(config), "cache": "memory",
                                                        "out": tmp_path / "memory.safetensors"}))
    disk = train_reranker(world, RerankTrainConfig(**{**vars(config), "cache": "disk",
                                                      "out": tmp_path / "disk.safetensors"}))
    assert [name.split("-")[1] for name in _entries(tmp_path / "cache")] == ["caption"]
    assert _history(memory) == _history(disk)
    _same_weights(memory.path, disk.path)


def test_a_crash_while_writing_leaves_no_cache_a_later_run_would_use(world, tmp_path, monkeypatch):
    clip = load_clip(resolve_identity(TINY_MODEL, "none"))
    images = sorted((world / "Images").glob("*.png"))[:12]
    cache = FeatureCache(CacheConfig("disk"), tmp_path / "cache")
    add = RowWriter.add
    written = []

    def fail_after_five(self, item, result):
        if len(written) == 5:
            raise OSError("disk full")
        written.append(item.key)
        add(self, item, result)

    monkeypatch.setattr(RowWriter, "add", fail_after_five)
    with pytest.raises(OSError, match="disk full"):
        image_features(clip, None, images, batch_size=4, cache=cache)
    assert _entries(tmp_path / "cache") == []  # neither the entry nor its staging directory

    # a writer killed outright leaves its staging directory: the next run deletes it and computes anew
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = tmp_path / "cache" / f".staging-vqa-image-vectors-0-{int(dead.stdout)}-x1y2"
    abandoned.mkdir()
    (abandoned / "rows.npy").write_bytes(b"half")
    monkeypatch.setattr(RowWriter, "add", add)
    features = image_features(clip, None, images, batch_size=4, cache=cache)
    assert not abandoned.exists()
    assert [name.split("-")[:3] for name in _entries(tmp_path / "cache")] == [["vqa", "image", "vectors"]]
    reference = image_features(clip, None, images, batch_size=4)  # in memory
    assert torch.equal(features.global_vectors, reference.global_vectors)


def test_the_cache_is_reused_and_recomputed_when_its_producer_changes(world, tmp_path, monkeypatch):
    identity = resolve_identity(TINY_MODEL, "none")
    clip, local = load_clip(identity), LocalEncoder(load_clip(identity), unfreeze_last=1)
    images = sorted((world / "Images").glob("*.png"))[:8]
    cache = FeatureCache(CacheConfig("disk"), tmp_path / "cache")
    first = image_features(clip, local, images, batch_size=4, cache=cache)
    assert isinstance(first.local_streams, np.memmap) and first.local_streams.dtype == np.float16
    entries = _entries(tmp_path / "cache")

    ran = []
    monkeypatch.setattr(runner, "run", lambda *args, **kwargs: ran.append(1) or real_run(*args, **kwargs))
    again = image_features(clip, local, images, batch_size=4, cache=cache)
    assert ran == [] and _entries(tmp_path / "cache") == entries
    assert torch.equal(take(again.local_streams, [3, 1]), take(first.local_streams, [3, 1]))

    deeper = LocalEncoder(load_clip(identity), unfreeze_last=2)  # another frozen depth: another stream
    image_features(clip, deeper, images, batch_size=4, cache=cache)
    assert ran == [1]  # the global vectors are the same producer's: reused

    os.utime(images[0], ns=(1, 1))  # a file changed: the image set is not the same any more
    image_features(clip, local, images, batch_size=4, cache=cache)
    assert ran == [1, 1, 1]

    checkpoint = tmp_path / "other.safetensors"
    from safetensors.torch import save_file
    save_file({name: tensor.contiguous() + 0.01 for name, tensor in clip.model.state_dict().items()}, checkpoint)
    other = load_clip(resolve_identity(TINY_MODEL, str(checkpoint)))
    changed = image_features(other, None, images, batch_size=4, cache=cache)
    assert ran == [1, 1, 1, 1]  # other weights: computed, not the stored vectors
    assert not torch.equal(changed.global_vectors, first.global_vectors)


real_run = runner.run


def test_take_returns_rows_in_the_order_asked_from_ram_or_a_memory_map(tmp_path):
    array = np.random.default_rng(0).standard_normal((20, 3, 2)).astype(np.float32)
    np.save(tmp_path / "a.npy", array)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    rows = [7, 2, 19, 2, 0]
    assert torch.equal(take(array, rows), torch.from_numpy(array[rows]))
    assert torch.equal(take(mapped, torch.tensor(rows)), torch.from_numpy(array[rows]))


def test_auto_goes_to_disk_above_half_the_available_memory(tmp_path, monkeypatch):
    identity = resolve_identity(TINY_MODEL, "none")
    cache = FeatureCache(CacheConfig("auto"), tmp_path)
    monkeypatch.setattr(feature_cache, "available_memory", lambda: 2000)
    assert cache.in_memory(1000) and not cache.in_memory(1001)
    for size, on_disk in ((250, False), (251, True)):  # float32 rows of 1 value: 4 bytes each
        with cache.entry("test", identity, size=size).build() as builder:
            builder.array("rows", (size,), np.float32)[:] = 1
        assert builder.stored.on_disk is on_disk
    assert FeatureCache(CacheConfig("memory"), tmp_path).in_memory(10**15)
    assert not FeatureCache(CacheConfig("disk"), tmp_path).in_memory(1)
    with pytest.raises(feature_cache.UserError, match="--cache must be one of auto, memory, disk"):
        FeatureCache(CacheConfig("ram"), tmp_path)


@pytest.mark.parametrize("command", [["finetune", "--out", "x.safetensors"], ["rerank"],
                                     ["vqa", "--out", "x.safetensors"]])
def test_cli_refuses_an_unknown_cache_mode_in_one_line(world, tmp_path, command):
    from typer.testing import CliRunner

    from vqa_search.cli import app

    name, *options = command
    result = CliRunner().invoke(app, ["train", name, str(world), *options, "--model", TINY_MODEL, "--pretrained",
                                      "none", "--cache", "ram", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --cache must be one of auto, memory, disk (got 'ram')"
