"""FAISS indexes over L2-normalised vectors: inner product is cosine similarity.

Exact search below FLAT_MAX_VECTORS, IVF above it, and above ONDISK_MIN_VECTORS (or when a memory
budget asks for it, `choose_for_budget`) IVF-PQ with its inverted lists in a file beside the index
(`build_ondisk`): trained on a sample, filled block by block from memory-mapped vectors, merged with
faiss.contrib.ondisk into one `.ivfdata` and searched memory-mapped, candidates re-scored exactly
with the stored vectors (`RefinedIndex`). Neither building nor serving it needs the vectors in RAM.
The threshold is measured, not guessed:
`python benchmarks/index_types.py` times exact and IVF search at growing sizes on this kind of
machine (see the README's table). On 2 cores exact search over 512-d vectors takes about 5 ms at
50,000 vectors, 15 ms at 100,000 and 32 ms at 200,000, against a 25 ms budget for a whole text
query, of which encoding the text already takes about 19 ms. Above 50,000 IVF answers in 1-2 ms,
and its one-off training (8 s at 50,000, 61 s at 200,000) is small next to embedding that many items.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import faiss
import numpy as np

from vqa_search.core.errors import UserError
from vqa_search.core.memory import format_memory

INDEX_TYPES = ("auto", "flat", "ivf", "ivfpq", "ivfpq-ondisk")
FLAT_MAX_VECTORS = 50_000
# FAISS wants at least 39 training points per centroid; fewer gives poor clusters and a warning.
MIN_POINTS_PER_CENTROID = 39
TRAINING_POINTS_PER_CENTROID = 256
PQ_BITS = 8
TRAINING_SEED = 1234


ONDISK_MIN_VECTORS = 2_000_000  # auto: above this the vectors (4 GB at 512-d) are not meant to fit in RAM
ONDISK_EXTRA = ("pq_bytes", "refine", "budget_bytes", "recall_at_10", "recall_queries")


@dataclass(frozen=True)
class IndexSpec:
    """What the manifest records about one FAISS index (the on-disk IVF-PQ's extra fields only when set)."""

    type: str  # flat | ivf | ivfpq | ivfpq-ondisk
    nlist: int | None = None
    nprobe: int | None = None
    pq_bytes: int | None = None  # ivfpq-ondisk: bytes per PQ code
    refine: int | None = None  # ivfpq-ondisk: k·refine PQ candidates re-scored exactly per query
    budget_bytes: int | None = None  # --max-index-memory the parameters were chosen for
    recall_at_10: float | None = None  # measured after the build (`measure_recall`)
    recall_queries: int | None = None  # how many held-out indexed vectors that recall was measured on

    def to_json(self) -> dict:
        data = {"type": self.type, "nlist": self.nlist, "nprobe": self.nprobe}
        data.update({name: getattr(self, name) for name in ONDISK_EXTRA if getattr(self, name) is not None})
        return data

    @classmethod
    def from_json(cls, data: dict) -> "IndexSpec":
        return cls(type=data["type"], nlist=data.get("nlist"), nprobe=data.get("nprobe"),
                   **{name: data.get(name) for name in ONDISK_EXTRA})


def choose_spec(n_vectors: int, requested: str = "auto", dim: int = 512) -> IndexSpec:
    if requested not in INDEX_TYPES:
        raise UserError(f"unknown index type {requested!r}; choose one of {', '.join(INDEX_TYPES)}")
    kind = requested
    if kind == "auto":
        kind = ("flat" if n_vectors <= FLAT_MAX_VECTORS else "ivf" if n_vectors <= ONDISK_MIN_VECTORS
                else "ivfpq-ondisk")
    if kind == "flat":
        return IndexSpec("flat")
    if kind == "ivfpq-ondisk":
        nlist = ondisk_nlist(n_vectors)
        return IndexSpec(kind, nlist=nlist, nprobe=_default_nprobe(nlist), pq_bytes=_pq_subquantizers(dim),
                         refine=REFINE_FACTOR)
    # About 4·sqrt(n) lists, the usual FAISS rule, capped so every list gets enough training points.
    nlist = max(1, min(int(4 * math.sqrt(n_vectors)), n_vectors // MIN_POINTS_PER_CENTROID))
    return IndexSpec(kind, nlist=nlist, nprobe=_default_nprobe(nlist))


def _default_nprobe(nlist: int) -> int:
    """Probing ~1/16 of the lists keeps recall@10 near exact search at these list counts (see benchmarks);
    a built on-disk index replaces it with the smallest nprobe that measures RECALL_TARGET (`tune_nprobe`)."""
    return max(1, min(nlist, math.ceil(nlist / 16)))


def build_faiss(vectors: np.ndarray, spec: IndexSpec) -> faiss.Index:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if spec.type == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        quantizer = faiss.IndexFlatIP(dim)
        if spec.type == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, spec.nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, dim, spec.nlist, _pq_subquantizers(dim), _pq_bits(n),
                                     faiss.METRIC_INNER_PRODUCT)
        index.train(_training_sample(vectors, spec.nlist))
        index.nprobe = spec.nprobe
    index.add(vectors)
    return index


# ---- IVF-PQ with on-disk inverted lists, chosen for a memory budget ------------------------------------

REFINE_FACTOR = 30  # k·30 PQ candidates re-scored exactly: at 1M, nprobe 32, recall@10 0.858 with k·10, 0.946 with k·30
RECALL_TARGET = 0.95  # tune_nprobe: the smallest nprobe whose measured recall@10 reaches this
RECALL_QUERIES = 200  # held-out indexed vectors the recall is measured on
BLOCK_ROWS = 1_000_000  # vectors added per block: 2 GB of float32 at 512-d, read from the memory map
ID_BYTES = 8  # FAISS stores an int64 id beside every code in the inverted lists
PQ_BYTE_CHOICES = (64, 48, 32, 24, 16, 12, 8, 4)  # largest first, kept when dim % m == 0 and m <= dim / 8:
# beyond 8 dimensions per byte a query's table lookups cost more than the refine step gains
ONDISK_TRAINING_POINTS_PER_CENTROID = 64  # k-means of the coarse quantizer: FAISS warns below 39
HNSW_QUANTIZER_MIN_NLIST = 4096  # from here the coarse quantizer is an HNSW graph (as autofaiss does)


def ondisk_nlist(n_vectors: int) -> int:
    """The power of two nearest sqrt(n), at least 39 training points each: 1,024 lists at 1M, 4,096 at 10M,
    8,192 at 100M. The low end of FAISS's guideline (4 to 16·sqrt(n), which autofaiss follows): k-means
    costs nlist² · 64 · d, hours at 65,536 lists on 2 cores; the refine step recovers the recall."""
    nlist = 2 ** round(math.log2(max(1.0, math.sqrt(n_vectors))))
    while nlist > 1 and nlist * MIN_POINTS_PER_CENTROID > n_vectors:
        nlist //= 2
    return nlist


def ondisk_memory(n_vectors: int, dim: int, nlist: int, pq_bytes: int) -> dict[str, int]:
    """Bytes an on-disk IVF-PQ needs, as autofaiss counts them: `index` is what serving keeps hot (codes,
    ids, centroids: the page cache holds the .ivfdata, RAM the rest); `training` is the k-means sample
    and the centroids. Blocks are sized to the rest of the budget (`block_rows`)."""
    centroids = nlist * dim * 4
    index = n_vectors * (pq_bytes + ID_BYTES) + centroids
    training = min(n_vectors, nlist * ONDISK_TRAINING_POINTS_PER_CENTROID) * dim * 4 + centroids
    return {"index": index, "training": training}


def block_rows(dim: int, budget: int | None = None) -> int:
    """Vectors added per block: BLOCK_ROWS, or what a quarter of the budget holds (at least 10,000)."""
    return BLOCK_ROWS if budget is None else max(10_000, min(BLOCK_ROWS, budget // 4 // (dim * 4)))


def choose_for_budget(n_vectors: int, dim: int, budget: int, requested: str = "auto") -> IndexSpec:
    """Index parameters for a memory budget, after autofaiss's get_optimal_index_keys_v2: exact search if
    its vectors fit and it is fast enough, IVF-flat if they fit, else IVF-PQ with its lists on disk and
    the largest PQ code whose codes + ids + centroids fit (bigger codes, better recall). nprobe starts at
    nlist/16 and is measured down to RECALL_TARGET once the index is built (`tune_nprobe`)."""
    if requested not in ("auto", "ivfpq-ondisk"):
        raise UserError(f"--max-index-memory chooses the index type: leave --index-type auto or give ivfpq-ondisk "
                        f"(got {requested!r})")
    flat = n_vectors * dim * 4
    if requested == "auto" and n_vectors <= FLAT_MAX_VECTORS and flat <= budget:
        return replace(choose_spec(n_vectors, "flat"), budget_bytes=budget)
    if requested == "auto" and n_vectors <= ONDISK_MIN_VECTORS:
        ivf = choose_spec(n_vectors, "ivf")
        if flat + n_vectors * ID_BYTES + ivf.nlist * dim * 4 <= budget:
            return replace(ivf, budget_bytes=budget)
    nlist = ondisk_nlist(n_vectors)
    for pq_bytes in (m for m in PQ_BYTE_CHOICES if dim % m == 0 and m <= max(1, dim // 8)):
        memory = ondisk_memory(n_vectors, dim, nlist, pq_bytes)
        if memory["index"] <= budget and memory["training"] <= budget // 2:
            return IndexSpec("ivfpq-ondisk", nlist=nlist, nprobe=_default_nprobe(nlist), pq_bytes=pq_bytes,
                             refine=REFINE_FACTOR, budget_bytes=budget)
    smallest = min((m for m in PQ_BYTE_CHOICES if dim % m == 0), default=dim)
    memory = ondisk_memory(n_vectors, dim, nlist, smallest)
    need = max(memory["index"], 2 * memory["training"])
    raise UserError(f"--max-index-memory {format_memory(budget)} is too small for {n_vectors:,} vectors of {dim} "
                    f"dimensions: the smallest index needs {format_memory(need)}")


def ondisk_factory_key(spec: IndexSpec, n_training: int) -> str:
    quantizer = "_HNSW32" if spec.nlist >= HNSW_QUANTIZER_MIN_NLIST else ""
    # np: no polysemous training (minutes, and unused); fewer bits when the sample cannot fill 256 centroids
    return f"IVF{spec.nlist}{quantizer},PQ{spec.pq_bytes}x{_pq_bits(n_training)}np"


def train_ondisk(sample: np.ndarray, spec: IndexSpec) -> faiss.Index:
    """An empty IVF-PQ, its coarse quantizer and PQ codebooks trained on `sample`."""
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    index = faiss.index_factory(sample.shape[1], ondisk_factory_key(spec, len(sample)), faiss.METRIC_INNER_PRODUCT)
    faiss.extract_index_ivf(index).cp.seed = TRAINING_SEED
    index.train(sample)
    return index


def build_ondisk(blocks: Sequence[Callable[[], np.ndarray]], spec: IndexSpec, directory: Path, name: str,
                 sample: np.ndarray | None = None, trained: faiss.Index | None = None) -> Path:
    """`directory/name.faiss` + `directory/name.ivfdata`: the trained index filled block by block.

    Each block is a function returning its vectors (read from a memory map when called), so one block is
    in RAM at a time; ids run on from block to block. Every block is added to a copy of the empty
    trained index and written as a file, then faiss.contrib.ondisk.merge_ondisk concatenates their
    inverted lists into the .ivfdata (memory-mapped, never held). The .faiss names the .ivfdata; read
    it with `read_faiss`, which finds it beside the .faiss wherever the directory has moved.
    """
    from faiss.contrib.ondisk import merge_ondisk

    if trained is None:
        trained = train_ondisk(sample, spec)
    empty = faiss.serialize_index(trained)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-blocks-", dir=directory))
    try:
        block_files, start = [], 0
        for number, block in enumerate(blocks):
            vectors = np.ascontiguousarray(block(), dtype=np.float32)
            part = faiss.deserialize_index(empty)
            part.add_with_ids(vectors, np.arange(start, start + len(vectors), dtype=np.int64))
            start += len(vectors)
            del vectors
            block_files.append(str(work / f"block-{number:05d}.faiss"))
            faiss.write_index(part, block_files[-1])
            del part
        merged = faiss.deserialize_index(empty)
        with _faiss_prints_hidden():
            merge_ondisk(merged, block_files, str(directory / f"{name}.ivfdata"))
        faiss.extract_index_ivf(merged).nprobe = spec.nprobe
        path = directory / f"{name}.faiss"
        faiss.write_index(merged, str(path))
        del merged
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


def memory_mapped_blocks(path: Path, rows: int = BLOCK_ROWS) -> list[Callable[[], np.ndarray]]:
    """Blocks of an .npy file, each a slice of its own memory map: nothing is copied, and the pages a
    block touched leave this process's resident memory when the block is dropped."""
    total = len(np.load(path, mmap_mode="r"))
    return [lambda start=start: np.load(path, mmap_mode="r")[start : start + rows] for start in range(0, total, rows)]


def read_rows(path: Path, rows: np.ndarray, block: int = BLOCK_ROWS) -> np.ndarray:
    """Some rows of an .npy file (sorted `rows`), copied out one memory-mapped block at a time, so a
    training sample spread over a 20 GB file never maps more than one block at once."""
    rows = np.asarray(rows, dtype=np.int64)
    parts, start = [], 0
    for read in memory_mapped_blocks(path, block):
        mapped = read()
        inside = rows[(rows >= start) & (rows < start + len(mapped))]
        parts.append(np.array(mapped[inside - start], dtype=np.float32))
        start += len(mapped)
        del mapped
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


class RefinedIndex:
    """An IVF-PQ whose k·refine nearest codes are re-scored exactly with the stored vectors (a memory-mapped
    .npy, row = id): PQ finds the neighbourhood, the exact inner products order it. Only the candidates'
    rows are read, so the vectors stay on disk."""

    def __init__(self, index: faiss.Index, vectors: np.ndarray, refine: int):
        self.index = index
        self.vectors = vectors
        self.refine = refine

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    @property
    def nprobe(self) -> int:
        return faiss.extract_index_ivf(self.index).nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        set_nprobe(self.index, value)

    def search(self, queries: np.ndarray, k: int, params: faiss.SearchParameters | None = None):
        _, candidates = self.index.search(queries, k * self.refine, params=params)
        scores = np.full((len(queries), k), -np.inf, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        for row, (query, found) in enumerate(zip(queries, candidates)):
            found = np.unique(found[found >= 0])  # sorted: the memory map is read in file order
            exact = self.vectors[found] @ query
            best = np.argsort(-exact, kind="stable")[:k]
            scores[row, : len(best)], ids[row, : len(best)] = exact[best], found[best]
        return scores, ids


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """nprobe of an IVF index; an HNSW coarse quantizer is told to look at least that far too."""
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = nprobe
    quantizer = faiss.downcast_index(ivf.quantizer)
    if hasattr(quantizer, "hnsw"):
        quantizer.hnsw.efSearch = max(64, 2 * nprobe)


def exact_neighbours(queries: np.ndarray, blocks: Sequence[Callable[[], np.ndarray]], k: int):
    """Exact top-k inner products of `queries` over blocks of vectors (ids run on), one block in RAM at a time."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_scores = np.full((len(queries), k), -np.inf, np.float32)
    best_ids = np.full((len(queries), k), -1, np.int64)
    start = 0
    for block in blocks:
        vectors = np.ascontiguousarray(block(), dtype=np.float32)
        scores, ids = faiss.knn(queries, vectors, min(k, len(vectors)), metric=faiss.METRIC_INNER_PRODUCT)
        merged_scores = np.concatenate([best_scores, scores], axis=1)
        merged_ids = np.concatenate([best_ids, ids + start], axis=1)
        order = np.argsort(-merged_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(merged_scores, order, axis=1)
        best_ids = np.take_along_axis(merged_ids, order, axis=1)
        start += len(vectors)
    return best_scores, best_ids


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Mean share of each query's exact top k that the index returned in its top k."""
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)]))


def held_out_rows(n_vectors: int, count: int = RECALL_QUERIES) -> np.ndarray:
    """The indexed vectors the recall is measured on (sorted, seeded); `training_rows` leaves them out."""
    count = min(count, max(1, n_vectors // 5))  # a small index keeps most of its vectors for training
    return np.sort(np.random.default_rng(TRAINING_SEED + 1).choice(n_vectors, size=count, replace=False))


def training_rows(n_vectors: int, count: int, held_out: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(TRAINING_SEED)
    rows = np.setdiff1d(rng.choice(n_vectors, size=min(n_vectors, count + len(held_out)), replace=False), held_out)
    return np.sort(rows[:count])


def build_ondisk_measured(vectors: np.ndarray | Path, spec: IndexSpec, directory: Path,
                          name: str) -> tuple[IndexSpec, dict[str, float]]:
    """Train, fill and merge an on-disk IVF-PQ (`build_ondisk`), then measure its nprobe (`tune_nprobe`).

    `vectors` is an array or an .npy file, read memory-mapped a block at a time. Returns the spec as built
    (nprobe and the measured recall@10 filled in) and the seconds of each stage.
    """
    import time

    started = time.perf_counter()
    n = len(vectors) if isinstance(vectors, np.ndarray) else len(np.load(vectors, mmap_mode="r"))
    rows = block_rows(vectors.shape[1] if isinstance(vectors, np.ndarray) else np.load(vectors, mmap_mode="r").shape[1],
                      spec.budget_bytes)
    if isinstance(vectors, np.ndarray):
        blocks = [lambda start=start: vectors[start : start + rows] for start in range(0, n, rows)]
        take = lambda chosen: np.asarray(vectors[chosen], dtype=np.float32)  # noqa: E731
    else:
        blocks = memory_mapped_blocks(vectors, rows)
        take = lambda chosen: read_rows(vectors, chosen, rows)  # noqa: E731
    held = held_out_rows(n)
    trained = train_ondisk(take(training_rows(n, spec.nlist * ONDISK_TRAINING_POINTS_PER_CENTROID, held)), spec)
    seconds = {"train": time.perf_counter() - started}
    path = build_ondisk(blocks, spec, directory, name, trained=trained)
    seconds["add_and_merge"] = time.perf_counter() - started - seconds["train"]
    with _faiss_prints_hidden():
        ondisk = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
    index = RefinedIndex(ondisk,
                         vectors if isinstance(vectors, np.ndarray) else np.load(vectors, mmap_mode="r"),
                         spec.refine or 1)
    queries = take(held)
    _, truth = exact_neighbours(queries, blocks, 11)
    nprobe, recall = tune_nprobe(index, queries, held, truth)
    seconds["tune_nprobe"] = time.perf_counter() - started - seconds["train"] - seconds["add_and_merge"]
    return replace(spec, nprobe=nprobe, recall_at_10=round(recall, 4), recall_queries=len(held)), seconds


def tune_nprobe(index, queries: np.ndarray, query_ids: np.ndarray, truth_ids: np.ndarray,
                k: int = 10, target: float = RECALL_TARGET) -> tuple[int, float]:
    """The smallest power-of-two nprobe whose recall@k on held-out indexed vectors reaches `target` (else
    the best up to nlist/4), and that recall. Each query is an indexed vector: itself is left out of both
    its exact and its found neighbours, so finding itself earns nothing."""
    nlist = faiss.extract_index_ivf(index.index if isinstance(index, RefinedIndex) else index).nlist
    best = (1, -1.0)
    nprobe = 1
    while True:
        index.nprobe = nprobe
        _, found = index.search(np.ascontiguousarray(queries, dtype=np.float32), k + 1)
        recall = recall_at_k(_without(found, query_ids, k), _without(truth_ids, query_ids, k), k)
        if recall > best[1]:
            best = (nprobe, recall)
        if recall >= target or nprobe >= max(1, nlist // 4):
            break
        nprobe *= 2
    index.nprobe = best[0]
    return best


def _without(ids: np.ndarray, own: np.ndarray, k: int) -> list[list[int]]:
    return [[i for i in row if i != me][:k] for row, me in zip(ids.tolist(), own.tolist())]


def search(index: faiss.Index, queries: np.ndarray, k: int, nprobe: int | None = None):
    """(scores, ids) of shape (len(queries), min(k, ntotal)); nprobe overrides the stored one for IVF.

    The override is this search's parameter, not the index's: a server shares one index between
    requests, and a request's nprobe must neither stay for the next nor change one running beside it.
    """
    k = min(k, index.ntotal)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if nprobe is not None and hasattr(index, "nprobe"):
        return index.search(queries, k, params=_nprobe_parameters(index, nprobe))
    return index.search(queries, k)


def _nprobe_parameters(index, nprobe: int) -> faiss.SearchParametersIVF:
    """What `set_nprobe` sets, as one search's parameters."""
    params = faiss.SearchParametersIVF(nprobe=nprobe)
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(getattr(index, "index", index)).quantizer)
    if hasattr(quantizer, "hnsw"):
        params.quantizer_params = faiss.SearchParametersHNSW(efSearch=max(64, 2 * nprobe))
        params.referenced_objects = [params.quantizer_params]  # the C++ side holds a bare pointer
    return params


def read_faiss(path: Path, use_gpu: bool = True, spec: IndexSpec | None = None,
               vectors: Path | None = None) -> faiss.Index:
    """An index file; an on-disk IVF-PQ is memory-mapped (its .ivfdata found beside `path`, the file
    stays valid for this process even once its generation is deleted) and re-scored with `vectors`."""
    if spec is not None and spec.type == "ivfpq-ondisk":
        return open_ondisk(path, vectors, spec)
    index = faiss.read_index(str(path))
    if use_gpu and _gpu_count() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    return index


def open_ondisk(path: Path, vectors: Path, spec: IndexSpec) -> RefinedIndex:
    with _faiss_prints_hidden():
        index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
    set_nprobe(index, spec.nprobe)
    return RefinedIndex(index, np.load(vectors, mmap_mode="r"), spec.refine or 1)


@contextmanager
def _faiss_prints_hidden():
    """FAISS's on-disk lists printf to stdout ("resizing ...", "updating ondisk filename ..."), which would
    land in the middle of `--json` output: file descriptor 1 points at /dev/null meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _training_sample(vectors: np.ndarray, nlist: int) -> np.ndarray:
    limit = nlist * TRAINING_POINTS_PER_CENTROID
    if len(vectors) <= limit:
        return vectors
    rows = np.random.default_rng(TRAINING_SEED).choice(len(vectors), size=limit, replace=False)
    return vectors[np.sort(rows)]


def _pq_subquantizers(dim: int) -> int:
    """8 dimensions per sub-quantizer (64 bytes a vector at d=512), a common accuracy/size balance."""
    for m in (dim // 8, dim // 4, dim // 2, dim):
        if m >= 1 and dim % m == 0:
            return m
    return dim


def _pq_bits(n_vectors: int) -> int:
    """PQ codebooks need about 39·2^bits training points; small collections get smaller codebooks."""
    return int(max(1, min(PQ_BITS, math.floor(math.log2(max(2, n_vectors // MIN_POINTS_PER_CENTROID))))))
