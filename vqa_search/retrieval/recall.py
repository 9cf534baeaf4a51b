"""`bench recall`: recall@K of one model on one dataset split, on the Karpathy protocol.

The gallery is the split's images that are on disk and readable, and all of their captions (1,000
images and 5,000 captions for Flickr8k test). Text->image: every caption is a query, correct when its
own image is ranked. Image->text: every image is a query, correct when any of its captions is.
Images named by the split but missing or unreadable leave both sides and are counted.

Embeddings come from the dataset's index when it was built with the same weights and its files are
unchanged; otherwise the split alone is embedded in memory, and the index is left untouched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np

from vqa_search.core.encode import encode_texts
from vqa_search.core.errors import UserError
from vqa_search.indexer.datasets import Dataset, read_dataset
from vqa_search.core.image_stream import ImageReader, ImageRef
from vqa_search.core.threads import default_workers
from vqa_search.core.store import DEFAULT_DIR_NAME, FileState, IndexDir
from vqa_search.core.models import Clip, load_clip
from vqa_search.core.identity import DEFAULT_MODEL, DEFAULT_PRETRAINED, ModelIdentity, resolve_identity
from vqa_search.core.faiss_index import build_faiss, choose_spec, search
from vqa_search.core.runner import ClipImageMapper, Collector, run
from vqa_search.retrieval.metrics import chance_recall, first_correct_ranks, recall_curve, summarize
from vqa_search.retrieval.searcher import Index

log = logging.getLogger("vqa_search")

SEARCH_TYPES = ("flat", "ivf", "ivfpq")


@dataclass
class RecallConfig:
    split: str = "test"
    model: str = DEFAULT_MODEL
    pretrained: str = DEFAULT_PRETRAINED
    index_type: str = "flat"  # flat scores every pair exactly; ivf measures what the ANN index costs
    nprobe: int | None = None
    ks: tuple[int, ...] = (1, 5, 10)
    name: str | None = None  # the row label in reports; default "model pretrained"
    index: Path | None = None  # an index whose embeddings may be reused; default DATASET/.vqa-search
    captions: Path | None = None
    images: Path | None = None
    batch_size: int = 64
    workers: int = field(default_factory=default_workers)
    progress: bool = True


@dataclass
class Gallery:
    """The split as evaluated: images in split order, their captions grouped by image."""

    images: list[str]
    caption_texts: list[str]
    caption_image: np.ndarray  # position in `images` of each caption's image
    image_vectors: np.ndarray
    caption_vectors: np.ndarray
    missing: int  # images the split names that are not on disk
    skipped: dict[str, str]  # unreadable image -> reason
    source: str  # "index" when the vectors were reused, "computed" when embedded now


@dataclass
class RecallRun:
    name: str
    model: str
    pretrained: str
    sha256: str | None  # of the checkpoint, when the weights came from a file
    dataset: str
    split: str
    index_type: str
    nprobe: int | None
    n_images: int
    n_captions: int
    missing_images: int
    skipped_images: int
    embeddings: str
    t2i: dict[str, float]
    i2t: dict[str, float]
    chance: dict[str, dict[str, float]]
    curves: dict[str, list[float]]  # R@1 .. R@50 per direction, for plots
    seconds: float
    created: str
    gallery: Gallery = field(repr=False)
    ranks: dict[str, np.ndarray] = field(repr=False)

    def to_json(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__ if name not in ("gallery", "ranks")}

    def rank_records(self) -> Iterator[dict]:
        """One record per query: what was asked, what was correct, where the first correct item ranked."""
        gallery = self.gallery
        caption_ids = _caption_ids(gallery)
        for query, (text, image) in enumerate(zip(gallery.caption_texts, gallery.caption_image)):
            yield {"direction": "t2i", "query_id": caption_ids[query], "query": text,
                   "correct": [gallery.images[image]], "rank": int(self.ranks["t2i"][query])}
        for image, path in enumerate(gallery.images):
            correct = [caption_ids[c] for c in np.flatnonzero(gallery.caption_image == image)]
            yield {"direction": "i2t", "query_id": path, "query": path, "correct": correct,
                   "rank": int(self.ranks["i2t"][image])}


def run_recall(dataset: Path | str, config: RecallConfig = RecallConfig()) -> RecallRun:
    started = time.perf_counter()
    if config.index_type not in SEARCH_TYPES:
        raise UserError(f"--index-type must be one of {', '.join(SEARCH_TYPES)} (got {config.index_type!r})")
    if not config.ks or min(config.ks) < 1:
        raise UserError("--k needs positive integers, e.g. 1,5,10")
    if config.nprobe is not None and config.nprobe < 1:
        raise UserError(f"--nprobe must be at least 1 (got {config.nprobe})")
    data = read_dataset(dataset, captions=config.captions, images=config.images)
    identity = resolve_identity(config.model, config.pretrained)
    gallery = load_gallery(data, config, identity, IndexDir(config.index or Path(dataset) / DEFAULT_DIR_NAME))

    ranks = gallery_ranks(gallery, config.index_type, config.nprobe)
    t2i, i2t = ranks["t2i"], ranks["i2t"]
    captions_per_image = np.bincount(gallery.caption_image, minlength=len(gallery.images))
    return RecallRun(
        name=config.name or f"{config.model} {config.pretrained}",
        model=config.model,
        pretrained=identity.pretrained,
        sha256=identity.sha256,
        dataset=str(data.root),
        split=config.split,
        index_type=config.index_type,
        nprobe=config.nprobe,
        n_images=len(gallery.images),
        n_captions=len(gallery.caption_texts),
        missing_images=gallery.missing,
        skipped_images=len(gallery.skipped),
        embeddings=gallery.source,
        t2i=summarize(t2i, config.ks),
        i2t=summarize(i2t, config.ks),
        chance={
            "t2i": {f"R@{k}": chance_recall(np.ones(len(t2i)), len(gallery.images), k) for k in config.ks},
            "i2t": {f"R@{k}": chance_recall(captions_per_image, len(gallery.caption_texts), k) for k in config.ks},
        },
        curves={"t2i": recall_curve(t2i), "i2t": recall_curve(i2t)},
        seconds=time.perf_counter() - started,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        gallery=gallery,
        ranks=ranks,
    )


def load_gallery(data: Dataset, config: RecallConfig, identity: ModelIdentity, index_dir: IndexDir) -> Gallery:
    texts_of = split_texts(data, config.split)
    reused = _vectors_from_index(index_dir, identity, data, texts_of)
    if reused is not None:
        image_vectors, caption_vectors = reused
        return _gallery(texts_of, image_vectors, caption_vectors, data.split_missing.get(config.split, 0), {},
                        "index")
    log.info("embedding the %s split (%d images) with %s", config.split, len(texts_of), identity.describe())
    return embed_gallery(load_clip(identity), data, config.split, config.batch_size, config.workers,
                         config.progress)


def split_texts(data: Dataset, split: str) -> dict[str, list[str]]:
    """The captions of each image of `split` on disk, in split order; images without captions left out."""
    if not data.splits:
        raise UserError(
            f"{data.root} has no split information: train/val/test splits come from Karpathy's "
            "dataset_*.json or the Flickr_8k.{train,dev,test}Images.txt files"
        )
    if split not in data.splits:
        raise UserError(f"no {split!r} split in {data.root}; it has {', '.join(sorted(data.splits))}")
    texts_of: dict[str, list[str]] = {path: [] for path in data.splits[split]}
    for caption in data.captions:
        if caption.image in texts_of:
            texts_of[caption.image].append(caption.text)
    texts_of = {path: texts for path, texts in texts_of.items() if texts}  # an uncaptioned image has nothing to find
    if not texts_of:
        raise UserError(f"the {split} split of {data.root} has no captioned image on disk")
    return texts_of


def embed_gallery(clip: Clip, data: Dataset, split: str, batch_size: int = 64, workers: int = 0,
                  progress: bool = False) -> Gallery:
    """The split embedded now by a model in memory, no index involved (also validation during training)."""
    texts_of = split_texts(data, split)
    reader = ImageReader([ImageRef(data.images_dir / path, path) for path in texts_of], clip.preprocess, batch_size,
                         workers)
    found = run(reader, ClipImageMapper(clip), Collector(), progress)
    texts_of = {path: texts for path, texts in texts_of.items() if path in found.results}
    if not texts_of:
        raise UserError(f"no readable image in the {split} split of {data.root}")
    caption_vectors = encode_texts(clip, [text for texts in texts_of.values() for text in texts])
    image_vectors = np.stack([found.results[path] for path in texts_of])
    return _gallery(texts_of, image_vectors, caption_vectors, data.split_missing.get(split, 0), found.skipped,
                    "computed")


def gallery_ranks(gallery: Gallery, index_type: str = "flat", nprobe: int | None = None) -> dict[str, np.ndarray]:
    """Rank of each query's first correct item, text->image ("t2i") and image->text ("i2t")."""
    images = np.arange(len(gallery.images))
    return {
        "t2i": first_correct_ranks(gallery_scores(gallery.caption_vectors, gallery.image_vectors, index_type, nprobe),
                                   gallery.caption_image, images),
        "i2t": first_correct_ranks(gallery_scores(gallery.image_vectors, gallery.caption_vectors, index_type, nprobe),
                                   images, gallery.caption_image),
    }


