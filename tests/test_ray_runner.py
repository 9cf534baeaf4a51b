"""`--runner ray`: the same index and region sets as the local runner, each image written exactly once
even when an actor is killed mid-run, and a stopped run resumed without recomputing what shards hold.

One local Ray (2 CPUs) serves the whole module: starting Ray and its actors is most of the time here.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import tiny_config
from typer.testing import CliRunner

from vqa_search.cli import app
from vqa_search.core.ray_runner import RayRunner, choose_runner
from vqa_search.core.errors import UserError
from vqa_search.core.store import IndexDir
from vqa_search.indexer import build
from vqa_search.indexer.build import BuildConfig, build_index
from vqa_search.shapes import ShapesConfig, make_shapes

IMAGES = 24  # 6 batches of 4
STOPPED_AFTER = 12


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import this test module
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def indexed_locally(tmp_path_factory, one_torch_thread) -> Path:
    """A shapes world indexed by the local runner: the reference."""
    root = tmp_path_factory.mktemp("local") / "shapes"
    make_shapes(root, ShapesConfig(images=IMAGES, size=32, seed=7), progress=False)
    build_index(root, BuildConfig(**tiny_config()))
    return root


def fresh_copy(world: Path, to: Path) -> Path:
    """The same world without its index."""
    shutil.copytree(world, to, ignore=shutil.ignore_patterns(".vqa-search"))
    return to


def committed(root: Path) -> dict:
    index = IndexDir(root / ".vqa-search")
    gen = index.generation(index.read_manifest()["generation"])
    return {"images": pq.read_table(gen / "images.parquet").drop_columns(["mtime_ns"]),
            "captions": pq.read_table(gen / "captions.parquet"),
            "vectors": np.load(gen / "image_embeddings.npy")}


def assert_same_index(root: Path, reference: Path) -> None:
    ours, theirs = committed(root), committed(reference)
    assert ours["images"].equals(theirs["images"])  # same rows (paths, sizes, hashes, widths) in the same order
    assert ours["captions"].equals(theirs["captions"])
    np.testing.assert_array_equal(ours["vectors"], theirs["vectors"])


@dataclass
class ExitAfter:
    """The encoder of an actor that dies (os._exit, like a lost node) at its batch `batches + 1`.

    Only the first actor to get there dies: it leaves `marker`, so the restarted one goes on.
    """

    batches: int
    marker: str
    calls: int = 0

    def __call__(self, clip, pixels):
        from vqa_search.core.encode import encode_image_batch

        self.calls += 1
        if self.calls > self.batches and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)
        return encode_image_batch(clip, pixels)


def pending_paths(root: Path) -> list[str]:
    return [path for table in sorted((root / ".vqa-search" / "pending").glob("images-*.parquet"))
            for path in pq.read_table(table).column("path").to_pylist()]


def test_stopped_run_resumes_and_a_killed_actor_writes_nothing_twice(ray_session, indexed_locally, tmp_path,
                                                                     monkeypatch):
    root = fresh_copy(indexed_locally, tmp_path / "shapes")
    ray_config = BuildConfig(**tiny_config(), runner=RayRunner(actors=1))

    # 1. The driver stops after 3 batches (Ctrl-C): what its writer received is kept in pending/. (At a
    # batch boundary, so that the rerun's batches are the local run's: a batch of another size may
    # round differently in BLAS, and the vectors are compared exactly.)
    add = build._ImageShards.add

    def interrupted_add(self, item, vector):
        if len(self.done) == STOPPED_AFTER:
            raise KeyboardInterrupt
        add(self, item, vector)

    monkeypatch.setattr(build._ImageShards, "add", interrupted_add)
    with pytest.raises(KeyboardInterrupt):
        build_index(root, ray_config)
    first = pending_paths(root)
    assert len(first) == STOPPED_AFTER
    monkeypatch.setattr(build._ImageShards, "add", add)

    # 2. Again, and the actor dies after 2 batches: Ray restarts it and retries its batch.
    marker = tmp_path / "killed"
    monkeypatch.setattr(build, "encode_image_batch", ExitAfter(2, str(marker)))
    commit = IndexDir.commit
    shards_at_commit = []

    def spied_commit(self, files, manifest):
        shards_at_commit.extend(pending_paths(root))
        return commit(self, files, manifest)

    monkeypatch.setattr(IndexDir, "commit", spied_commit)
    report = build_index(root, ray_config)

    assert marker.exists()  # an actor did die mid-run
    assert report.embedded_images == IMAGES - STOPPED_AFTER  # only what no shard held
    assert sorted(shards_at_commit) == sorted(set(shards_at_commit))  # no image written twice
    assert len(shards_at_commit) == IMAGES
    assert_same_index(root, indexed_locally)


def test_regions_on_ray_equal_the_local_ones(ray_session, indexed_locally, tmp_path):
    from vqa_search.align.region_store import RegionSet, compute_regions
    from vqa_search.align.regions import RegionConfig

    local, on_ray = (shutil.copytree(indexed_locally, tmp_path / name) for name in ("local", "ray"))
    settings = {"source": "clip-patches", "workers": 0, "progress": False, "batch_size": 4}
    compute_regions(local, RegionConfig(**settings))
    report = compute_regions(on_ray, RegionConfig(**settings, runner=RayRunner(actors=1)))
    assert report.computed == IMAGES
    ours, theirs = RegionSet.open(on_ray), RegionSet.open(local)
    assert ours.paths == theirs.paths
    rows = np.arange(IMAGES)
    np.testing.assert_array_equal(ours.features(rows), theirs.features(rows))
    np.testing.assert_array_equal(ours.boxes(rows), theirs.boxes(rows))


# ---- the command line: no Ray needed ----------------------------------------------------------------

def test_runner_flags_are_checked_before_any_work(tmp_path):
    assert choose_runner("local") is None
    assert choose_runner("ray", "auto", 3, 0.5) == RayRunner("auto", 3, 0.5)
    for bad, message in [(("spark",), "--runner must be one of local, ray"),
                         (("local", None, 2), "--actors needs --runner ray"),
                         (("ray", None, 0), "--actors must be at least 1"),
                         (("ray", None, None, -1), "--gpus-per-actor must be 0 or more")]:
        with pytest.raises(UserError, match=message):
            choose_runner(*bad)


def test_ray_missing_is_one_line_and_exit_2(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    (tmp_path / "photos").mkdir()
    for command in (["index", str(tmp_path / "photos"), "--runner", "ray"],
                    ["regions", str(tmp_path / "photos"), "--runner", "ray"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2
        assert result.output.strip() == ("error: --runner ray needs Ray, which is not installed: "
                                         "pip install 'vqa-search[ray]'")
