"""Frozen features for training, computed once by the runner: held in RAM, or written to disk as .npy
files and memory-mapped, so a cache larger than memory (VQA v2's ViT-B-16 patch streams: 37 GB) trains
on a smaller machine. Both modes are the same numpy arrays and the same batch gathering (`take`).

    CACHE_DIR/                                   default DATASET/.vqa-search/feature-cache
      <kind>-<key>/                              key: SHA-256 of what produced the arrays (the producer)
        manifest.json                            producer, arrays (dtype, shape), rows kept, item keys, skips
        <name>.npy                               one array, rows in item order (np.load(mmap_mode="r"))
      .staging-<kind>-<key>-<pid>-<random>/      being written; renamed to <kind>-<key>/ when complete

The producer is everything the values depend on: the weights' `ModelIdentity` (a checkpoint by its
SHA-256), the frozen depth, the stored dtype, the items (image file states: path, size, mtime; or a
hash of the token ids), the package version. An entry is only ever read whole and committed: the
arrays are written in item order as batches finish, flushed, and the staging directory is renamed
into place last; a run that fails deletes its staging directory, one that is killed leaves it to the
next run, which deletes staging directories whose process is gone. After a commit only the
`KEEP_PER_KIND` most recently used entries of a kind stay.

Modes: `memory` computes into RAM and never touches the disk; `disk` reuses a committed entry or
writes one; `auto` reuses a committed entry, else computes into RAM when the entry is at most
`MEMORY_SHARE` of the memory available now, and to disk above it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from vqa_search import __version__
from vqa_search.core.atomic import current_umask, new_file_mode, write_json
from vqa_search.core.errors import UserError
from vqa_search.core.identity import ModelIdentity
from vqa_search.core.image_stream import DecodedItem
from vqa_search.core.store import DEFAULT_DIR_NAME

CACHE_MODES = ("auto", "memory", "disk")
CACHE_DIR_NAME = "feature-cache"
FORMAT = "vqa-search-feature-cache/1"
MEMORY_SHARE = 0.5  # auto: an entry larger than this share of the memory available goes to disk
KEEP_PER_KIND = 2  # entries of one kind kept after a commit, most recently used first
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class CacheConfig:
    mode: str = "auto"
    directory: Path | None = None  # None: the job's default, DATASET/.vqa-search/feature-cache

    def check(self) -> None:
        if self.mode not in CACHE_MODES:
            raise UserError(f"--cache must be one of {', '.join(CACHE_MODES)} (got {self.mode!r})")
        if self.directory is not None and Path(self.directory).exists() and not Path(self.directory).is_dir():
            raise UserError(f"--cache-dir {self.directory} is not a directory")


def available_memory() -> int:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), else the free pages."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def file_states_digest(paths: Sequence[Path | str]) -> str:
    """SHA-256 of the files' paths, sizes and mtimes in order: the image set a cache was computed from."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            stat = os.stat(path)
            state = f"{os.path.abspath(path)}\t{stat.st_size}\t{stat.st_mtime_ns}\n"
        except OSError:
            state = f"{os.path.abspath(path)}\tmissing\n"
        digest.update(state.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def array_digest(array: np.ndarray | torch.Tensor) -> str:
    """SHA-256 of an array's shape, dtype and bytes (e.g. the token ids a text cache was computed from)."""
    array = np.ascontiguousarray(array.numpy() if isinstance(array, torch.Tensor) else array)
    return hashlib.sha256(f"{array.dtype}{array.shape}".encode() + array.tobytes()).hexdigest()


def take(array: np.ndarray, rows: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """Rows of an array in RAM or memory-mapped, in the order asked, as a new tensor.

    The rows are read in ascending order, so a batch reads a memory-mapped file front to back.
    """
    rows = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64).reshape(-1)
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
    out[order] = array[rows[order]]
    return torch.from_numpy(out)


@dataclass
class Ragged:
    """Items of different lengths (captions' token streams) as one array of rows and where each starts."""

    values: np.ndarray  # (total rows, ...) every item's rows, one item after another
    offsets: np.ndarray  # (items + 1,) int64: item i is values[offsets[i]:offsets[i + 1]]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, item: int | slice) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(item, slice):
            return self.take(range(*item.indices(len(self))))
        return torch.from_numpy(np.array(self.values[self.offsets[item]:self.offsets[item + 1]]))

    def take(self, items: Sequence[int] | torch.Tensor) -> list[torch.Tensor]:
        """The items asked for, in that order, each read once, in ascending order of position."""
        items = [int(item) for item in items]
        read = {item: self[item] for item in sorted(set(items))}
        return [read[item] for item in items]


@dataclass
class Stored:
    """A cache entry's arrays (memory-mapped, or in RAM) and what its writer recorded about the items."""

    arrays: dict[str, np.ndarray]
    meta: dict
    on_disk: bool

    def rows(self, name: str) -> np.ndarray:
        """An array cut to the rows written (a run that skipped unreadable images wrote fewer than planned)."""
        return self.arrays[name][: self.meta.get("rows", len(self.arrays[name]))]

    def ragged(self, name: str) -> Ragged:
        return Ragged(self.arrays[f"{name}.values"], np.asarray(self.arrays[f"{name}.offsets"]))


class FeatureCache:
    """Where a job's frozen features live (`CacheConfig`), handing out one entry per producer."""

    def __init__(self, config: CacheConfig, default_directory: Path):
        config.check()
        self.mode = config.mode
        self.directory = Path(config.directory or default_directory).expanduser()

    @classmethod
    def for_dataset(cls, mode: str, directory: Path | None, dataset: Path | str) -> "FeatureCache":
        """A training job's cache: in `directory` (--cache-dir), by default beside the dataset's index."""
        return cls(CacheConfig(mode, directory), Path(dataset) / DEFAULT_DIR_NAME / CACHE_DIR_NAME)

    def in_memory(self, nbytes: int) -> bool:
        """Whether data of this size is held in RAM: always in memory mode, never in disk mode, and in
        auto mode when it is at most MEMORY_SHARE of the memory available now."""
        return self.mode == "memory" or (self.mode == "auto" and nbytes <= MEMORY_SHARE * available_memory())

    def entry(self, kind: str, weights: ModelIdentity | None, **details: Any) -> "CacheEntry":
        """The entry of `kind` produced by `weights` with `details` (frozen depth, dtype, items' digest...);
        `weights` None when `details` name the producer whole (a region set's extractor identity)."""
        producer = {"format": FORMAT, "version": __version__, "kind": kind,
                    "weights": None if weights is None else weights.to_json(), **details}
        key = hashlib.sha256(json.dumps(producer, sort_keys=True).encode()).hexdigest()[:24]
        return CacheEntry(self, kind, producer, self.directory / f"{kind}-{key}")


@dataclass
class CacheEntry:
    cache: FeatureCache
    kind: str
    producer: dict
    path: Path

    def load(self) -> Stored | None:
        """The committed entry, memory-mapped; None in memory mode or when there is none."""
        if self.cache.mode == "memory":
            return None
        try:
            manifest = json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))
            if manifest.get("producer") != self.producer:
                return None
            arrays = {name: np.load(self.path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                      for name in manifest["arrays"]}
        except (OSError, ValueError, KeyError):
            return None  # missing, or damaged by hand: computed again, and the commit replaces it
        _touch(self.path / MANIFEST)
        return Stored(arrays, manifest["meta"], on_disk=True)

    def get(self, fill: Callable[["EntryBuilder"], None]) -> Stored:
        """The committed entry, or a new one that `fill` writes (allocating its arrays from the builder)."""
        stored = self.load()
        if stored is None:
            with self.build() as builder:
                fill(builder)
            stored = builder.stored
        return stored

    @contextmanager
    def build(self) -> Iterator["EntryBuilder"]:
        """An empty entry to fill; committed when the block ends normally, deleted when it raises."""
        builder = EntryBuilder(self)
        try:
            yield builder
            builder.commit()
        finally:
            builder.discard()


@dataclass
class EntryBuilder:
    """Allocates an entry's arrays (RAM or .npy in a staging directory) and commits them once complete.

    Memory or disk is decided at the first allocation, by that array's size: allocate the large
    array of an entry first. `meta` is what the caller records about the items (keys, skips, rows).
    """

    entry: CacheEntry
    meta: dict = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    staging: Path | None = None
    stored: Stored | None = None

    def array(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if not self.arrays and self._to_disk(nbytes):
            self.staging = _staging_dir(self.entry)
        if self.staging is None:
            array = np.empty(shape, dtype=dtype)
        else:
            array = np.lib.format.open_memmap(self.staging / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
        self.arrays[name] = array
        return array

    def ragged(self, name: str, lengths: Sequence[int], row_shape: tuple[int, ...], dtype) -> Ragged:
        """A ragged array for items of `lengths` rows each (values first: it decides memory or disk)."""
        values = self.array(f"{name}.values", (int(np.sum(lengths)), *row_shape), dtype)
        offsets = self.array(f"{name}.offsets", (len(lengths) + 1,), np.int64)
        offsets[0] = 0
        np.cumsum(lengths, out=offsets[1:])
        return Ragged(values, offsets)

    def commit(self) -> None:
        if self.staging is None:
            self.stored = Stored(dict(self.arrays), self.meta, on_disk=False)
            return
        names = sorted(self.arrays)
        for name in names:
            self.arrays[name].flush()
            with open(self.staging / f"{name}.npy", "rb") as written:
                os.fsync(written.fileno())
            os.chmod(self.staging / f"{name}.npy", new_file_mode())
        self.arrays.clear()  # unmapped before the rename
        write_json(self.staging / MANIFEST, {"producer": self.entry.producer, "arrays": names, "meta": self.meta})
        os.chmod(self.staging, 0o777 & ~current_umask())  # mkdtemp's 0o700 otherwise
        shutil.rmtree(self.entry.path, ignore_errors=True)  # a damaged entry of the same producer
        try:
            os.replace(self.staging, self.entry.path)
        except OSError:
            if not (self.entry.path / MANIFEST).is_file():  # not another run committing the same entry
                raise
        self.staging = None
        self.stored = self.entry.load()
        if self.stored is None:
            raise OSError(f"the feature cache {self.entry.path} could not be read back after writing it")
        _evict(self.entry)

    def discard(self) -> None:
        """Whatever was not committed goes: a half-written cache is never read."""
        self.arrays.clear()
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None

    def _to_disk(self, nbytes: int) -> bool:
        return not self.entry.cache.in_memory(nbytes)


def computed_rows(entry: CacheEntry, reader, mapper, dtype, progress: bool = False, desc: str = "images") -> Stored:
    """The entry's committed rows, or the runner's results for `reader` written into a new entry: array
    "rows" (one per readable item, in reading order), meta "keys" (str of each item's key), "skipped"."""
    from vqa_search.core.runner import run  # the runner imports the model code; the cache itself does not

    return entry.get(lambda builder: run(reader, mapper, RowWriter(builder, "rows", len(reader), dtype), progress,
                                         desc))


class RowWriter:
    """The runner's writer into a cache array: one row per readable item in reading order, allocated at
    the first result (its shape and the planned item count give the size); keys and skips go to `meta`."""

    def __init__(self, builder: EntryBuilder, name: str, items: int, dtype):
        self.builder, self.name, self.items, self.dtype = builder, name, items, dtype
        self.array: np.ndarray | None = None
        builder.meta.update(keys=[], skipped={}, rows=0)

    def add(self, item: DecodedItem, result: Any) -> None:
        meta = self.builder.meta
        if item.reason is not None:
            meta["skipped"][str(item.key)] = item.reason
            return
        result = np.asarray(result.cpu() if isinstance(result, torch.Tensor) else result)
        if self.array is None:
            self.array = self.builder.array(self.name, (self.items, *result.shape), self.dtype)
        self.array[meta["rows"]] = result
        meta["keys"].append(str(item.key))
        meta["rows"] += 1

    def close(self) -> None:
        if self.array is None:  # nothing readable: an empty entry, so the caller's own error applies
            self.builder.array(self.name, (0,), self.dtype)


def _staging_dir(entry: CacheEntry) -> Path:
    entry.cache.directory.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(entry.cache.directory)
    return Path(tempfile.mkdtemp(dir=entry.cache.directory, prefix=f".staging-{entry.path.name}-{os.getpid()}-"))


def _remove_abandoned(directory: Path) -> None:
    """Staging directories of processes that no longer run (killed while writing) are deleted."""
    for staging in directory.glob(".staging-*"):
        try:
            pid = int(staging.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(staging, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue  # not ours to judge: another user's process, or a name we did not write


def _evict(kept: CacheEntry) -> None:
    """Only the KEEP_PER_KIND most recently used entries of a kind stay (the one just written among them)."""
    entries = [path for path in kept.cache.directory.glob(f"{kept.kind}-*") if (path / MANIFEST).is_file()]
    entries.sort(key=lambda path: (path == kept.path, (path / MANIFEST).stat().st_mtime_ns), reverse=True)
    for stale in entries[KEEP_PER_KIND:]:
        shutil.rmtree(stale, ignore_errors=True)  # a reader that mapped it keeps its pages (POSIX unlink)


def _touch(path: Path) -> None:
    """Mark an entry used, for eviction; a read-only cache directory is fine."""
    try:
        os.utime(path)
    except OSError:
        pass
