"""The index directory on disk: committed generations, pending shards, the manifest and the lock.

    INDEX_DIR/
      manifest.json          the commit point, replaced atomically; names the live generation
      gen-000007/            immutable once the manifest names it
        images.parquet       id, path, bytes, mtime_ns, sha256, width, height
        captions.parquet     id, image_id, text
        image_embeddings.npy caption_embeddings.npy   float32, L2-normalised, row = id
        images.faiss         captions.faiss
      pending/               shards of a run that has not committed yet (resumed after a crash)
        model.json  images-000003.npy + images-000003.parquet  captions-000001.npy + ...parquet
      .lock                  held (flock) by the one process writing

A query reads the manifest, then only files of the generation it names, so it never sees a
half-written index. A shard counts once its parquet file exists (written after its .npy).

`GenerationDir` is what any such directory has: the lock, the manifest, generations and their atomic
commit, and one-line storage errors. `IndexDir` adds what only the index has: pending/ and the
embedding cache read from it and from the live generation. Region sets (align/region_store.py) are
a `GenerationDir` with their own shards.

A full or read-only disk is one line (`GenerationDir.writing`): what failed, where, and what was kept.
A failed commit removes what it wrote; the live generation and pending/ stay as they were.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vqa_search.core.atomic import atomic_path, write_json
from vqa_search.core.errors import UserError, storage_failure
from vqa_search.core.identity import ModelIdentity

FORMAT_VERSION = 1
DEFAULT_DIR_NAME = ".vqa-search"
MANIFEST = "manifest.json"

IMAGE_RECORD_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("bytes", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("reason", pa.string()),  # why the file was skipped; null when it was embedded
    ]
)
IMAGES_SCHEMA = pa.schema([("id", pa.int64())] + [f for f in IMAGE_RECORD_SCHEMA if f.name != "reason"])
CAPTIONS_SCHEMA = pa.schema([("id", pa.int64()), ("image_id", pa.int64()), ("text", pa.string())])


def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    """pq.read_table without pyarrow.dataset, which imports pandas: an unchanged re-index of 500 photos
    took 1.40 s of CPU with them and 0.90 s without (benchmarks/results/race_busy_machine.json)."""
    with pq.ParquetFile(path) as parquet:
        return parquet.read(columns=columns)


_HELD_LOCKS: list[BinaryIO] = []  # the lock files this process holds open


def close_inherited_locks(_worker_id: int = 0) -> None:
    """In a process forked from a writer (a decoding worker): close its copies of the lock files.

    A flock belongs to the open file, which a fork shares: a worker outliving a writer killed with
    kill -9 would otherwise hold the lock for seconds and have the resume refused. Closing a copy
    does not unlock the writer's own.
    """
    for handle in _HELD_LOCKS:
        handle.close()
    _HELD_LOCKS.clear()


@dataclass(frozen=True)
class FileState:
    """What decides whether a file changed without reading it."""

    path: str
    bytes: int
    mtime_ns: int


@dataclass
class ImageRecord:
    state: FileState
    sha256: str
    width: int = 0
    height: int = 0
    reason: str | None = None  # set when the file was skipped
    embedding: np.ndarray | None = None


@dataclass
class EmbeddingCache:
    """Every embedding already paid for: the committed generation plus pending shards."""

    by_state: dict[FileState, ImageRecord] = field(default_factory=dict)
    by_sha256: dict[str, ImageRecord] = field(default_factory=dict)
    by_text: dict[str, np.ndarray] = field(default_factory=dict)

    def add_image(self, record: ImageRecord) -> None:
        self.by_state[record.state] = record
        if record.reason is None:
            self.by_sha256[record.sha256] = record


class GenerationDir:
    """A directory committed in generations under one manifest, written by one process at a time.

    A subclass names what it holds (`what`, for messages), the command that creates it and the format
    it reads, and says in `kept_for_resume` what a failed write leaves for the next run.
    """

    format_version: int
    what: str  # for error messages: "index", "region set"
    command: str  # what creates this directory

    def __init__(self, path: Path | str):
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def interrupted(self) -> bool:
        """Whether a first run stopped before its commit left work that running it again finishes."""
        return False

    def read_manifest(self) -> dict:
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            if self.interrupted():
                raise UserError(f"an interrupted build of the {self.what} at {self.path} is pending: "
                                f"run `{self.command}` again to finish it") from None
            raise UserError(f"no {self.what} at {self.path}: run `{self.command}` first") from None
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read {self.manifest_path}: {error}") from None
        if manifest.get("format_version") != self.format_version:
            raise UserError(
                f"{self.path} has {self.what} format {manifest.get('format_version')}, this vqa-search reads "
                f"{self.format_version}: run `{self.command}` again to rebuild it"
            )
        return manifest

    def generation(self, number: int) -> Path:
        return self.path / f"gen-{number:06d}"

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One writer at a time; the kernel drops the lock if the writer dies, even by kill -9.

        Taking it writes, so a read-only directory fails here, before any work, even when nothing changed.
        """
        target = f"the {self.what} at {self.path}"
        with self.writing(target, lambda: "nothing was written"):
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / ".lock", "a+b", buffering=0)  # unbuffered: no second write at close
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().decode(errors="replace").strip() or "unknown"
                raise UserError(
                    f"another vqa-search process (pid {holder}) is writing the {self.what} at {self.path}; "
                    "wait for it to finish or stop it"
                ) from None
            with self.writing(target, lambda: "nothing was written"):
                handle.truncate(0)
                handle.write(str(os.getpid()).encode())
            _HELD_LOCKS.append(handle)
            try:
                yield
            finally:
                _HELD_LOCKS.remove(handle)
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextmanager
    def writing(self, target: str, kept: Callable[[], str]) -> Iterator[None]:
        """A full or read-only disk while writing `target` becomes one UserError line.

        The line says what failed, where, and what was kept: `kept` is asked after the failure, so it
        counts what really reached the disk.
        """
        try:
            yield
        except OSError as error:
            failed = storage_failure(error, target)
            if failed is None:
                raise
            committed = (f"the committed {self.what} is unchanged" if self.exists()
                         else f"no {self.what} was committed here yet")
            raise UserError(f"{failed}: {_joined(kept(), committed)}") from None

    def kept_for_resume(self) -> str:
        """What the directory holds for the next run after a failed write; empty: nothing."""
        return ""

    def commit(self, files: dict[str, object], manifest: dict) -> Path:
        """Write a new generation, then the manifest naming it; then drop what is two generations old.

        If that fails, what it wrote is removed, so a full disk gets its space back, and the manifest
        and the live generation are as they were for the next run.
        """
        previous = self.read_manifest()["generation"] if self.exists() else 0
        number = previous + 1
        gen = self.generation(number)
        staging = self.path / f".staging-{number:06d}"
        with self.writing(f"generation {gen.name} in {self.path}",
                          lambda: _joined("it was removed", self.kept_for_resume())):
            for stale in self.path.glob(".staging-*"):  # left by a writer killed while committing
                shutil.rmtree(stale, ignore_errors=True)
            try:
                staging.mkdir()
                for name, content in files.items():
                    _write_file(staging / name, content)
                shutil.rmtree(gen, ignore_errors=True)
                os.replace(staging, gen)
                _fsync_dir(self.path)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                shutil.rmtree(gen, ignore_errors=True)
                raise
            try:
                write_json(self.manifest_path, {**manifest, "generation": number})
            except OSError:  # the manifest was not replaced: nothing names the new generation
                shutil.rmtree(gen, ignore_errors=True)
                raise
        # The previous generation stays one more commit, so a searcher opened on it keeps working.
        keep = {gen, self.generation(previous)}
        for old in self.path.glob("gen-*"):
            if old not in keep:
                shutil.rmtree(old, ignore_errors=True)
        return gen


