"""The alignment method end to end on the shapes world: does stage 2 add recall on top of stage 1?

    python benchmarks/shapes_align.py --json benchmarks/results/shapes_align.json

No download: generate the shapes world, train the tiny CLIP from scratch (stage 1), index the
collection with that checkpoint, take its ViT patch tokens as regions (`clip-patches`), train the
cross-attention re-ranker with CLIP frozen (stage 2, λ chosen on val), then measure test recall of
stage 1 alone and of stage 1 + stage 2 on the same checkpoint and the same gallery, so the
difference is stage 2's alone. Every step is the library code behind the CLI commands.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from vqa_search.align.finetune import FinetuneConfig, finetune
from vqa_search.align.region_store import compute_regions
from vqa_search.align.regions import RegionConfig
from vqa_search.align.train_rerank import RerankTrainConfig, train_reranker
from vqa_search.indexer.build import BuildConfig, build_index
from vqa_search.models import TINY_MODEL
from vqa_search.retrieval.recall import RecallConfig, run_recall
from vqa_search.retrieval.rerank import reranked_run
from vqa_search.shapes import ShapesConfig, make_shapes

STAGE1 = dict(epochs=60, batch_size=128, lr=1e-3, weight_decay=0.1, patience=8)  # from scratch: a large lr
STAGE2 = dict(epochs=4, batch_size=64, negatives=2, region_hidden=256, lr=1e-3, patience=2)


def recall_of(run) -> dict:
    return {direction: {key: round(value, 2) for key, value in getattr(run, direction).items() if key.startswith("R@")}
            for direction in ("t2i", "i2t")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="Write the results here.")
    parser.add_argument("--work", type=Path, help="Keep the world and checkpoints here (default: a temp dir).")
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(format="%(message)s")
    logging.getLogger("vqa_search").setLevel(logging.INFO)  # one line per epoch, not open_clip's chatter
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        results = run(work, args.images, args.seed)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def run(work: Path, images: int, seed: int) -> dict:
    started = time.perf_counter()
    seconds = {}

    def lap(name: str, since: float) -> float:
        seconds[name] = round(time.perf_counter() - since, 1)
        return time.perf_counter()

    world, checkpoint = work / "shapes", work / "stage1.safetensors"
    step = time.perf_counter()
    make_shapes(world, ShapesConfig(images=images, seed=seed))
    step = lap("generate", step)
    stage1 = finetune(world, checkpoint, FinetuneConfig(model=TINY_MODEL, pretrained="none", seed=seed, **STAGE1),
                      progress=False)
    step = lap("stage1", step)
    build_index(world, BuildConfig(model=TINY_MODEL, pretrained=str(checkpoint), progress=False))
    compute_regions(world, RegionConfig(source="clip-patches", progress=False))
    step = lap("index_and_regions", step)
    stage2 = train_reranker(world, RerankTrainConfig(model=TINY_MODEL, checkpoint=str(checkpoint), lam=None,
                                                     seed=seed, progress=False, **STAGE2))
    step = lap("stage2", step)
    test = run_recall(world, RecallConfig(split="test", model=TINY_MODEL, pretrained=str(checkpoint), progress=False))
    reranked = reranked_run(test, stage2.path, world / ".vqa-search")
    lap("evaluate", step)
    return {
        "stage1": recall_of(test),
        "stage1_rerank": recall_of(reranked),
        "seconds": round(time.perf_counter() - started, 1),
        "seconds_by_step": seconds,
        "images": images,
        "stage1_config": STAGE1,
        "stage1_best_epoch": stage1.best_epoch,
        "stage2_config": STAGE2,
        "stage2_lambda": stage2.lam,
        "stage2_best_epoch": stage2.best_epoch,
        "stage2_val": {"global": stage2.val_global, "reranked": stage2.val_reranked},
        "stage2_history": stage2.history,
    }


if __name__ == "__main__":
    main()
