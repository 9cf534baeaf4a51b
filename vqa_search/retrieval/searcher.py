"""Answer text->image, image->image, text->caption and image->caption queries from a committed index.

The searcher reads the manifest once, then only the generation it names, so a concurrent `index`
run can never show it a half-written state. That generation survives one more commit; a searcher
still open after two says so and asks to be opened again. The model is loaded on the first query
and kept, so later queries only pay for one forward pass and a FAISS search.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq

from vqa_search.core.errors import UserError
from vqa_search.core.store import DEFAULT_DIR_NAME, FileState, IndexDir
from vqa_search.core.identity import ModelIdentity, find_recorded_weights, resolve_identity
from vqa_search.core.inference import Plan, plan_for_queries

# The model (torch, open_clip) and FAISS are imported when first used: opening an index to read its
# rows and vectors (export, info, recall's reuse check) needs neither.
if TYPE_CHECKING:
    from vqa_search.core.models import Clip
    from vqa_search.indexer.build import BuildReport

TARGETS = ("images", "captions")

log = logging.getLogger("vqa_search")


@dataclass
class Hit:
    rank: int
    score: float
    image: str  # path relative to the indexed images folder
    image_id: int
    caption: str | None  # the matched caption (target captions) or the image's first caption
    captions: list[str] = field(default_factory=list)
    caption_id: int | None = None  # set when the target is captions
    explanation: list[dict] | None = None  # re-ranked with --explain: each word's most attended region


@dataclass
class SearchResult:
    query: str  # the text, or the query image's path
    target: str
    results: list[Hit]

    def to_json(self) -> dict:
        return {"query": self.query, "target": self.target, "results": [_hit_json(hit) for hit in self.results]}


def _hit_json(hit: Hit) -> dict:
    """A hit's fields; the explanation only when one was asked for (--rerank --explain)."""
    fields = asdict(hit)
    if fields["explanation"] is None:
        del fields["explanation"]
    return fields


def find_index(start: Path | str | None = None, upwards: bool = True) -> Path:
    """The index directory at `start` or `start/.vqa-search/`; with `upwards`, in a parent too."""
    start = Path(start or Path.cwd()).resolve()
    for folder in (start, *start.parents) if upwards else (start,):
        for candidate in (folder, folder / DEFAULT_DIR_NAME):
            found = IndexDir(candidate)
            if found.exists():
                return candidate
            if found.interrupted():  # a first build, interrupted: not "no index"
                found.read_manifest()  # says so, and that running `index` again finishes it
                return candidate  # committed in the meantime
    where = f"in {start} or its parents" if upwards else f"at {start}"
    raise UserError(
        f"no vqa-search index {where}: run `vqa-search index DATASET` first, or pass --index DIR"
    )


