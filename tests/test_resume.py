"""kill -9 in the middle of indexing: the next run resumes, losing and duplicating nothing."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow.parquet as pq
from conftest import tiny_config, write_photo

from vqa_search import Index
from vqa_search.core.store import IndexDir

N_IMAGES = 12
KILL_AFTER_BATCHES = 3

# Runs the real builder in a child process that SIGKILLs itself after a few batches were embedded.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from vqa_search.indexer import build
    real = build.encode_image_batch
    batches = 0
    def dying(clip, pixels):
        global batches
        batches += 1
        if batches > {kill_after}:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(clip, pixels)
    build.encode_image_batch = dying
    build.build_index(sys.argv[1], build.BuildConfig(**{config}))
    """
)


def _album(root, n=N_IMAGES):
    for i in range(n):
        write_photo(root / f"{i:02d}.png", (i * 20, 255 - i * 20, (i * 77) % 256))
    return root


def test_killed_run_resumes_without_loss_or_duplicates(tmp_path):
    album = _album(tmp_path / "album")
    config = tiny_config(batch_size=2, rows_per_shard=2)
    child = CHILD.format(kill_after=KILL_AFTER_BATCHES, config=repr(config))
    finished = subprocess.run([sys.executable, "-c", child, str(album)], capture_output=True, text=True, timeout=120)
    assert finished.returncode == -9, finished.stderr

    index_dir = IndexDir(album / ".vqa-search")
    assert not index_dir.exists()  # nothing committed: a query would see no index, not half of one
    shards = sorted(p.name for p in index_dir.pending.glob("images-*.parquet"))
    assert len(shards) == KILL_AFTER_BATCHES  # every embedded batch reached the disk

    resumed = Index.build(album, **config).report
    assert resumed.embedded_images == N_IMAGES - 2 * KILL_AFTER_BATCHES

    clean = Index.build(_album(tmp_path / "clean"), **config).report
    assert clean.embedded_images == N_IMAGES
    got, want = Index.open(album), Index.open(tmp_path / "clean")
    assert got.image_paths == want.image_paths == [f"{i:02d}.png" for i in range(N_IMAGES)]
    np.testing.assert_allclose(got.embeddings(), want.embeddings(), atol=1e-6)
    manifest = json.loads((album / ".vqa-search" / "manifest.json").read_text())
    gen = album / ".vqa-search" / f"gen-{manifest['generation']:06d}"
    assert pq.read_table(gen / "images.parquet").num_rows == N_IMAGES


# A writer whose decoding worker is stuck in a slow file when the writer is killed.
STUCK_WORKER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from vqa_search.core.image_stream import ImageReader, ImageRef
    from vqa_search.core.store import IndexDir

    def stuck(image):
        Path(sys.argv[2]).write_text(str(os.getpid()))
        time.sleep(60)

    with IndexDir(sys.argv[1]).lock():
        for batch in ImageReader([ImageRef(Path(sys.argv[3]) / "00.png", "00.png")], stuck, 1, workers=1):
            pass
    """
)


def test_a_killed_writer_s_worker_does_not_keep_the_lock(tmp_path):
    """A flock is shared with forked workers; the resume must not wait for them to notice the death."""
    album = _album(tmp_path / "album", n=1)
    worker_pid_file = tmp_path / "worker.pid"
    writer = subprocess.Popen([sys.executable, "-c", STUCK_WORKER, str(tmp_path / "index"), str(worker_pid_file),
                               str(album)])
    try:
        for _ in range(600):
            if worker_pid_file.exists() and worker_pid_file.read_text():
                break
            time.sleep(0.1)
        writer.kill()
        writer.wait(timeout=30)
        worker = int(worker_pid_file.read_text())
        os.kill(worker, 0)  # the worker outlives the writer: the case that matters
        with IndexDir(tmp_path / "index").lock():
            pass
    finally:
        writer.kill()
        if worker_pid_file.exists() and worker_pid_file.read_text():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(worker_pid_file.read_text()), signal.SIGKILL)


def test_shards_left_after_the_commit_point_are_removed(tmp_path):
    """Killed between writing the manifest and clearing pending/: the next run finds the index up
    to date, and must not leave the shards holding space forever."""
    album = _album(tmp_path / "album", n=3)
    Index.build(album, **tiny_config())
    index_dir = IndexDir(album / ".vqa-search")
    writer = index_dir.shard_writer("images", Index.open(album).identity, rows_per_shard=1)
    writer.add({"path": "00.png", "bytes": 1, "mtime_ns": 1, "sha256": "x", "width": 1, "height": 1,
                "reason": None}, np.zeros(64, np.float32))
    assert list(index_dir.pending.glob("images-*.parquet"))
    assert Index.build(album, **tiny_config()).report.up_to_date
    assert not index_dir.pending.exists()
