"""kill -9 in the middle of indexing: the next run resumes, losing and duplicating nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
from conftest import tiny_config, write_photo

from vqa_search import Index
from vqa_search.indexer.store import IndexDir

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

    resumed = Index.build(album, **config)
    assert resumed.embedded_images == N_IMAGES - 2 * KILL_AFTER_BATCHES

    clean = Index.build(_album(tmp_path / "clean"), **config)
    assert clean.embedded_images == N_IMAGES
    got, want = Index.open(album), Index.open(tmp_path / "clean")
    assert got.image_paths == want.image_paths == [f"{i:02d}.png" for i in range(N_IMAGES)]
    np.testing.assert_allclose(got.embeddings(), want.embeddings(), atol=1e-6)
    manifest = json.loads((album / ".vqa-search" / "manifest.json").read_text())
    gen = album / ".vqa-search" / f"gen-{manifest['generation']:06d}"
    assert pq.read_table(gen / "images.parquet").num_rows == N_IMAGES