class Index:
    """A committed index, opened for searching.

    `Index.build(dataset)` creates or updates one; `Index.open(path)` opens it (discovering it from
    the current folder upwards when `path` is None).
    """

    def __init__(self, index_dir: IndexDir, clip: Clip | None = None):
        self.dir = index_dir
        self.manifest = index_dir.read_manifest()
        self.identity = ModelIdentity.from_json(self.manifest["model"])
        recorded = self.manifest.get("inference")
        self.plan = Plan.from_json(recorded) if recorded else None  # None: made before backends were recorded
        self.generation = index_dir.generation(self.manifest["generation"])
        self.images_root = (index_dir.path / self.manifest["dataset"]["images_dir"]).resolve()
        images = pq.read_table(self.generation / "images.parquet").to_pydict()
        captions = pq.read_table(self.generation / "captions.parquet").to_pydict()
        self.image_paths: list[str] = images["path"]
        self.image_states = [FileState(*state) for state in zip(images["path"], images["bytes"], images["mtime_ns"])]
        self.image_splits: list[str | None] = images.get("split", [None] * len(self.image_paths))
        self.image_sha256: list[str | None] = images.get("sha256", [None] * len(self.image_paths))
        self.caption_texts: list[str] = captions["text"]
        self.caption_image: np.ndarray = np.asarray(captions["image_id"], dtype=np.int64)
        self.captions_of: list[list[str]] = [[] for _ in self.image_paths]
        for text, image_id in zip(self.caption_texts, self.caption_image):
            self.captions_of[image_id].append(text)
        self._faiss: dict[str, object] = {}
        self._clip = clip
        self.report: BuildReport | None = None  # set by Index.build: what that run did
        self._nprobe_noted: set[str] = set()  # targets whose flat index was already said to ignore nprobe

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def build(cls, dataset: Path | str, **config) -> "Index":
        """Create or update the index of `dataset` and open it; keyword arguments are `BuildConfig`
        fields, and what the run did (embedded, reused, skipped) is the opened index's `report`."""
        from vqa_search.indexer.build import BuildConfig, build_index

        report = build_index(dataset, BuildConfig(**config))
        index = cls(IndexDir(report.index_dir))
        index.report = report
        return index

    @classmethod
    def open(cls, path: Path | str | None = None, model: str | None = None, pretrained: str | None = None) -> "Index":
        """Open an index; if `model`/`pretrained` are given they must be what the index was built with."""
        index = cls(IndexDir(find_index(path, upwards=path is None)))
        if model or pretrained:
            index._check_requested_model(model or index.identity.model, pretrained or index.identity.pretrained)
        return index

    def _check_requested_model(self, model: str, pretrained: str) -> None:
        requested = resolve_identity(model, pretrained, known=self.identity)
        if not requested.same_weights(self.identity):
            raise UserError(
                f"the index at {self.dir.path} was built with {self.identity.describe()}, not "
                f"{requested.describe()}: query without --model/--pretrained, or re-index with them"
            )

    # ---- data ------------------------------------------------------------------------------

    @property
    def clip(self) -> Clip:
        if self._clip is None:
            find_recorded_weights(self.identity, f"the index at {self.dir.path}",
                                  if_changed=": run `vqa-search index --reembed` to embed it again with the new file")
            from vqa_search.core.models import default_device, load_clip

            # queries are embedded as the index's captions were, where that runs here (core/inference.py)
            self._clip = load_clip(self.identity, plan=plan_for_queries(self.plan, default_device().type))
        return self._clip

    def embeddings(self, target: str = "images") -> np.ndarray:
        """The stored L2-normalised vectors (memory-mapped), row = image id or caption id."""
        name = "image_embeddings.npy" if target == "images" else "caption_embeddings.npy"
        try:
            return np.load(self.generation / name, mmap_mode="r")
        except FileNotFoundError:
            self._check_generation_kept()
            raise

    def _faiss_index(self, target: str):
        if target not in self._faiss:
            path = self.generation / f"{target}.faiss"
            if not path.is_file():
                self._check_generation_kept()
                raise UserError(f"the index at {self.dir.path} has no {target[:-1]} vectors (no captions were indexed)")
            from vqa_search.core.faiss_index import IndexSpec, read_faiss

            spec = (self.manifest.get("index") or {}).get(target)
            vectors = self.generation / ("image_embeddings.npy" if target == "images" else "caption_embeddings.npy")
            self._faiss[target] = read_faiss(path, spec=IndexSpec.from_json(spec) if spec else None, vectors=vectors)
        return self._faiss[target]

    def _check_generation_kept(self) -> None:
        """Files are read when first needed, and the generation opened is deleted two commits later."""
        if not self.generation.is_dir():
            live = self.dir.read_manifest()["generation"]
            raise UserError(f"the index at {self.dir.path} changed since it was opened (generation "
                            f"{self.manifest['generation']} is gone, {live} is live): open it again")

    # ---- queries ---------------------------------------------------------------------------

    def search(
        self,
        text: str | None = None,
        image: Path | str | None = None,
        k: int = 10,
        target: str = "images",
        nprobe: int | None = None,
    ) -> SearchResult:
        query_vector, query = self._query_vector(text, image)
        return self.search_vector(query_vector, query, k, target, nprobe)

    def search_vector(self, query_vector: np.ndarray, query: str, k: int = 10, target: str = "images",
                      nprobe: int | None = None) -> SearchResult:
        """Search with an embedding already computed (1, D), e.g. by the re-ranker, which needs the tokens too."""
        if k < 1:
            raise UserError(f"k must be at least 1 (got {k})")
        if target not in TARGETS:
            raise UserError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
        if nprobe is not None and nprobe < 1:
            raise UserError(f"--nprobe must be at least 1 (got {nprobe})")
        if nprobe is not None:
            self._note_ignored_nprobe(target, nprobe)
        from vqa_search.core.faiss_index import search

        scores, ids = search(self._faiss_index(target), query_vector, k, nprobe)
        hits = [self._hit(rank, float(score), int(item), target)
                for rank, (score, item) in enumerate(zip(scores[0], ids[0]), start=1) if item >= 0]
        return SearchResult(query=query, target=target, results=hits)

    def _note_ignored_nprobe(self, target: str, nprobe: int) -> None:
        """An exact index visits every vector: nprobe has nothing to choose, which the user should hear once."""
        spec = (self.manifest.get("index") or {}).get(target) or {}
        if spec.get("type") == "flat" and target not in self._nprobe_noted:
            self._nprobe_noted.add(target)
            log.warning("--nprobe %d is ignored: the %s index at %s is exact (flat), so every vector is compared; "
                        "nprobe applies to IVF indexes (index with --index-type ivf)", nprobe, target[:-1],
                        self.dir.path)

    def _query_vector(self, text: str | None, image: Path | str | None) -> tuple[np.ndarray, str]:
        if (text is None) == (image is None):
            raise UserError("give either a query text or --image PATH (not both)")
        if text is not None:
            if not text.strip():
                raise UserError("the query text is empty")
            from vqa_search.core.encode import encode_texts

            return encode_texts(self.clip, [text.strip()]), text.strip()
        from vqa_search.core.encode import encode_images
        from vqa_search.core.images import load_named_image

        return encode_images(self.clip, [load_named_image(image, "query image")]), str(Path(image))

    def _hit(self, rank: int, score: float, item: int, target: str) -> Hit:
        if target == "captions":
            image_id = int(self.caption_image[item])
            return Hit(rank, score, self.image_paths[image_id], image_id, self.caption_texts[item],
                       self.captions_of[image_id], caption_id=item)
        captions = self.captions_of[item]
        return Hit(rank, score, self.image_paths[item], item, captions[0] if captions else None, captions)

    def image_file(self, image_id: int) -> Path:
        return self.images_root / self.image_paths[image_id]
