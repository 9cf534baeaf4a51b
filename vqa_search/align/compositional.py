"""`bench compositional` with a model: SugarCrepe and Winoground scores, global CLIP and re-ranked.

Every text and every image is embedded once; a pair's global score is the cosine of the two vectors.
With a re-ranker, s = s_global + λ·s_fine for the very same pairs, so the two rows differ by stage 2
alone. Its regions come from the index's region set for images the index holds unchanged, and are
extracted now with the set's own extractor for any other image (as for a query image).
Reading the files and turning scores into percentages is `retrieval/compositional.py`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from vqa_search.align.region_store import RegionSet
from vqa_search.align.rerank import caption_tokens, load_reranker_for, padded
from vqa_search.core.encode import encode_texts
from vqa_search.core.errors import UserError
from vqa_search.core.identity import DEFAULT_MODEL, DEFAULT_PRETRAINED, ModelIdentity, resolve_identity
from vqa_search.core.image_stream import ImageReader, ImageRef
from vqa_search.core.images import load_named_image
from vqa_search.core.models import Clip, load_clip
from vqa_search.core.runner import ClipImageMapper, Collector, run
from vqa_search.core.store import FileState, IndexDir
from vqa_search.core.threads import default_workers
from vqa_search.retrieval.compositional import KIND, CompositionalData, read_compositional
from vqa_search.retrieval.searcher import Index, find_index

log = logging.getLogger("vqa_search")

PAIRS_PER_BATCH = 64


@dataclass
class CompositionalConfig:
    model: str | None = None  # None with pretrained None: the index's weights if there is an index, else the defaults
    pretrained: str | None = None
    images: Path | None = None  # folder the files' image names are relative to
    index: Path | None = None  # the index (or its dataset folder) whose regions --reranker reads; default: images
    reranker: Path | None = None
    name: str | None = None
    batch_size: int = 64
    workers: int = field(default_factory=default_workers)
    progress: bool = True


def run_compositional(path: Path | str, config: CompositionalConfig = CompositionalConfig()) -> list[dict]:
    """One result per scoring: the global CLIP, then (with a re-ranker) s_global + λ·s_fine."""
    started = time.perf_counter()
    data = read_compositional(path, config.images)
    index_path = config.index or data.images_dir
    identity = _identity(config, index_path)
    clip = load_clip(identity)
    text_vectors = encode_texts(clip, data.texts)
    image_vectors = embed_images(clip, data.images, config.batch_size, config.workers, config.progress)
    pairs = data.pairs()
    global_scores = np.einsum("pd,pd->p", text_vectors[pairs[:, 0]], image_vectors[pairs[:, 1]])
    name = config.name or f"{identity.model} {identity.pretrained}"
    runs = [_result(data, global_scores, name, identity, time.perf_counter() - started)]
    if config.reranker:
        reranker = load_reranker_for(config.reranker, identity)
        regions = RegionSet.open(index_path, reranker.config.regions)
        if regions.feature_dim != reranker.config.region_dim:
            raise UserError(f"the re-ranker {config.reranker} expects {reranker.config.region_dim}-d regions, but "
                            f"the region set {regions.name!r} has {regions.feature_dim}-d ones")
        image_regions = region_features(regions, data.images)
        fine = fine_pair_scores(reranker, caption_tokens(clip, data.texts, dtype=torch.float32), image_regions, pairs)
        lam = reranker.config.lam
        result = _result(data, global_scores + lam * fine, f"{name} + re-ranker", identity,
                         time.perf_counter() - started)
        runs.append({**result, "reranker": str(config.reranker), "lambda": lam})
    return runs


def _identity(config: CompositionalConfig, index_path: Path) -> ModelIdentity:
    if config.model is None and config.pretrained is None:
        try:
            index = Index(IndexDir(find_index(index_path, upwards=False)))
        except UserError:
            index = None
        if index is not None:
            log.info("scoring with the index's weights, %s", index.identity.describe())
            return index.identity
    return resolve_identity(config.model or DEFAULT_MODEL, config.pretrained or DEFAULT_PRETRAINED)


def embed_images(clip: Clip, paths: list[Path], batch_size: int = 64, workers: int = 0,
                 progress: bool = False) -> np.ndarray:
    """(len(paths), dim) image vectors; an unreadable image is an error, since its items cannot be scored."""
    reader = ImageReader([ImageRef(path, position) for position, path in enumerate(paths)], clip.preprocess,
                         batch_size, workers)
    found = run(reader, ClipImageMapper(clip), Collector(), progress)
    if found.skipped:
        position, reason = next(iter(found.skipped.items()))
        raise UserError(f"cannot read {paths[position]} ({reason})")
    return np.stack([found.results[position] for position in range(len(paths))]).astype(np.float32)


def region_features(regions: RegionSet, paths: list[Path]) -> torch.Tensor:
    """(I, K, F) float32 regions: stored ones for images the index holds as they are now, the rest extracted."""
    index = Index(IndexDir(regions.dir.path.parent.parent))
    states = {state.path: state for state in index.image_states}
    row_of = {path: row for row, path in enumerate(regions.paths)}
    out = torch.empty((len(paths), regions.num_regions, regions.feature_dim), dtype=torch.float32)
    missing = []
    for position, path in enumerate(paths):
        row = _stored_row(path, index.images_root, states, row_of)
        if row is None:
            missing.append(position)
        else:
            out[position] = torch.from_numpy(regions.features([row])[0].astype(np.float32))
    if missing:
        log.info("extracting %s regions of %d images the index does not hold", regions.name, len(missing))
        extractor = regions.extractor()
        for position in missing:
            features, _ = extractor.extract([load_named_image(paths[position], "image")])
            # stored as float16 like the set's own rows, so an image scores the same inside the index or out
            out[position] = torch.from_numpy(np.asarray(features[0]).astype(np.float16).astype(np.float32))
    return out


def _stored_row(path: Path, images_root: Path, states: dict[str, FileState], row_of: dict[str, int]) -> int | None:
    try:
        relative = path.resolve().relative_to(images_root).as_posix()
    except ValueError:
        return None
    stat = path.stat()
    if states.get(relative) != FileState(relative, stat.st_size, stat.st_mtime_ns):
        return None
    return row_of.get(relative)


@torch.no_grad()
def fine_pair_scores(reranker, tokens: list[torch.Tensor], regions: torch.Tensor, pairs: np.ndarray) -> np.ndarray:
    """s_fine of each (text, image) pair: tokens[text] against regions[image]."""
    out = np.empty(len(pairs), dtype=np.float64)
    regions = reranker.project_regions(regions)  # each image once, not once per pair
    for start in range(0, len(pairs), PAIRS_PER_BATCH):
        batch = pairs[start:start + PAIRS_PER_BATCH]
        batch_tokens, mask = padded([tokens[text] for text in batch[:, 0]])
        pair_regions = regions[torch.as_tensor(batch[:, 1])][:, None]  # (P, 1, K, F): one image per caption
        out[start:start + len(batch)] = reranker.projected_fine_scores(batch_tokens, mask, pair_regions)[:, 0].double().numpy()
    return out


def _result(data: CompositionalData, pair_scores: np.ndarray, name: str, identity: ModelIdentity,
            seconds: float) -> dict:
    scores, counts, chance = data.evaluate(pair_scores)
    return {
        "kind": KIND,
        "benchmark": data.benchmark,
        "name": name,
        "model": identity.model,
        "pretrained": identity.pretrained,
        "sha256": identity.sha256,
        "data": str(data.source),
        "images": str(data.images_dir),
        "n_items": len(data.items),
        "scores": scores,
        "counts": counts,
        "chance": chance,
        "seconds": round(seconds, 2),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
