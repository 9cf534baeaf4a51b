"""What an index holds, for `vqa-search info`: read from manifests and file headers, never a model.

The model and weights, counts, disk use, generations, skipped files, and what the alignment stages
keep beside the index (region sets under `regions/`, the stage-2 re-ranker). It imports no torch,
open_clip or FAISS, so it answers at once; it lives in the align layer because region sets and the
re-ranker are align's files. A damaged region set or re-ranker is reported, not raised: `info` is
what a user runs to find out what is wrong.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vqa_search.align.constants import REGIONS_DIR, RERANKER_FILE
from vqa_search.core.errors import UserError
from vqa_search.core.identity import ModelIdentity
from vqa_search.core.inference import Plan
from vqa_search.core.store import IndexDir
from vqa_search.retrieval.searcher import find_index

SKIPPED_SHOWN = 5  # in the text; --json lists every skipped file
RERANKER_FORMAT = "vqa-search-reranker/1"


@dataclass
class RegionSetInfo:
    name: str
    path: Path
    bytes: int
    source: str | None = None
    num_regions: int | None = None
    feature_dim: int | None = None
    rows: int | None = None  # images with regions
    generation: int | None = None
    index_generation: int | None = None  # the index generation the set was computed for
    error: str | None = None  # why its manifest could not be read


@dataclass
class RerankerInfo:
    path: Path
    bytes: int
    lam: float | None = None
    regions: str | None = None  # the region set it was trained on
    clip: dict | None = None  # identity of the CLIP it reads
    matches_index: bool | None = None  # that CLIP has the index's weights (else `query --rerank` refuses it)
    error: str | None = None


@dataclass
class IndexInfo:
    path: Path
    format_version: int
    created: str | None
    vqa_search_version: str | None
    model: dict  # the identity: model, pretrained, sha256
    dim: int | None
    images: int
    captions: int
    index_types: dict  # requested, and the FAISS type of the images and captions indexes
    dataset: dict  # images_dir and caption_file, relative to the index directory
    generation: int
    generations_on_disk: list[int]
    bytes: int  # everything under the index directory
    live_bytes: int  # the live generation's files
    pending: dict | None  # shards of an interrupted run: {"shards", "bytes"}
    skipped: list[dict] = field(default_factory=list)
    region_sets: list[RegionSetInfo] = field(default_factory=list)
    reranker: RerankerInfo | None = None
    index_params: dict = field(default_factory=dict)  # per kind, the manifest's FAISS spec; max_memory: the budget
    inference: dict | None = None  # core/inference.py's Plan as recorded; None: made before backends were recorded

    def to_json(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        data["model"]["description"] = ModelIdentity.from_json(self.model).describe()
        for region_set in data["region_sets"]:
            region_set["path"] = str(region_set["path"])
        if data["reranker"] is not None:
            data["reranker"]["path"] = str(data["reranker"]["path"])
        return data

    def text(self) -> str:
        types = ", ".join(f"{kind} {self.index_types[kind]}" for kind in ("images", "captions")
                          if self.index_types.get(kind))
        version = f", written by vqa-search {self.vqa_search_version}" if self.vqa_search_version else ""
        rows = [
            ("index", f"{self.path} (format {self.format_version}{version})"),
            ("model", ModelIdentity.from_json(self.model).describe()),
            ("inference", Plan.from_json(self.inference).describe() if self.inference else "torch fp32 (not recorded)"),
            ("contents", f"{_count(self.images, 'image')}, {_count(self.captions, 'caption')}, "
                         f"{self.dim}-d vectors; FAISS: {types or 'none'}"),
            ("disk", f"{_size(self.bytes)} in all; the live generation {_size(self.live_bytes)}"),
            ("generation", f"{self.generation}" + (f", committed {self.created}" if self.created else "")
                           + f" (on disk: {', '.join(map(str, self.generations_on_disk)) or 'none'})"),
        ]
        rows += [("faiss " + kind, _spec_text(self.index_params[kind], self.index_params.get("max_memory")))
                 for kind in ("images", "captions") if _chosen(self.index_params.get(kind))]
        if self.pending:
            rows.append(("pending", f"{_count(self.pending['shards'], 'shard')} ({_size(self.pending['bytes'])}) "
                                    "of an interrupted run: `vqa-search index` resumes from them"))
        rows.append(("skipped", _skipped_text(self.skipped)))
        rows += [("regions", _region_text(region_set, self.generation)) for region_set in self.region_sets] or [
            ("regions", "none (`vqa-search regions DATASET` computes them)")]
        rows.append(("reranker", _reranker_text(self.reranker) if self.reranker else
                     f"none (`vqa-search train rerank` writes {RERANKER_FILE} here)"))
        width = max(len(label) for label, _ in rows) + 2
        return "\n".join(f"{label:<{width}}{value}" for label, value in rows)


def index_info(path: Path | str | None = None) -> IndexInfo:
    """The index at `path` (an index directory or the folder holding `.vqa-search/`), or found from the
    current folder upwards when `path` is None."""
    try:
        found = find_index(path, upwards=path is None)
    except UserError as error:
        if not str(error).startswith("no vqa-search index"):  # e.g. an interrupted first build: said as it is
            raise
        where = f"at {path}" if path is not None else f"in {Path.cwd()} or its parents"
        raise UserError(f"no vqa-search index {where}: give its folder (`vqa-search info DIR`), or run "
                        "`vqa-search index DATASET` first") from None
    index_dir = IndexDir(found)
    manifest = index_dir.read_manifest()
    live = index_dir.generation(manifest["generation"])
    counts = manifest.get("counts", {})
    index = manifest.get("index") or {}
    return IndexInfo(
        path=index_dir.path.resolve(),
        format_version=manifest["format_version"],
        created=manifest.get("created"),
        vqa_search_version=manifest.get("vqa_search_version"),
        model=ModelIdentity.from_json(manifest["model"]).to_json(),
        dim=manifest.get("dim"),
        images=counts.get("images", 0),
        captions=counts.get("captions", 0),
        index_types={"requested": index.get("requested"),
                     **{kind: (index.get(kind) or {}).get("type") for kind in ("images", "captions")}},
        dataset=manifest.get("dataset", {}),
        generation=manifest["generation"],
        generations_on_disk=_generations(index_dir.path),
        bytes=_tree_bytes(index_dir.path),
        live_bytes=_tree_bytes(live),
        pending=_pending(index_dir.pending),
        skipped=manifest.get("skipped", []),
        region_sets=[_region_set(folder) for folder in sorted((index_dir.path / REGIONS_DIR).glob("*"))
                     if folder.is_dir()],
        reranker=_reranker(index_dir.path / RERANKER_FILE, manifest["model"]),
        index_params={kind: value for kind, value in index.items() if kind != "requested"},
        inference=manifest.get("inference"),
    )


def _chosen(spec: dict | None) -> bool:
    """Whether a FAISS spec has more to say than its type (an IVF's lists, a budget, a measured recall)."""
    return bool(spec) and spec.get("type") != "flat" or bool(spec and spec.get("budget_bytes"))


def _spec_text(spec: dict, budget: str | None) -> str:
    parts = [spec["type"]]
    if spec.get("nlist"):
        parts.append(f"nlist {spec['nlist']:,}")
    if spec.get("pq_bytes"):
        parts.append(f"PQ {spec['pq_bytes']} bytes")
    if spec.get("nprobe"):
        parts.append(f"nprobe {spec['nprobe']}")
    if spec.get("refine"):
        parts.append(f"top k×{spec['refine']} re-scored exactly")
    text = ", ".join(parts)
    if budget:
        text += f"; chosen for --max-index-memory {budget}"
    if spec.get("recall_at_10") is not None:
        text += f"; recall@10 {spec['recall_at_10']:.3f} measured on {spec['recall_queries']} held-out vectors"
    return text


def _generations(root: Path) -> list[int]:
    numbers = []
    for folder in root.glob("gen-*"):
        try:
            numbers.append(int(folder.name.split("-", 1)[1]))
        except ValueError:
            continue
    return sorted(numbers)


def _tree_bytes(root: Path) -> int:
    """Sizes of the regular files under `root`; links are not followed (nothing is counted twice)."""
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                status = os.lstat(os.path.join(folder, name))
            except OSError:
                continue  # removed by a concurrent commit meanwhile
            if stat.S_ISREG(status.st_mode):
                total += status.st_size
    return total


def _pending(pending: Path) -> dict | None:
    shards = list(pending.glob("*-*.parquet"))  # a shard counts once its parquet file exists
    return {"shards": len(shards), "bytes": _tree_bytes(pending)} if shards else None


def _region_set(folder: Path) -> RegionSetInfo:
    info = RegionSetInfo(name=folder.name, path=folder, bytes=_tree_bytes(folder))
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        info.source = manifest["source"]
        info.num_regions = manifest["num_regions"]
        info.feature_dim = manifest["feature_dim"]
        info.rows = manifest["rows"]
        info.generation = manifest["generation"]
        info.index_generation = manifest.get("index_generation")
    except FileNotFoundError:
        info.error = "no manifest.json: never committed (an interrupted `vqa-search regions` run?)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        info.error = f"unreadable manifest.json ({type(error).__name__}: {error})"
    return info


def _reranker(path: Path, index_model: dict) -> RerankerInfo | None:
    if not path.is_file():
        return None
    info = RerankerInfo(path=path, bytes=path.stat().st_size)
    try:
        metadata = _safetensors_metadata(path)
        if metadata.get("format") != RERANKER_FORMAT:
            raise ValueError(f"not a vqa-search re-ranker (format {metadata.get('format')!r})")
        config = json.loads(metadata["config"])
        info.lam = float(config["lam"])
        info.regions = config.get("regions") or None
        info.clip = ModelIdentity.from_json(config["clip"]).to_json()
        info.matches_index = ModelIdentity.from_json(config["clip"]).same_weights(ModelIdentity.from_json(index_model))
    except (OSError, ValueError, KeyError, TypeError) as error:
        info.error = f"{type(error).__name__}: {error}"
    return info


def _safetensors_metadata(path: Path, most: int = 1 << 24) -> dict:
    """The header's __metadata__ of a safetensors file (8-byte length, then JSON), without loading tensors."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if not 0 < length <= most:
            raise ValueError(f"not a safetensors file (header length {length})")
        header = json.loads(handle.read(length))
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise ValueError("the safetensors header has no metadata")
    return metadata


def _skipped_text(skipped: list[dict]) -> str:
    if not skipped:
        return "none"
    shown = "; ".join(f"{entry.get('path')}: {entry.get('reason')}" for entry in skipped[:SKIPPED_SHOWN])
    more = f"; and {len(skipped) - SKIPPED_SHOWN:,} more (--json lists all)" if len(skipped) > SKIPPED_SHOWN else ""
    return f"{_count(len(skipped), 'file')}: {shown}{more}"


def _region_text(region_set: RegionSetInfo, index_generation: int) -> str:
    if region_set.error:
        return f"{region_set.name}: {region_set.error}"
    stale = (f"; computed for index generation {region_set.index_generation}, run `vqa-search regions` to update"
             if region_set.index_generation not in (None, index_generation) else "")
    name = region_set.name if region_set.name == region_set.source else f"{region_set.name} ({region_set.source})"
    return (f"{name}: {region_set.num_regions} per image, "
            f"{region_set.feature_dim} values each, {_count(region_set.rows or 0, 'image')}; "
            f"{_size(region_set.bytes)}{stale}")


def _reranker_text(reranker: RerankerInfo) -> str:
    if reranker.error:
        return f"{reranker.path.name}: unreadable ({reranker.error})"
    clip = ModelIdentity.from_json(reranker.clip).describe()
    fits = "the index's" if reranker.matches_index else "NOT the index's: `query --rerank` refuses it"
    return (f"{reranker.path.name}: λ {reranker.lam:g}, regions {reranker.regions or '?'}, CLIP {clip} "
            f"({fits}); {_size(reranker.bytes)}")


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def _size(n_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} bytes"
