"""FAISS indexes over L2-normalised vectors: inner product is cosine similarity.

Exact search below FLAT_MAX_VECTORS, IVF above it. The threshold is measured, not guessed:
`python benchmarks/index_types.py` times exact and IVF search at growing sizes on this kind of
machine (see the README's table). On 2 cores exact search over 512-d vectors takes about 5 ms at
50,000 vectors, 15 ms at 100,000 and 32 ms at 200,000, against a 25 ms budget for a whole text
query, of which encoding the text already takes about 19 ms. Above 50,000 IVF answers in 1-2 ms,
and its one-off training (8 s at 50,000, 61 s at 200,000) is small next to embedding that many items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from vqa_search.core.errors import UserError

INDEX_TYPES = ("auto", "flat", "ivf", "ivfpq")
FLAT_MAX_VECTORS = 50_000
# FAISS wants at least 39 training points per centroid; fewer gives poor clusters and a warning.
MIN_POINTS_PER_CENTROID = 39
TRAINING_POINTS_PER_CENTROID = 256
PQ_BITS = 8
TRAINING_SEED = 1234


@dataclass(frozen=True)
class IndexSpec:
    """What the manifest records about one FAISS index."""

    type: str  # flat | ivf | ivfpq
    nlist: int | None = None
    nprobe: int | None = None

    def to_json(self) -> dict:
        return {"type": self.type, "nlist": self.nlist, "nprobe": self.nprobe}

    @classmethod
    def from_json(cls, data: dict) -> "IndexSpec":
        return cls(type=data["type"], nlist=data.get("nlist"), nprobe=data.get("nprobe"))


def choose_spec(n_vectors: int, requested: str = "auto") -> IndexSpec:
    if requested not in INDEX_TYPES:
        raise UserError(f"unknown index type {requested!r}; choose one of {', '.join(INDEX_TYPES)}")
    kind = requested
    if kind == "auto":
        kind = "flat" if n_vectors <= FLAT_MAX_VECTORS else "ivf"
    if kind == "flat":
        return IndexSpec("flat")
    # About 4·sqrt(n) lists, the usual FAISS rule, capped so every list gets enough training points.
    nlist = max(1, min(int(4 * math.sqrt(n_vectors)), n_vectors // MIN_POINTS_PER_CENTROID))
    # Probing ~1/16 of the lists keeps recall@10 near exact search at these list counts (see benchmarks).
    nprobe = max(1, min(nlist, math.ceil(nlist / 16)))
    return IndexSpec(kind, nlist=nlist, nprobe=nprobe)


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


def search(index: faiss.Index, queries: np.ndarray, k: int, nprobe: int | None = None):
    """(scores, ids) of shape (len(queries), min(k, ntotal)); nprobe overrides the stored one for IVF.

    The override is this search's parameter, not the index's: a server shares one index between
    requests, and a request's nprobe must neither stay for the next nor change one running beside it.
    """
    k = min(k, index.ntotal)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if nprobe is not None and hasattr(index, "nprobe"):
        return index.search(queries, k, params=faiss.SearchParametersIVF(nprobe=nprobe))
    return index.search(queries, k)


def read_faiss(path: Path, use_gpu: bool = True) -> faiss.Index:
    index = faiss.read_index(str(path))
    if use_gpu and _gpu_count() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    return index


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