class IndexDir(GenerationDir):
    """The index: generations of embeddings and FAISS indexes, plus pending/ shards and the embedding cache."""

    format_version = FORMAT_VERSION
    what = "index"
    command = "vqa-search index DATASET"

    @property
    def pending(self) -> Path:
        return self.path / "pending"

    def interrupted(self) -> bool:
        return (self.pending / "model.json").is_file()

    # ---- the embedding cache -------------------------------------------------------------

    def load_cache(self, identity: ModelIdentity) -> EmbeddingCache:
        """Committed and pending embeddings made with `identity`; anything else is discarded."""
        cache = EmbeddingCache()
        if self.exists():
            manifest = self.read_manifest()
            if identity.same_weights(ModelIdentity.from_json(manifest["model"])):
                self._load_generation(self.generation(manifest["generation"]), manifest, cache)
        pending_model = self.pending / "model.json"
        if pending_model.is_file():
            if identity.same_weights(ModelIdentity.from_json(json.loads(pending_model.read_text()))):
                self._load_pending(cache)
            else:
                self.clear_pending()
        return cache

    def _load_generation(self, gen: Path, manifest: dict, cache: EmbeddingCache) -> None:
        images = read_parquet(gen / "images.parquet").to_pylist()
        vectors = np.load(gen / "image_embeddings.npy", mmap_mode="r")
        for row in images:
            state = FileState(row["path"], row["bytes"], row["mtime_ns"])
            cache.add_image(ImageRecord(state, row["sha256"], row["width"], row["height"], None, vectors[row["id"]]))
        for skipped in manifest.get("skipped", []):
            state = FileState(skipped["path"], skipped["bytes"], skipped["mtime_ns"])
            cache.add_image(ImageRecord(state, skipped.get("sha256", ""), reason=skipped["reason"]))
        texts = read_parquet(gen / "captions.parquet", columns=["text"]).column("text").to_pylist()
        caption_vectors = np.load(gen / "caption_embeddings.npy", mmap_mode="r")
        cache.by_text.update(zip(texts, caption_vectors))

    def _load_pending(self, cache: EmbeddingCache) -> None:
        for table_path in sorted(self.pending.glob("images-*.parquet")):
            vectors = iter(np.load(table_path.with_suffix(".npy")))
            for row in read_parquet(table_path).to_pylist():
                state = FileState(row["path"], row["bytes"], row["mtime_ns"])
                embedding = next(vectors) if row["reason"] is None else None
                cache.add_image(
                    ImageRecord(state, row["sha256"], row["width"], row["height"], row["reason"], embedding)
                )
        for table_path in sorted(self.pending.glob("captions-*.parquet")):
            texts = read_parquet(table_path).column("text").to_pylist()
            cache.by_text.update(zip(texts, np.load(table_path.with_suffix(".npy"))))

    def clear_pending(self) -> None:
        shutil.rmtree(self.pending, ignore_errors=True)

    def shard_writer(self, kind: str, identity: ModelIdentity, **kwargs) -> "ShardWriter":
        with self.writing(f"model.json in {self.pending}", self.kept_for_resume):
            self.pending.mkdir(parents=True, exist_ok=True)
            write_json(self.pending / "model.json", identity.to_json())
        return ShardWriter(self, self.pending, kind, **kwargs)

    def kept_for_resume(self) -> str:
        """What pending/ holds for the next run, counted from the complete shards on disk: those of this
        run's other writer and of an interrupted run count too."""
        rows: dict[str, int] = {}
        for table in sorted(self.pending.glob("*-*.parquet")):
            kind = table.stem.rsplit("-", 1)[0]
            rows[kind] = rows.get(kind, 0) + pq.read_metadata(table).num_rows
        if not rows:
            return ""
        counts = " and ".join(f"{count:,} {kind}" for kind, count in rows.items())
        return f"the shards of {counts} in {self.pending} are kept and the next run resumes from them"

    # ---- committing ----------------------------------------------------------------------

    def commit(self, files: dict[str, object], manifest: dict) -> Path:
        """The generation commit, after which pending/ is spent: its shards are in the new generation.
        A failed commit leaves pending/ as it was, for the next run."""
        gen = super().commit(files, manifest)
        self.clear_pending()
        return gen


