"""Exact (flat) against IVF search by collection size: where does IVF start to pay?

    python benchmarks/index_types.py --json benchmarks/results/index_types.json

Vectors are synthetic but shaped like CLIP embeddings of a photo collection: 512-d, L2-normalised,
drawn around a few hundred topic centres with as much noise as signal (two photos of one topic have
a cosine near 0.5, unrelated ones near 0), so IVF's clustering has structure to find (uniform random
vectors would be its worst case). Real embeddings differ: measure yours with
`vqa-search bench recall DATASET --index-type ivf`. Queries are held-out points of the same distribution. For each
size: single-query latency p50 of flat and IVF search (k=10, nprobe as `choose_spec` sets it),
IVF's recall@10 against exact search on the same vectors, and its build time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import faiss
import numpy as np

from vqa_search.core.faiss_index import IndexSpec, build_faiss, choose_spec, search

DIM = 512
TOPICS = 500
NOISE = 1.0  # norm of the noise added to a unit topic centre
K = 10
QUERIES = 200


def clustered_vectors(n: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    noise = rng.standard_normal((n, DIM)).astype(np.float32) * (NOISE / np.sqrt(DIM))
    vectors = centres[rng.integers(0, len(centres), n)] + noise
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def latency_ms(index: faiss.Index, queries: np.ndarray) -> float:
    times = []
    for query in queries:
        started = time.perf_counter()
        search(index, query[None], K)
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)]))


def measure(n: int, rng: np.random.Generator, centres: np.ndarray) -> dict:
    vectors = clustered_vectors(n, rng, centres).astype(np.float32)
    queries = clustered_vectors(QUERIES, rng, centres).astype(np.float32)
    flat = build_faiss(vectors, IndexSpec("flat"))
    spec = choose_spec(n, "ivf")
    started = time.perf_counter()
    ivf = build_faiss(vectors, spec)
    build_seconds = time.perf_counter() - started
    _, truth = search(flat, queries, K)
    _, found = search(ivf, queries, K)
    return {"n": n, "flat_p50_ms": latency_ms(flat, queries), "ivf_p50_ms": latency_ms(ivf, queries),
            "ivf_recall_at_10": recall_at_k(found, truth), "ivf_nlist": spec.nlist, "ivf_nprobe": spec.nprobe,
            "ivf_build_seconds": build_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="8000,50000,100000,200000,400000")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((TOPICS, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rows = []
    for n in (int(size) for size in args.sizes.split(",")):
        rows.append(measure(n, rng, centres))
        print(json.dumps(rows[-1]), flush=True)
    results = {"dim": DIM, "k": K, "threads": faiss.omp_get_max_threads(), "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