def _gallery(texts_of: dict[str, list[str]], image_vectors: np.ndarray, caption_vectors: np.ndarray, missing: int,
             skipped: dict[str, str], source: str) -> Gallery:
    caption_image = np.repeat(np.arange(len(texts_of)), [len(texts) for texts in texts_of.values()])
    return Gallery(list(texts_of), [text for texts in texts_of.values() for text in texts], caption_image,
                   np.asarray(image_vectors, np.float32), np.asarray(caption_vectors, np.float32),
                   missing, skipped, source)


def _vectors_from_index(index_dir: IndexDir, identity: ModelIdentity, data: Dataset,
                        texts_of: dict[str, list[str]]) -> tuple[np.ndarray, np.ndarray] | None:
    """The index's vectors for the split, if they are exactly what embedding it now would give."""
    if not index_dir.exists():
        return None
    index = Index(index_dir)
    if not identity.same_weights(index.identity) or index.images_root != data.images_dir.resolve():
        log.info("the index at %s holds other weights or images; embedding the split instead", index_dir.path)
        return None
    image_id = {state.path: i for i, state in enumerate(index.image_states)}
    caption_ids: dict[int, list[int]] = {}
    for caption_id, owner in enumerate(index.caption_image):
        caption_ids.setdefault(int(owner), []).append(caption_id)
    for path in texts_of:
        stat = (data.images_dir / path).stat()
        known = image_id.get(path)
        stored_texts = [index.caption_texts[c] for c in caption_ids.get(known, [])]
        current = FileState(path, stat.st_size, stat.st_mtime_ns)
        if known is None or index.image_states[known] != current or stored_texts != texts_of[path]:
            log.info("the index at %s is not up to date; embedding the split instead", index_dir.path)
            return None
    image_rows = [image_id[path] for path in texts_of]
    caption_rows = [c for row in image_rows for c in caption_ids[row]]
    return index.embeddings("images")[image_rows], index.embeddings("captions")[caption_rows]


def gallery_scores(queries: np.ndarray, items: np.ndarray, index_type: str, nprobe: int | None) -> np.ndarray:
    """Query x item similarities; with an ANN index, the items it does not return score -inf (rank last)."""
    if index_type == "flat":
        return queries @ items.T
    spec = choose_spec(len(items), index_type)
    scores, ids = search(build_faiss(items, spec), queries, len(items), nprobe or spec.nprobe)
    dense = np.full((len(queries), len(items)), -np.inf, dtype=np.float32)
    rows, columns = np.nonzero(ids >= 0)
    dense[rows, ids[rows, columns]] = scores[rows, columns]
    return dense


def _caption_ids(gallery: Gallery) -> list[str]:
    """'image.jpg#0': the Flickr8k token file's naming, stable across runs and models."""
    ids, seen = [], {}
    for image in gallery.caption_image:
        path = gallery.images[image]
        ids.append(f"{path}#{seen.setdefault(path, 0)}")
        seen[path] += 1
    return ids
