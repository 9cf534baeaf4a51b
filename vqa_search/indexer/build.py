"""Build or update an index: dataset reader -> encoders -> shard writer -> commit.

Incremental by construction: every embedding ever computed with the same weights is looked up by
file state (path, size, mtime), then by content hash, then by caption text, before the model is
even loaded. An unchanged folder therefore costs a directory scan and a few stats.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from vqa_search import __version__
from vqa_search.core.errors import UserError
from vqa_search.core.files import os_error_reason
from vqa_search.core.memory import parse_memory
from vqa_search.indexer.datasets import IMAGE_EXTENSIONS, Dataset, read_dataset
from vqa_search.core.threads import default_workers
from vqa_search.core.ray_runner import RayRunner
from vqa_search.core.store import (
    CAPTIONS_SCHEMA,
    DEFAULT_DIR_NAME,
    FORMAT_VERSION,
    IMAGES_SCHEMA,
    EmbeddingCache,
    FileState,
    ImageRecord,
    IndexDir,
    ShardWriter,
    read_parquet,
)
from vqa_search.core.identity import (DEFAULT_MODEL, DEFAULT_PRETRAINED, ModelIdentity, find_recorded_weights,
                                      resolve_identity)
from vqa_search.core.inference import Plan, check_names, choose_plan, plan_for_queries

# torch, open_clip and FAISS are imported when something is embedded or committed: an unchanged folder
# is checked without them (the scan, the manifest and two parquet files), in well under a second.
if TYPE_CHECKING:
    from vqa_search.core.image_stream import DecodedItem
    from vqa_search.core.models import Clip

log = logging.getLogger("vqa_search")


def load_clip(identity: ModelIdentity, plan: Plan | None = None) -> Clip:
    """core.models.load_clip, imported on first use (tests replace this name to see it is never called)."""
    from vqa_search.core.models import load_clip as load

    return load(identity, plan=plan)


def encode_image_batch(clip: Clip, pixels):
    """core.encode.encode_image_batch, imported on first use (tests replace this name to stop a run midway)."""
    from vqa_search.core.encode import encode_image_batch as encode

    return encode(clip, pixels)


@dataclass
class BuildConfig:
    # None: what the index records (an interrupted run's, else the committed one's), else the defaults
    model: str | None = None
    pretrained: str | None = None
    out: Path | None = None  # default: DATASET/.vqa-search
    captions: Path | None = None
    images: Path | None = None
    batch_size: int = 64
    workers: int = field(default_factory=default_workers)
    index_type: str = "auto"
    max_index_memory: str | None = None  # e.g. "4G": index parameters chosen for this budget (faiss_index.choose_for_budget)
    rows_per_shard: int = 1024
    progress: bool = True
    reembed: bool = False  # allow other weights than the index's: every image and caption is embedded again
    runner: RayRunner | None = None  # where images are decoded and embedded (core/ray_runner.py); None: here
    # core/inference.py: how the towers run. None: what the index's last run asked for, else auto
    backend: str | None = None
    precision: str | None = None


@dataclass
class BuildReport:
    index_dir: Path
    images: int
    captions: int
    embedded_images: int
    embedded_captions: int
    skipped: list[dict]
    up_to_date: bool
    seconds: float  # the whole run
    embedding_seconds: dict[str, float] = field(default_factory=dict)  # per kind, once the model is loaded
    model: str = ""  # the weights the index now holds, described
    reembedded_from: str | None = None  # the weights it held before, when --reembed replaced them
    inference: str | None = None  # how this run's new vectors were embedded (core/inference.py); None: none were

    def to_json(self) -> dict:
        return {**asdict(self), "index_dir": str(self.index_dir)}

    def summary(self) -> str:
        images, captions = _count(self.images, "image"), _count(self.captions, "caption")
        if self.up_to_date:
            head = f"index at {self.index_dir} is up to date: {images}, {captions}"
        else:
            head = (
                f"indexed {images} ({self.embedded_images:,} embedded now) and {captions} "
                f"({self.embedded_captions:,} embedded now) into {self.index_dir}"
            )
        lines = [f"{head} in {self.seconds:.1f} s" + (f" ({self.inference})" if self.inference else "")]
        if self.reembedded_from:
            lines.append(f"re-embedded everything with {self.model}; the index had {self.reembedded_from}")
        if self.skipped:
            examples = "; ".join(f"{s['path']}: {s['reason']}" for s in self.skipped[:3])
            more = f"; and {len(self.skipped) - 3:,} more (see manifest.json)" if len(self.skipped) > 3 else ""
            lines.append(f"skipped {_count(len(self.skipped), 'file')}: {examples}{more}")
        return "\n".join(lines)


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def build_index(dataset: Path | str, config: BuildConfig = BuildConfig()) -> BuildReport:
    started = time.perf_counter()
    data = read_dataset(dataset, captions=config.captions, images=config.images)
    if not data.images and not data.unreadable:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise UserError(f"no images in {data.images_dir} (looked for {extensions}, in subfolders too)")
    if config.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if config.max_index_memory is not None:
        parse_memory(config.max_index_memory)  # a typo is said now, not after the embedding
        if config.index_type not in ("auto", "ivfpq-ondisk"):
            raise UserError("--max-index-memory chooses the index type: leave --index-type auto or give "
                            f"ivfpq-ondisk (got {config.index_type!r})")
    check_names(config.backend or "auto", config.precision or "auto")
    if (config.backend or "auto") != "auto" or (config.precision or "auto") != "auto":
        _check_plan_runs_here(config)  # said now, even when the folder turns out unchanged
    _warn_missing(data)
    index_dir = IndexDir(config.out or Path(dataset) / DEFAULT_DIR_NAME)
    committed = _committed_identity(index_dir)
    identity, replaced = _choose_identity(index_dir, config, committed)
    with index_dir.lock():
        if _committed_identity(index_dir) != committed:  # decided before the lock: another run committed since
            raise UserError(f"another vqa-search run changed the index at {index_dir.path} meanwhile: run again")
        builder = _Builder(data, index_dir, identity, config)
        report = builder.run()
    report.inference = builder.clip.plan.describe() if builder.loaded else None
    report.model = identity.describe()
    report.reembedded_from = replaced.describe() if replaced is not None else None
    report.seconds = time.perf_counter() - started
    return report


def _check_plan_runs_here(config: BuildConfig) -> None:
    """A backend or precision this machine cannot run (fp16 without CUDA, onnx without onnxruntime) is a
    UserError; asking costs a torch import, which only an explicit --backend/--precision pays."""
    from vqa_search.core.models import default_device

    choose_plan(config.backend or "auto", config.precision or "auto", default_device().type)


def _committed_identity(index_dir: IndexDir) -> ModelIdentity | None:
    return ModelIdentity.from_json(index_dir.read_manifest()["model"]) if index_dir.exists() else None


def _interrupted_identity(index_dir: IndexDir) -> ModelIdentity | None:
    """The weights of a run that was stopped before its commit (its shards wait in pending/)."""
    try:
        return ModelIdentity.from_json(json.loads((index_dir.pending / "model.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # none, or unreadable: the store discards such shards


def _choose_identity(index_dir: IndexDir, config: BuildConfig,
                     committed: ModelIdentity | None) -> tuple[ModelIdentity, ModelIdentity | None]:
    """The weights to index with, and the committed ones they replace (None: nothing is replaced).

    Left out, --model and --pretrained are what the index records: an interrupted run's (so that
    running `index` again finishes it), else the committed index's; else the library defaults. Other
    weights than the committed ones would re-embed everything, so they need `reembed`.
    """
    interrupted = _interrupted_identity(index_dir)
    recorded = interrupted or committed
    model = config.model or (recorded.model if recorded else DEFAULT_MODEL)
    if config.pretrained is not None:  # names the index records were checked then: no open_clip now
        identity = resolve_identity(model, config.pretrained, known=(interrupted, committed))
    elif recorded is not None and model == recorded.model:
        identity = _recorded_weights(index_dir, recorded, config.reembed)
    else:
        identity = resolve_identity(model, DEFAULT_PRETRAINED, known=(interrupted, committed))
    if committed is None or identity.same_weights(committed):
        if config.reembed and committed is not None:
            log.info("--reembed: the index at %s already holds %s; nothing to re-embed",
                     index_dir.path, committed.describe())
        return identity, None
    resuming = interrupted is not None and identity.same_weights(interrupted)  # a re-embedding, stopped
    if not (config.reembed or resuming):
        counts = index_dir.read_manifest().get("counts", {})
        everything = (f"all {_count(counts['images'], 'image')} and {_count(counts['captions'], 'caption')}"
                      if isinstance(counts.get("images"), int) and isinstance(counts.get("captions"), int)
                      else "every image and caption")
        raise UserError(
            f"the index at {index_dir.path} holds {committed.describe()}; indexing with {identity.describe()} "
            f"embeds {everything} again: pass --reembed to do that, or leave out --model/--pretrained to "
            "update the index with its own weights"
        )
    return identity, committed


def _recorded_weights(index_dir: IndexDir, recorded: ModelIdentity, reembed: bool) -> ModelIdentity:
    """The recorded identity, checked: a checkpoint file must still be there and hold the same weights."""
    return find_recorded_weights(
        recorded, f"the index at {index_dir.path}",
        if_missing=(": pass --pretrained with its new path (the same weights are recognised by content), or "
                    "other weights with --reembed"),
        if_changed=": pass --reembed to embed everything again with the new file", accept_changed=reembed)


class _Builder:
    def __init__(self, data: Dataset, index_dir: IndexDir, identity: ModelIdentity, config: BuildConfig):
        self.data = data
        self.index_dir = index_dir
        self.identity = identity
        self.config = config
        self.cache: EmbeddingCache = index_dir.load_cache(identity)
        self._clip: Clip | None = None
        self.embedding_seconds: dict[str, float] = {}  # after the model is loaded: decoding + forward

    @property
    def loaded(self) -> bool:
        return self._clip is not None

    @property
    def clip(self) -> Clip:
        """Loaded only when something needs embedding: an unchanged folder never pays for it."""
        if self._clip is None:
            from vqa_search.core.models import default_device

            device, recorded = default_device().type, self._recorded_plan()
            if recorded is not None and not (self.config.backend or self.config.precision):
                plan = plan_for_queries(recorded, device)  # the index's own, where it runs here
            else:
                backend, precision = recorded.requested if recorded else ("auto", "auto")
                plan = choose_plan(self.config.backend or backend, self.config.precision or precision, device)
            self._clip = load_clip(self.identity, plan)
        return self._clip

    def _recorded_plan(self) -> Plan | None:
        """What the committed index was embedded with (None: made before backends were recorded)."""
        if not self.index_dir.exists():
            return None
        recorded = self.index_dir.read_manifest().get("inference")
        return Plan.from_json(recorded) if recorded else None

    def _inference_record(self) -> dict | None:
        """The manifest's record of how new vectors were embedded: this run's plan (and which ONNX export)
        if it loaded the model, else the committed one's. Vectors reused from earlier runs keep theirs."""
        if not self.loaded:
            recorded = self._recorded_plan()
            return self.index_dir.read_manifest().get("inference") if recorded else None
        record = self._clip.plan.to_json()
        if self._clip.plan.uses_onnx():
            from vqa_search.core.backends import export_key

            record["onnx_export"] = export_key(self._clip)
        return record

    def run(self) -> BuildReport:
        records, embedded_images = self._image_records()
        indexed = [r for r in records if r.reason is None]
        skipped = [_skipped_entry(r) for r in records if r.reason is not None]
        skipped += [{"path": path, "reason": reason, "bytes": 0, "mtime_ns": 0, "sha256": ""}
                    for path, reason in self.data.unreadable.items()]
        if not indexed:
            first = f" (e.g. {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""
            raise UserError(f"no readable image in {self.data.images_dir}: {len(skipped)} files skipped{first}")
        image_id = {r.state.path: i for i, r in enumerate(indexed)}
        captions = [c for c in self.data.captions if c.image in image_id]
        caption_vectors, embedded_captions = self._caption_vectors([c.text for c in captions])

        split_of = {path: split for split, paths in self.data.splits.items() for path in paths}
        # plain columns first: building arrow tables from Python lists imports pandas, which an unchanged
        # folder never needs
        images_columns = {
            "id": list(range(len(indexed))), "path": [r.state.path for r in indexed],
            "bytes": [r.state.bytes for r in indexed], "mtime_ns": [r.state.mtime_ns for r in indexed],
            "sha256": [r.sha256 for r in indexed], "width": [r.width for r in indexed],
            "height": [r.height for r in indexed], "split": [split_of.get(r.state.path) for r in indexed],
        }
        captions_columns = {"id": list(range(len(captions))), "image_id": [image_id[c.image] for c in captions],
                            "text": [c.text for c in captions]}
        report = BuildReport(self.index_dir.path, len(indexed), len(captions), embedded_images,
                             embedded_captions, skipped, up_to_date=False, seconds=0.0,
                             embedding_seconds=self.embedding_seconds)
        if self._unchanged(images_columns, captions_columns, skipped):
            self.index_dir.clear_pending()  # left by a run killed after its commit point: nothing to resume
            report.up_to_date = True
            return report

        images_table = pa.Table.from_pydict(
            {name: images_columns[name] for name in IMAGES_SCHEMA.names}, schema=IMAGES_SCHEMA,
        ).append_column("split", pa.array(images_columns["split"], pa.string()))
        captions_table = pa.Table.from_pydict(captions_columns, schema=CAPTIONS_SCHEMA)

        image_vectors = np.stack([r.embedding for r in indexed]).astype(np.float32)
        files = {
            "images.parquet": images_table,
            "captions.parquet": captions_table,
            "image_embeddings.npy": image_vectors,
        }
        for stale in self.index_dir.path.glob(".faiss-*"):  # left by a writer killed while building (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        work = self.index_dir.path / f".faiss-{os.getpid()}"  # on-disk indexes, moved into the generation
        try:
            index_specs = {"images": self._faiss_files("images", image_vectors, files, work), "captions": None}
            if len(captions):
                files["caption_embeddings.npy"] = caption_vectors
                index_specs["captions"] = self._faiss_files("captions", caption_vectors, files, work)
            else:
                files["caption_embeddings.npy"] = np.zeros((0, image_vectors.shape[1]), np.float32)
            self.index_dir.commit(files, self._manifest(image_vectors.shape[1], len(indexed), len(captions),
                                                        index_specs, skipped))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return report

    def _faiss_files(self, target: str, vectors: np.ndarray, files: dict, work: Path) -> dict:
        """`target.faiss` (and for an on-disk IVF-PQ its `target.ivfdata`, built in `work`) into `files`;
        what the manifest records about it."""
        from vqa_search.core.faiss_index import build_faiss, build_ondisk_measured, choose_for_budget, choose_spec

        if self.config.max_index_memory is not None:
            spec = choose_for_budget(len(vectors), vectors.shape[1], parse_memory(self.config.max_index_memory),
                                     self.config.index_type)
        else:
            spec = choose_spec(len(vectors), self.config.index_type, vectors.shape[1])
        if spec.type != "ivfpq-ondisk":
            files[f"{target}.faiss"] = build_faiss(vectors, spec)
            return spec.to_json()
        with self.index_dir.writing(f"the {target} index in {work}", self.index_dir.kept_for_resume):
            work.mkdir(parents=True, exist_ok=True)
            spec, _ = build_ondisk_measured(vectors, spec, work, target)
        log.info("%s: on-disk IVF-PQ, nlist %d, PQ %d bytes, nprobe %d: recall@10 %.3f on %d held-out vectors",
                 target, spec.nlist, spec.pq_bytes, spec.nprobe, spec.recall_at_10, spec.recall_queries)
        files[f"{target}.faiss"] = work / f"{target}.faiss"
        files[f"{target}.ivfdata"] = work / f"{target}.ivfdata"
        return spec.to_json()

    def _image_records(self) -> tuple[list[ImageRecord], int]:
        """One record per file on disk, embedding reused where possible, else computed now."""
        records: dict[str, ImageRecord] = {}
        to_embed: list[ImageRecord] = []
        for path in self.data.images:
            try:
                state = self.data.file_state(path)
                known = self.cache.by_state.get(state)
                if known is not None:
                    records[path] = known
                    continue
                sha = self.data.content_sha256(path)
            except OSError as error:  # changed since the scan: deleted, replaced by a FIFO, unreadable
                records[path] = ImageRecord(FileState(path, 0, 0), "", reason=os_error_reason(error))
                continue
            same_content = self.cache.by_sha256.get(sha)
            if same_content is not None:  # touched or moved, not changed
                records[path] = ImageRecord(state, sha, same_content.width, same_content.height, None,
                                            same_content.embedding)
            else:
                to_embed.append(ImageRecord(state, sha))
        for record in self._embed_images(to_embed):
            records[record.state.path] = record
        embedded = sum(records[record.state.path].reason is None for record in to_embed)  # not the unreadable
        return [records[path] for path in self.data.images], embedded

    def _embed_images(self, pending: list[ImageRecord]) -> list[ImageRecord]:
        if not pending:
            return []
        from vqa_search.core.image_stream import ImageReader
        from vqa_search.core.runner import ClipImageMapper, run

        clip = self.clip
        started = time.perf_counter()
        reader = ImageReader([self.data.image_ref(record.state.path, record) for record in pending],
                             clip.preprocess, self.config.batch_size, self.config.workers)
        shards = _ImageShards(self.index_dir.shard_writer("images", self.identity,
                                                          rows_per_shard=self.config.rows_per_shard))
        # encode_image_batch named here, where tests replace it to kill a run midway
        run(reader, ClipImageMapper(clip, encode_image_batch), shards, self.config.progress, runner=self.config.runner)
        self.embedding_seconds["images"] = time.perf_counter() - started
        return shards.done

    def _caption_vectors(self, texts: list[str]) -> tuple[np.ndarray, int]:
        new = list(dict.fromkeys(t for t in texts if t not in self.cache.by_text))
        if new:
            from vqa_search.core.encode import encode_texts

            clip = self.clip
            started = time.perf_counter()
            writer = self.index_dir.shard_writer("captions", self.identity, rows_per_shard=self.config.rows_per_shard)
            chunk = self.config.rows_per_shard
            bar = tqdm(total=len(new), unit="cap", desc="captions", disable=not self.config.progress)
            try:
                for start in range(0, len(new), chunk):
                    part = new[start : start + chunk]
                    vectors = encode_texts(clip, part, on_batch=bar.update)
                    for text, vector in zip(part, vectors):
                        self.cache.by_text[text] = vector
                        writer.add({"text": text}, vector)
            finally:
                writer.flush()
                bar.close()
            self.embedding_seconds["captions"] = time.perf_counter() - started
        if not texts:
            return np.zeros((0, 0), np.float32), 0
        return np.stack([self.cache.by_text[t] for t in texts]).astype(np.float32), len(new)

    def _unchanged(self, images: dict[str, list], captions: dict[str, list], skipped: list[dict]) -> bool:
        """Whether the committed generation holds exactly these rows (columns by name), weights and skips."""
        if not self.index_dir.exists():
            return False
        manifest = self.index_dir.read_manifest()
        if not self.identity.same_weights(ModelIdentity.from_json(manifest["model"])):
            return False
        if (manifest["index"]["requested"] != self.config.index_type or manifest["skipped"] != skipped
                or manifest["index"].get("max_memory") != self.config.max_index_memory):
            return False
        gen = self.index_dir.generation(manifest["generation"])
        return (read_parquet(gen / "images.parquet").to_pydict() == images
                and read_parquet(gen / "captions.parquet").to_pydict() == captions)

    def _manifest(self, dim: int, n_images: int, n_captions: int, index_specs: dict, skipped: list[dict]) -> dict:
        root = self.index_dir.path
        return {
            "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "vqa_search_version": __version__,
            "model": self.identity.to_json(),
            "inference": self._inference_record(),
            "dim": dim,
            "dataset": {
                "images_dir": _relative(self.data.images_dir, root),
                "caption_file": _relative(self.data.caption_source, root) if self.data.caption_source else None,
            },
            "counts": {"images": n_images, "captions": n_captions, "skipped": len(skipped)},
            "index": {"requested": self.config.index_type, **index_specs,
                      **({"max_memory": self.config.max_index_memory} if self.config.max_index_memory else {})},
            "skipped": skipped,
        }