class ShardWriter:
    """Buffers freshly computed rows and flushes them as numbered shards, by count or by time.

    A shard is one `.npy` per array (`{kind}-N.npy` for the index's vectors; named arrays such as
    regions' features and boxes go to `{kind}-N.<name>.npy`) and `{kind}-N.parquet` with the rows,
    written last: a shard counts once its parquet exists. `items` and `done` name the rows in error
    messages ("the 1,024 images embedded for it are lost").
    """

    def __init__(self, owner: GenerationDir, directory: Path, kind: str, rows_per_shard: int = 1024,
                 seconds_per_shard: float = 30.0, arrays: dict[str, type] | None = None,
                 schema: pa.Schema | None = None, items: str | None = None, done: str = "embedded"):
        with owner.writing(f"the folder {directory}", lambda: ""):
            directory.mkdir(parents=True, exist_ok=True)
        self.owner = owner
        self.directory = directory
        self.kind = kind
        self.items = items or kind
        self.done = done
        self.rows_per_shard = rows_per_shard
        self.seconds_per_shard = seconds_per_shard
        self.arrays = arrays or {"": np.float32}  # array name ("" = the only one) -> dtype on disk
        self.schema = schema if schema is not None else (IMAGE_RECORD_SCHEMA if kind == "images" else None)
        self._rows: list[dict] = []
        self._buffers: dict[str, list[np.ndarray]] = {name: [] for name in self.arrays}
        self._last_flush = time.monotonic()
        existing = [int(p.stem.rsplit("-", 1)[1]) for p in directory.glob(f"{kind}-*.parquet")]
        self._next = max(existing, default=-1) + 1

    def add(self, row: dict, *arrays: np.ndarray | None) -> None:
        """One row and its arrays, in the order of `self.arrays`; None for a row without any (a skipped file)."""
        self._rows.append(row)
        for buffer, array in zip(self._buffers.values(), arrays):
            if array is not None:
                buffer.append(array)
        if len(self._rows) >= self.rows_per_shard or time.monotonic() - self._last_flush >= self.seconds_per_shard:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as the next shard.

        When the disk refuses them they are dropped, not kept for another try: it would refuse them
        again, and the callers' `finally: flush()` would bury the first error under a second.
        """
        if not self._rows:
            return
        stem = f"{self.kind}-{self._next:06d}"
        lost = f"the {len(self._rows):,} {self.items} {self.done} for it are lost and will be {self.done} again"
        try:
            with self.owner.writing(f"shard {stem} in {self.directory}",
                                    lambda: _joined(lost, self.owner.kept_for_resume())):
                self._write_shard(stem)
        except UserError:
            self._clear()
            raise
        self._next += 1
        self._clear()

    def _write_shard(self, stem: str) -> None:
        arrays_written: list[Path] = []
        try:
            for name, buffer in self._buffers.items():
                dtype = self.arrays[name]
                stacked = np.stack(buffer) if buffer else np.zeros((0, 0), dtype)
                path = self.directory / shard_file(stem, name)
                _write_file(path, stacked.astype(dtype))
                arrays_written.append(path)
            _write_file(self.directory / f"{stem}.parquet", pa.Table.from_pylist(self._rows, schema=self.schema))
        except BaseException:
            for path in arrays_written:  # without its parquet file a shard does not count, it only holds space
                path.unlink(missing_ok=True)
            raise

    def _clear(self) -> None:
        self._rows = []
        self._buffers = {name: [] for name in self.arrays}
        self._last_flush = time.monotonic()


def shard_file(stem: str, array: str = "") -> str:
    """The .npy file name of one array of a shard."""
    return f"{stem}.{array}.npy" if array else f"{stem}.npy"


def _write_file(path: Path, content: object) -> None:
    """Every write goes through Python's file object, whose errors carry the errno `writing` needs:
    np.save's short write has none, and faiss's own writer ignores a failed close. A Path is a file
    already written elsewhere in the index directory (an on-disk FAISS index and its .ivfdata): it is
    moved into place."""
    if isinstance(content, Path):
        os.replace(content, path)
        return
    with atomic_path(path) as temp:
        if isinstance(content, np.ndarray):
            content = np.ascontiguousarray(content)
            with open(temp, "wb") as handle:
                np.lib.format.write_array_header_1_0(handle, np.lib.format.header_data_from_array_1_0(content))
                handle.write(content.data)
        elif isinstance(content, pa.Table):
            pq.write_table(content, temp)
        else:
            import faiss  # here only: reading an index, or checking that it is up to date, needs no faiss

            if not isinstance(content, faiss.Index):
                raise TypeError(f"cannot write {type(content).__name__} to {path}")
            with open(temp, "wb") as handle:
                faiss.write_index(content, faiss.PyCallbackIOWriter(handle.write))


def _joined(*parts: str) -> str:
    """Clauses of an error message; empty ones left out."""
    return "; ".join(part for part in parts if part)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
