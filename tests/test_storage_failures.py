"""Failures of the machine, not the file: a full disk, a read-only index, a searcher outliving its generation.

The full disk is real: a small tmpfs of the test's own, filled at a chosen moment (needs root).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import tiny_config, write_photo
from typer.testing import CliRunner

from vqa_search import Index
from vqa_search.cli import app
from vqa_search.core.errors import UserError
from vqa_search.core.store import IndexDir

TINY = ["--model", "vqa-tiny", "--pretrained", "none", "--workers", "0", "--batch-size", "4", "--quiet"]
DISK_FULL = "disk full (No space left on device)"


def _album(root: Path, stop: int, start: int = 0) -> Path:
    for i in range(start, stop):
        write_photo(root / f"{i:02d}.png", (i * 40 % 256, 255 - i * 30, i * 77 % 256))
    return root


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@pytest.fixture
def disk(tmp_path) -> Iterator[Path]:
    """A 2 MB tmpfs: small enough to fill in a moment, and nobody else's disk."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = _mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point))
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:  # lazily: a searcher's memory maps may still hold it
        subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


def _remount(disk: Path, option: str) -> None:
    remounted = _mount("-o", f"remount,{option}", str(disk))
    assert remounted.returncode == 0, remounted.stderr


def _fill(disk: Path) -> None:
    """Take every free block, as another program filling the disk would."""
    with open(disk / "ballast", "ab", buffering=0) as ballast:
        for size in (1 << 16, 1 << 12):
            try:
                while True:
                    ballast.write(bytes(size))
            except OSError as error:
                assert error.errno == errno.ENOSPC
    assert os.statvfs(disk).f_bavail == 0


def _assert_answers(index: Path, images: int) -> None:
    assert len(Index.open(index).search(text="a photo", k=10).results) == images


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0].removeprefix("error: ")


def test_disk_full_at_the_first_shard_flush(tmp_path, disk, monkeypatch):
    album, index = _album(tmp_path / "album", 4), disk / "index"
    config = tiny_config(out=index, batch_size=2, rows_per_shard=2)
    Index.build(album, **config)
    _album(album, 8, start=4)
    real_shard_writer = IndexDir.shard_writer

    def writer_then_full_disk(self, *args, **kwargs):  # pending/model.json is written, no shard yet
        writer = real_shard_writer(self, *args, **kwargs)
        _fill(disk)
        return writer

    monkeypatch.setattr(IndexDir, "shard_writer", writer_then_full_disk)
    with pytest.raises(UserError) as failure:
        Index.build(album, **config)
    assert str(failure.value) == (
        f"{DISK_FULL} writing shard images-000000 in {index / 'pending'}: the 2 images embedded for it are lost "
        "and will be embedded again; the committed index is unchanged"
    )
    assert sorted(p.name for p in index.iterdir()) == [".lock", "gen-000001", "manifest.json", "pending"]
    assert [p.name for p in (index / "pending").iterdir()] == ["model.json"]  # no half shard holding space
    _assert_answers(index, 4)

    monkeypatch.undo()
    _remount(disk, "size=8m")
    resumed = Index.build(album, **config).report
    assert (resumed.images, resumed.embedded_images) == (8, 4)
    _assert_answers(index, 8)


def test_disk_full_at_the_commit_keeps_the_pending_shards(tmp_path, disk, monkeypatch):
    album, index = _album(tmp_path / "album", 4), disk / "index"
    Index.build(album, **tiny_config(out=index))
    _album(album, 8, start=4)
    real_commit = IndexDir.commit

    def full_disk_then_commit(self, *args):  # every shard is written, the generation is not
        _fill(disk)
        return real_commit(self, *args)

    monkeypatch.setattr(IndexDir, "commit", full_disk_then_commit)
    message = _one_line_error(_cli("index", str(album), "--out", str(index), *TINY))
    assert message == (
        f"{DISK_FULL} writing generation gen-000002 in {index}: it was removed; the shards of 4 images in "
        f"{index / 'pending'} are kept and the next run resumes from them; the committed index is unchanged"
    )
    assert not list(index.glob(".staging-*")) and not (index / "gen-000002").exists()
    assert json.loads((index / "manifest.json").read_text())["generation"] == 1
    assert [p.name for p in (index / "pending").glob("*.parquet")] == ["images-000000.parquet"]
    _assert_answers(index, 4)

    monkeypatch.undo()
    _remount(disk, "size=8m")
    resumed = Index.build(album, **tiny_config(out=index)).report
    assert (resumed.images, resumed.embedded_images) == (8, 0)
    assert not (index / "pending").exists()
    _assert_answers(index, 8)


@pytest.fixture
def read_only_later(tmp_path) -> Iterator[tuple[Path, Callable[[], None]]]:
    """A folder and how to make it read-only: a tmpfs remounted ro as root (chmod does not stop root),
    else chmod."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        yield folder, lambda: _chmod_tree(folder, 0o555, 0o444)
        _chmod_tree(folder, 0o755, 0o644)
        return
    if _mount("-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)).returncode:
        pytest.skip("as root, only a read-only mount stops writes, and mounting a tmpfs failed")
    try:
        yield folder, lambda: _remount(folder, "ro")
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def _chmod_tree(root: Path, folders: int, files: int) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(folders if path.is_dir() else files)


def test_read_only_index_refuses_to_index_and_still_answers(read_only_later):
    folder, make_read_only = read_only_later
    album = _album(folder / "album", 4)
    assert _cli("index", str(album), *TINY).exit_code == 0
    make_read_only()
    message = _one_line_error(_cli("index", str(album), *TINY))  # nothing changed, nothing to write but the lock
    assert message.startswith(f"cannot write the index at {album / '.vqa-search'} (")
    assert message.endswith("): nothing was written; the committed index is unchanged")
    answered = _cli("query", "a photo", "--index", str(album), "--json")
    assert answered.exit_code == 0, answered.stderr
    assert len(json.loads(answered.stdout)["results"]) == 4


def test_searcher_open_across_two_commits_says_so(tmp_path):
    album = _album(tmp_path / "album", 4)
    Index.build(album, **tiny_config())
    searcher = Index.open(album)
    for late in (4, 5):
        _album(album, late + 1, start=late)
        Index.build(album, **tiny_config())
    changed = (rf"the index at {album / '.vqa-search'} changed since it was opened "
               r"\(generation 1 is gone, 3 is live\): open it again")
    with pytest.raises(UserError, match=changed):
        searcher.search(text="a photo")
    with pytest.raises(UserError, match=changed):
        searcher.search(text="a photo", target="captions")  # not "no captions were indexed"
    with pytest.raises(UserError, match=changed):
        searcher.embeddings()
    assert len(Index.open(album).search(text="a photo").results) == 6


def test_a_commit_removes_staging_left_by_a_killed_writer(tmp_path):
    album = _album(tmp_path / "album", 2)
    Index.build(album, **tiny_config())
    stale = album / ".vqa-search" / ".staging-000002"
    stale.mkdir()
    (stale / "images.parquet").write_bytes(b"half")
    _album(album, 3, start=2)
    Index.build(album, **tiny_config())
    assert not list((album / ".vqa-search").glob(".staging-*"))
    assert len(Index.open(album).search(text="a photo").results) == 3


def test_a_full_disk_anywhere_else_is_one_line_too(disk):
    """Writers outside the index (generated datasets, reports) have no words of their own for it."""
    _fill(disk)
    result = _cli("make-shapes", str(disk / "shapes"), "--images", "8", "--quiet")
    message = _one_line_error(result)
    assert message.startswith(f"no space left on device: {disk / 'shapes'}/"), message