@dataclass
class _ImageShards:
    """The runner's writer for the index: every file as a row of pending/ (flushed on Ctrl-C too), and its record."""

    shards: ShardWriter
    done: list[ImageRecord] = field(default_factory=list)

    def add(self, item: DecodedItem, vector: np.ndarray | None) -> None:
        record = replace(item.key, width=item.width, height=item.height, reason=item.reason, embedding=vector)
        self.shards.add(_shard_row(record), vector)
        self.done.append(record)

    def close(self) -> None:
        self.shards.flush()


def _shard_row(record: ImageRecord) -> dict:
    return {"path": record.state.path, "bytes": record.state.bytes, "mtime_ns": record.state.mtime_ns,
            "sha256": record.sha256, "width": record.width, "height": record.height, "reason": record.reason}


def _skipped_entry(record: ImageRecord) -> dict:
    return {"path": record.state.path, "reason": record.reason, "bytes": record.state.bytes,
            "mtime_ns": record.state.mtime_ns, "sha256": record.sha256}


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), start.resolve())).as_posix()


def _warn_missing(data: Dataset) -> None:
    if data.missing_images:
        log.warning(
            "%d images named in %s are not on disk (%d of their captions left out); indexing the %d that are",
            data.missing_images, data.caption_source.name if data.caption_source else "the split files",
            data.missing_captions, len(data.images),
        )
