"""What stage 2 costs at Flickr8k scale on this machine, with ViT-B-32 (random weights cost what trained ones do).

    python benchmarks/rerank_speed.py --json benchmarks/results/rerank_speed.json

Query: a warm text query as `query` runs it (text tower, exact search over 8,000 images, top 10),
against the same query re-ranked as `query --rerank` runs it (one text forward for the tokens and
the global vector, exact search for the top 50, their 36 detector regions of 1,031 values read from a
float16 memory map, s = s_global + λ·s_fine, sort). Medians over the queries; the difference is the
re-ranking overhead (target: at most 40 ms).

Training: seconds per stage-2 step at Flickr8k's shape (64 captions, each against its image, 32 hard
negatives and the batch's 64 images, 36 regions each), times the steps of one epoch of 30,000
captions (target: 10 epochs in at most 20 minutes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vqa_search.align.reranker import CrossAttentionReranker, RerankerConfig
from vqa_search.align.train_rerank import RerankTrainConfig, RerankTrainer, TrainingSplit
from vqa_search.core.encode import encode_texts
from vqa_search.core.models import load_clip
from vqa_search.core.identity import resolve_identity
from vqa_search.core.faiss_index import build_faiss, choose_spec, search
from vqa_search.retrieval.recall import Gallery
from vqa_search.align.rerank import FineInputs, caption_tokens, padded

IMAGES, REGIONS, REGION_DIM, TOP = 8000, 36, 1024 + 7, 50
TRAIN_IMAGES, CAPTIONS_PER_IMAGE = 6000, 5
QUERIES = ["a dog runs along the beach", "two children, one on a bike", "a man in a red jacket climbs a rock",
           "a black dog and a white dog play in the snow", "a girl in a pink dress jumps into a pool",
           "people walk down a crowded city street at night", "a brown dog carries a stick through the water",
           "a skier in a blue jacket jumps off a ramp", "a boy plays football in a green field",
           "a woman sits on a bench reading a newspaper"]


def trained_like(config: RerankerConfig) -> CrossAttentionReranker:
    model = CrossAttentionReranker(config)
    with torch.no_grad():
        model.W_o.weight.normal_(0, 0.02)  # a fresh W_o is zero; the cost is the same, the numbers are not
    return model.eval()


def query_times(memmap_dir: Path) -> dict:
    clip = load_clip(resolve_identity("ViT-B-32", "none"), torch.device("cpu"))
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((IMAGES, 512)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = build_faiss(vectors, choose_spec(IMAGES, "flat"))
    regions = np.lib.format.open_memmap(memmap_dir / "regions.npy", mode="w+", dtype=np.float16,
                                        shape=(IMAGES, REGIONS, REGION_DIM))
    for start in range(0, IMAGES, 1000):
        regions[start:start + 1000] = rng.standard_normal((1000, REGIONS, REGION_DIM)).astype(np.float16)
    regions.flush()
    regions = np.load(memmap_dir / "regions.npy", mmap_mode="r")
    reranker = trained_like(RerankerConfig(token_dim=512, region_dim=REGION_DIM))

    def plain(text: str) -> None:
        search(index, encode_texts(clip, [text]), 10)

    @torch.no_grad()
    def reranked(text: str) -> None:
        tokens = caption_tokens(clip, [text], dtype=torch.float32)
        query = F.normalize(tokens[0][-1], dim=-1)[None].numpy()
        scores, ids = search(index, query, TOP)
        rows = np.sort(ids[0])
        candidate_regions = torch.from_numpy(np.ascontiguousarray(regions[rows])).float()[None]
        batch, mask = padded(tokens)
        fine = reranker.fine_scores(batch, mask, candidate_regions)[0]
        np.argsort(-(torch.from_numpy(scores[0]) + reranker.config.lam * fine).numpy())

    for text in QUERIES[:3]:  # warm up: allocator, FAISS, page cache
        plain(text), reranked(text)
    timings = {"plain": [], "reranked": []}
    for _ in range(3):
        for text in QUERIES:
            for name, fn in (("plain", plain), ("reranked", reranked)):
                started = time.perf_counter()
                fn(text)
                timings[name].append(time.perf_counter() - started)
    plain_ms = 1000 * statistics.median(timings["plain"])
    reranked_ms = 1000 * statistics.median(timings["reranked"])
    return {"images": IMAGES, "top": TOP, "regions": REGIONS, "region_dim": REGION_DIM,
            "plain_query_ms": round(plain_ms, 1), "reranked_query_ms": round(reranked_ms, 1),
            "overhead_ms": round(reranked_ms - plain_ms, 1)}


def training_times(steps: int) -> dict:
    rng = np.random.default_rng(1)
    captions = TRAIN_IMAGES * CAPTIONS_PER_IMAGE
    image_vectors = rng.standard_normal((TRAIN_IMAGES, 512)).astype(np.float32)
    caption_vectors = rng.standard_normal((captions, 512)).astype(np.float32)
    gallery = Gallery([f"{i}.jpg" for i in range(TRAIN_IMAGES)], [f"caption {i}" for i in range(captions)],
                      np.repeat(np.arange(TRAIN_IMAGES), CAPTIONS_PER_IMAGE), image_vectors, caption_vectors,
                      0, {}, "synthetic")
    lengths = rng.integers(8, 24, captions)  # Flickr8k captions: about 14 tokens, up to about 40
    tokens = [torch.randn(int(length), 512, dtype=torch.float16) for length in lengths]
    regions = torch.randn(TRAIN_IMAGES, REGIONS, REGION_DIM, dtype=torch.float16)
    config = RerankTrainConfig(negatives=32, batch_size=64, progress=False)
    reranker = trained_like(RerankerConfig(token_dim=512, region_dim=REGION_DIM)).train()
    trainer = RerankTrainer(reranker, TrainingSplit(gallery, FineInputs(tokens, regions)), 14.3, config)
    order = torch.randperm(captions)
    seconds = []
    for step in range(steps + 1):
        started = time.perf_counter()
        trainer.step(order[step * 64:(step + 1) * 64])
        if step:  # the first step warms up the allocator
            seconds.append(time.perf_counter() - started)
    per_step = statistics.median(seconds)
    epoch = per_step * captions / config.batch_size
    return {"captions": captions, "batch_size": config.batch_size, "negatives": config.negatives,
            "seconds_per_step": round(per_step, 3), "seconds_per_epoch": round(epoch, 1),
            "minutes_for_10_epochs": round(10 * epoch / 60, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="Training steps to time.")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        results = {"threads": torch.get_num_threads(), "query": query_times(Path(scratch)),
                   "training": training_times(args.steps)}
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
