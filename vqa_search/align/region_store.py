"""Region features stored next to the index, computed once and kept in step with it.

    INDEX_DIR/regions/<frcnn-mobilenet | frcnn-r50 | clip-patches | clip-crops>[-boxes]/
      manifest.json          the commit point: extractor identity, K, feature dim, dtype, rows, shard list
      gen-000004/rows.parquet   path, bytes, mtime_ns, width, height, shard, offset: one row per indexed image
      shards/                <key>-000012.features.npy  float16 (n, K, F)
                             <key>-000012.boxes.npy     float32 (n, K, 4), original pixels
                             <key>-000012.parquet       path, bytes, mtime_ns, width, height (written last)
      .lock

Shards are immutable and shared by generations, so an update only writes the images it computed
and a small rows file; <key> is a hash of the extractor identity, so shards of other weights or
settings (or of another boxes file: its hash is in the identity) are never mixed in. Shards that no
manifest names yet are the pending work of an interrupted run: a rerun reuses every complete one.
After a commit, shards named by neither the new nor the previous manifest are deleted (the previous
one stays for readers opened on it).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vqa_search import __version__
from vqa_search.align.constants import REGIONS_DIR  # light: `info` reads it too
from vqa_search.align.regions import GEOMETRY, GivenBoxes, RegionConfig, RegionExtractor, load_extractor
from vqa_search.core.errors import UserError
from vqa_search.core.image_stream import DecodedBatch, DecodedItem, ImageReader
from vqa_search.core.runner import run
from vqa_search.core.store import FileState, GenerationDir, IndexDir, ShardWriter, shard_file
from vqa_search.core.identity import ModelIdentity
from vqa_search.indexer.datasets import Dataset, image_locator
from vqa_search.retrieval.searcher import Index, find_index

FORMAT_VERSION = 1
ARRAYS = {"features": np.float16, "boxes": np.float32}
SHARD_SCHEMA = pa.schema([("path", pa.string()), ("bytes", pa.int64()), ("mtime_ns", pa.int64()),
                          ("width", pa.int32()), ("height", pa.int32())])
ROWS_SCHEMA = pa.schema(list(SHARD_SCHEMA) + [("shard", pa.string()), ("offset", pa.int32())])


class RegionDir(GenerationDir):
    """One region set: a generation directory (lock, manifest, atomic commit) with its own shards.

    Unlike the index it has no pending/ and no embedding cache: uncommitted shards wait in shards/,
    and `_Update` deletes the ones no manifest needs any more after its commit.
    """

    format_version = FORMAT_VERSION
    what = "region set"
    command = "vqa-search regions DATASET"

    @property
    def shards(self) -> Path:
        return self.path / "shards"

    def kept_for_resume(self) -> str:
        """Uncommitted shards live beside the committed ones; a failed flush or commit removes neither."""
        return f"the computed shards in {self.shards} are kept and the next run reuses them"


@dataclass
class RegionReport:
    region_dir: Path
    name: str
    images: int
    computed: int
    reused: int
    removed: int  # rows of the previous set whose image left the index
    up_to_date: bool
    seconds: float
    boxes_unlisted: int | None = None  # with --boxes: indexed images the file does not mention (fill only)

    def to_json(self) -> dict:
        return {**asdict(self), "region_dir": str(self.region_dir)}

    def summary(self) -> str:
        unlisted = ("" if self.boxes_unlisted is None else
                    f"; {self.boxes_unlisted} of them not in the boxes file (whole image and grid only)")
        if self.up_to_date:
            return (f"{self.name} regions at {self.region_dir} are up to date: {self.images} images{unlisted} "
                    f"({self.seconds:.1f} s)")
        return (f"{self.name} regions for {self.images} images ({self.computed} computed now, {self.reused} reused, "
                f"{self.removed} removed{unlisted}) in {self.region_dir} in {self.seconds:.1f} s")


def compute_regions(dataset: Path | str, config: RegionConfig = RegionConfig(),
                    extractor: RegionExtractor | None = None) -> RegionReport:
    """Region features for every image of the dataset's index, computing only what no shard holds yet.

    `extractor` replaces the one `config.source` names (a benchmark's oracle regions use it); the
    config still gives the batch size, workers, shard size and progress.
    """
    started = time.perf_counter()
    if config.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    index = Index(IndexDir(_index_path(dataset)))
    if extractor is None:
        extractor = load_extractor(config, index.clip if config.source in ("clip-patches", "clip-crops") else None)
    region_dir = RegionDir(index.dir.path / REGIONS_DIR / extractor.name)
    with region_dir.lock():
        report = _Update(index, region_dir, extractor, config).run()
    return replace(report, seconds=time.perf_counter() - started)


@dataclass
class _Update:
    index: Index
    dir: RegionDir
    extractor: RegionExtractor
    config: RegionConfig

    @property
    def kind(self) -> str:
        """The shard name prefix of this extractor identity."""
        return identity_key(self.extractor.identity)

    def run(self) -> RegionReport:
        done = self._shard_rows()
        wanted = self.index.image_states
        todo = [state for state in wanted if state not in done]
        self._compute(todo)
        done = self._shard_rows()
        rows = pa.Table.from_pylist([done[state] for state in wanted], schema=ROWS_SCHEMA)
        previous = self.dir.read_manifest() if self.dir.exists() else None
        previous_rows = pq.read_table(self._rows_file(previous)) if previous else None
        removed = len(set(previous_rows.column("path").to_pylist()) - {s.path for s in wanted}) if previous else 0
        given = self.extractor.given
        unlisted = sum(not given.mentions(state.path) for state in wanted) if given is not None else None
        report = RegionReport(self.dir.path, self.extractor.name, len(wanted), len(todo), len(wanted) - len(todo),
                              removed, up_to_date=False, seconds=0.0, boxes_unlisted=unlisted)
        if previous and previous["extractor"] == self.extractor.identity and previous_rows.equals(rows):
            report.up_to_date = True
            return report
        shards = sorted(set(rows.column("shard").to_pylist()))
        self.dir.commit({"rows.parquet": rows}, self._manifest(len(wanted), shards))
        self._drop_unused_shards(set(shards) | set(previous["shards"] if previous else ()))
        return report

    def _shard_rows(self) -> dict[FileState, dict]:
        """Every complete shard of this extractor identity, committed or left by an interrupted run."""
        done = {}
        for table in sorted(self.dir.shards.glob(f"{self.kind}-*.parquet")):
            for offset, row in enumerate(pq.read_table(table).to_pylist()):
                done[FileState(row["path"], row["bytes"], row["mtime_ns"])] = {**row, "shard": table.stem,
                                                                               "offset": offset}
        return done

    def _compute(self, states: list[FileState]) -> None:
        if not states:
            return
        files = image_locator(self.index.images_root)  # files on disk, or the members of webdataset tars
        _check_unchanged(files, states)
        reader = ImageReader([files.image_ref(state.path, state) for state in states],
                             self.extractor.preprocess, self.config.batch_size, self.config.workers,
                             stack=self.extractor.stack)
        shards = ShardWriter(self.dir, self.dir.shards, self.kind, rows_per_shard=self.config.rows_per_shard,
                             arrays=ARRAYS, schema=SHARD_SCHEMA, items="images", done="computed")
        run(reader, _Regions(self.extractor), _RegionShards(shards), self.config.progress,
            f"regions ({self.extractor.name})", runner=self.config.runner)

    def _rows_file(self, manifest: dict) -> Path:
        return self.dir.generation(manifest["generation"]) / "rows.parquet"

    def _manifest(self, n_rows: int, shards: list[str]) -> dict:
        extractor = self.extractor
        return {
            "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "vqa_search_version": __version__,
            "name": extractor.name,
            "source": extractor.source,
            "extractor": extractor.identity,
            "detector_weights": str(extractor.weights) if extractor.source == "detector" else None,
            "boxes_file": extractor.given.file if extractor.given is not None else None,  # its sha256: extractor
            "num_regions": extractor.num_regions,
            "feature_dim": extractor.feature_dim,
            "geometry": list(GEOMETRY),  # the last 7 feature columns
            "dtype": {name: np.dtype(dtype).name for name, dtype in ARRAYS.items()},
            "index_generation": self.index.manifest["generation"],
            "rows": n_rows,
            "shards": shards,
        }

    def _drop_unused_shards(self, keep: set[str]) -> None:
        for path in self.dir.shards.iterdir():
            if path.name.split(".", 1)[0] not in keep:
                path.unlink(missing_ok=True)


@dataclass
class _Regions:
    """The runner's mapper: (features, boxes) per image."""

    extractor: RegionExtractor

    def __call__(self, batch: DecodedBatch) -> list[tuple[np.ndarray, np.ndarray]]:
        sizes = [(item.width, item.height) for item in batch.readable]
        paths = [item.key.path for item in batch.readable]  # the index's relative paths: given boxes' names
        return list(zip(*self.extractor.extract_pixels(batch.pixels, sizes, paths)))


@dataclass
class _RegionShards:
    """The runner's writer: a shard row per image (flushed on Ctrl-C too); every indexed image must be readable."""

    shards: ShardWriter

    def add(self, item: DecodedItem, regions: tuple[np.ndarray, np.ndarray] | None) -> None:
        state: FileState = item.key
        if item.reason is not None:
            raise UserError(f"cannot read {state.path} ({item.reason}), which the index holds: run "
                            "`vqa-search index` on the dataset again")
        row = {"path": state.path, "bytes": state.bytes, "mtime_ns": state.mtime_ns, "width": item.width,
               "height": item.height}
        self.shards.add(row, *regions)

    def close(self) -> None:
        self.shards.flush()


class RegionSet:
    """A committed region set, memory-mapped: what stage 2 trains and re-ranks with."""

    def __init__(self, region_dir: RegionDir):
        self.dir = region_dir
        self.manifest = region_dir.read_manifest()
        self.name: str = self.manifest["name"]
        self.source: str = self.manifest["source"]
        self.num_regions: int = self.manifest["num_regions"]
        self.feature_dim: int = self.manifest["feature_dim"]
        rows = pq.read_table(region_dir.generation(self.manifest["generation"]) / "rows.parquet").to_pydict()
        self.paths: list[str] = rows["path"]
        self._row = {path: i for i, path in enumerate(self.paths)}
        shard_number = {shard: i for i, shard in enumerate(self.manifest["shards"])}
        self._shard = np.array([shard_number[shard] for shard in rows["shard"]], dtype=np.int64)
        self._offset = np.asarray(rows["offset"], dtype=np.int64)
        self._arrays = {name: [np.load(region_dir.shards / shard_file(shard, name), mmap_mode="r")
                               for shard in self.manifest["shards"]] for name in ARRAYS}

    @classmethod
    def open(cls, index_dir: Path | str, name: str | None = None) -> "RegionSet":
        """The set `name` of an index (directory or dataset folder); None: the only or most recently computed."""
        root = Path(_index_path(index_dir)) / REGIONS_DIR
        if name is None:
            manifests = sorted(root.glob("*/manifest.json"), key=lambda path: path.stat().st_mtime_ns)
            if not manifests:
                raise UserError(f"no region features for the index at {root.parent}: run `vqa-search regions DATASET` first")
            return cls(RegionDir(manifests[-1].parent))
        return cls(RegionDir(root / name))

    def row_of(self, path: str) -> int:
        try:
            return self._row[path]
        except KeyError:
            raise UserError(f"{path} has no {self.name} regions: run `vqa-search regions DATASET` again") from None

    def features(self, rows) -> np.ndarray:
        """float16 (n, K, F) for `rows` in the order given; the last 7 columns are the box geometry."""
        return self._gather("features", rows)

    def boxes(self, rows) -> np.ndarray:
        """float32 (n, K, 4): x1, y1, x2, y2 in the original image's pixels."""
        return self._gather("boxes", rows)

    def _gather(self, name: str, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        width = self.feature_dim if name == "features" else 4
        out = np.empty((len(rows), self.num_regions, width), dtype=ARRAYS[name])
        shards, offsets = self._shard[rows], self._offset[rows]
        for shard in np.unique(shards):
            mine = shards == shard
            out[mine] = self._arrays[name][shard][offsets[mine]]
        return out

    def extractor(self) -> RegionExtractor:
        """The same extractor as the stored features, for query images outside the collection.

        A set made from a boxes file gives a query image the fill only (the whole image and the grid),
        as it gave an indexed image the file does not mention: no file has boxes for it.
        """
        identity = self.manifest["extractor"]
        clip = None
        if self.source in ("clip-patches", "clip-crops"):
            index = Index(IndexDir(self.dir.path.parent.parent))
            if not index.identity.same_weights(ModelIdentity.from_json(identity["model"])):
                raise UserError(f"the index was rebuilt with {index.identity.describe()} since the {self.name} "
                                "regions were computed: run `vqa-search regions DATASET` again")
            clip = index.clip
        weights = self.manifest["detector_weights"]
        config = RegionConfig(source=self.source, detector=identity.get("detector"),
                              detector_weights=Path(weights) if weights else None, regions=identity["regions"],
                              score_threshold=identity.get("score_threshold", RegionConfig.score_threshold),
                              min_size=identity.get("min_size"), proposals=identity.get("proposals"))
        given = None
        if "boxes_sha256" in identity:
            given = GivenBoxes(self.manifest.get("boxes_file") or "", identity["boxes_sha256"])
        extractor = load_extractor(config, clip, given)
        if extractor.identity != identity:
            raise UserError(f"the detector weights {weights} changed since the {self.name} regions were computed: "
                            "run `vqa-search regions DATASET` again")
        return extractor


def identity_key(identity: dict) -> str:
    """A short name for an extractor identity: shards made under another one are never reused."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def _check_unchanged(files: Dataset, states: list[FileState]) -> None:
    """Regions must describe the pixels the index embedded, or stage 2 would pair two different images."""
    for state in states:
        try:
            unchanged = files.file_state(state.path) == state
        except OSError:
            unchanged = False
        if not unchanged:
            raise UserError(f"{state.path} changed since it was indexed: run `vqa-search index` on the dataset "
                            "again first")


def _index_path(dataset: Path | str) -> Path:
    try:
        return find_index(dataset, upwards=False)
    except UserError:
        raise UserError(f"no vqa-search index in {dataset}: run `vqa-search index {dataset}` first") from None
