"""Indexing and query speed against the bare model, measured in one run on the same inputs.

    python benchmarks/indexing.py --json benchmarks/results/indexing.json

Speed does not depend on the weights, so ViT-B-32 is randomly initialised. Images are the 300 real
Flickr8k photos of ../shared/flickr8k-sample, or of the folder $VQA_SEARCH_FLICKR8K_SAMPLE names
(JPEG decoding included). Machines are shared and noisy: every figure is the median of several
alternating repetitions, and targets are ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from vqa_search.core.encode import encode_texts
from vqa_search.indexer.build import BuildConfig, build_index
from vqa_search.indexer.datasets import read_dataset
from vqa_search.core.store import CAPTIONS_SCHEMA, IMAGES_SCHEMA, FORMAT_VERSION, IndexDir
from vqa_search.core.models import load_clip
from vqa_search.core.identity import resolve_identity
from vqa_search.core.faiss_index import IndexSpec, build_faiss
from vqa_search.retrieval.searcher import Index

SAMPLE = Path(os.environ.get("VQA_SEARCH_FLICKR8K_SAMPLE") or
              Path(__file__).resolve().parents[1].parent / "shared" / "flickr8k-sample").expanduser()
MODEL = "ViT-B-32"
BATCH = 64
QUERY_GALLERY = 8000


def median_of(repeats: int, measure) -> float:
    return statistics.median(measure() for _ in range(repeats))


def bare_image_rate(clip, pixels: torch.Tensor) -> float:
    """images/s of model.encode_image alone on tensors preprocessed beforehand."""
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(pixels), BATCH):
            clip.model.encode_image(pixels[start : start + BATCH])
    return len(pixels) / (time.perf_counter() - started)


def pipeline_image_rate(images_dir: Path, workdir: Path, run: int) -> float:
    """images/s of `index` from files on disk: decoding workers + model + shards (model load excluded)."""
    config = BuildConfig(model=MODEL, pretrained="none", out=workdir / f"run-{run}", batch_size=BATCH, progress=False)
    report = build_index(images_dir, config)
    return report.images / report.embedding_seconds["images"]


def padded_caption_rate(clip, texts: list[str], batch_size: int = 256) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            clip.model.encode_text(clip.tokenizer(texts[start : start + batch_size]))
    return len(texts) / (time.perf_counter() - started)


def trimmed_caption_rate(clip, texts: list[str]) -> float:
    started = time.perf_counter()
    encode_texts(clip, texts)
    return len(texts) / (time.perf_counter() - started)


def query_latencies(clip, workdir: Path, queries: list[str]) -> list[float]:
    """Warm text queries (encode + FAISS search) through Index.search over QUERY_GALLERY image vectors."""
    index_dir = IndexDir(workdir / "query-index")
    dim = clip.model.text_projection.shape[1]
    vectors = np.random.default_rng(0).standard_normal((QUERY_GALLERY, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    images = pa.table({"id": np.arange(QUERY_GALLERY), "path": [f"{i}.jpg" for i in range(QUERY_GALLERY)],
                       "bytes": [0] * QUERY_GALLERY, "mtime_ns": [0] * QUERY_GALLERY, "sha256": [""] * QUERY_GALLERY,
                       "width": [1] * QUERY_GALLERY, "height": [1] * QUERY_GALLERY}, schema=IMAGES_SCHEMA)
    files = {"images.parquet": images, "captions.parquet": CAPTIONS_SCHEMA.empty_table(),
             "image_embeddings.npy": vectors, "caption_embeddings.npy": np.zeros((0, dim), np.float32),
             "images.faiss": build_faiss(vectors, IndexSpec("flat"))}
    index_dir.commit(files, {"format_version": FORMAT_VERSION, "model": clip.identity.to_json(), "dim": dim,
                             "dataset": {"images_dir": "."}})
    index = Index(index_dir, clip=clip)
    for query in queries[:5]:
        index.search(text=query, k=10)
    latencies = []
    for query in queries:
        started = time.perf_counter()
        index.search(text=query, k=10)
        latencies.append(time.perf_counter() - started)
    return latencies


def unchanged_reindex(workdir: Path) -> dict:
    """Second `index` run over the unchanged sample: in-process time, and CLI wall time minus start-up."""
    config = BuildConfig(model=MODEL, pretrained="none", out=workdir / "reindex", batch_size=BATCH, progress=False)
    build_index(SAMPLE, config)
    in_process = build_index(SAMPLE, config)
    assert in_process.up_to_date
    command = [sys.executable, "-m", "vqa_search.cli", "index", str(SAMPLE), "--model", MODEL,
               "--pretrained", "none", "--out", str(workdir / "reindex"), "--quiet"]
    startup = [sys.executable, "-c", "import vqa_search.cli"]
    return {"in_process_seconds": in_process.seconds,
            "cli_seconds": median_of(3, lambda: _wall(command)),
            "startup_seconds": median_of(3, lambda: _wall(startup))}


def _wall(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def _paired_ratio(ours: list[float], reference: list[float]) -> float:
    """Median of per-repetition ratios: a slow spell on the shared machine hits both sides of a pair."""
    return statistics.median(a / b for a, b in zip(ours, reference))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--captions", type=int, default=2000, help="Flickr8k captions to encode")
    args = parser.parse_args()
    if not SAMPLE.is_dir():
        sys.exit(f"needs the Flickr8k sample at {SAMPLE} (or set VQA_SEARCH_FLICKR8K_SAMPLE to its folder)")

    data = read_dataset(SAMPLE)
    clip = load_clip(resolve_identity(MODEL, "none"), torch.device("cpu"))
    pixels = torch.stack([clip.preprocess(Image.open(data.images_dir / p).convert("RGB")) for p in data.images])
    all_captions = [c.text for c in read_dataset(SAMPLE).captions]
    texts = (all_captions * (args.captions // len(all_captions) + 1))[: args.captions]

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        bare, pipeline = [], []
        for run in range(args.repeats):  # alternate, so drifts in machine load hit both alike
            bare.append(bare_image_rate(clip, pixels))
            pipeline.append(pipeline_image_rate(data.images_dir, workdir, run))
        padded, trimmed = [], []
        for _ in range(args.repeats):
            padded.append(padded_caption_rate(clip, texts))
            trimmed.append(trimmed_caption_rate(clip, texts))
        latencies = np.array(query_latencies(clip, workdir, all_captions[:100])) * 1000
        reindex = unchanged_reindex(workdir)

    results = {
        "model": MODEL, "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
        "images": {"n": len(pixels), "bare_per_s": statistics.median(bare),
                   "pipeline_per_s": statistics.median(pipeline),
                   "ratio": _paired_ratio(pipeline, bare), "target_ratio": 0.85},
        "captions": {"n": len(texts), "padded77_per_s": statistics.median(padded),
                     "trimmed_per_s": statistics.median(trimmed),
                     "speedup": _paired_ratio(trimmed, padded), "target_speedup": 3.0},
        "query": {"gallery": QUERY_GALLERY, "n": len(latencies), "p50_ms": float(np.percentile(latencies, 50)),
                  "p95_ms": float(np.percentile(latencies, 95)), "target_p50_ms": 25.0},
        "unchanged_reindex": {**reindex, "beyond_startup_seconds": reindex["cli_seconds"] - reindex["startup_seconds"],
                              "target_seconds": 3.0},
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
