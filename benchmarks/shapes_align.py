"""The alignment method end to end on the shapes world: does stage 2 add recall on top of stage 1?

    python benchmarks/shapes_align.py --json benchmarks/results/shapes_align.json

No download: generate the shapes world, train the tiny CLIP from scratch (stage 1), index the
collection with that checkpoint, take its ViT patch tokens as regions (`clip-patches`), train the
cross-attention re-ranker with CLIP frozen (stage 2, λ chosen on val), then measure test recall of
stage 1 alone and of stage 1 + stage 2 on the same checkpoint and the same gallery, so the
difference is stage 2's alone. Every step is the library code behind the CLI commands.
"""

from __future__ import annotations

from pathlib import Path

from shapes_stage1 import STAGE1, Laps, main, world_with_stage1
from vqa_search.align.region_store import compute_regions
from vqa_search.align.regions import RegionConfig
from vqa_search.align.train_rerank import RerankTrainConfig, train_reranker
from vqa_search.indexer.build import BuildConfig, build_index
from vqa_search.core.identity import TINY_MODEL
from vqa_search.retrieval.recall import RecallConfig, run_recall
from vqa_search.align.rerank import reranked_run

STAGE2 = dict(epochs=4, batch_size=64, negatives=2, region_hidden=256, lr=1e-3, patience=2)


def recall_of(run) -> dict:
    return {direction: {key: round(value, 2) for key, value in getattr(run, direction).items() if key.startswith("R@")}
            for direction in ("t2i", "i2t")}


def run(work: Path, images: int, seed: int) -> dict:
    laps = Laps()
    world, checkpoint, stage1 = world_with_stage1(work, images, seed, laps)
    build_index(world, BuildConfig(model=TINY_MODEL, pretrained=str(checkpoint), progress=False))
    compute_regions(world, RegionConfig(source="clip-patches", progress=False))
    laps("index_and_regions")
    stage2 = train_reranker(world, RerankTrainConfig(model=TINY_MODEL, pretrained=str(checkpoint), lam=None,
                                                     seed=seed, progress=False, **STAGE2))
    laps("stage2")
    test = run_recall(world, RecallConfig(split="test", model=TINY_MODEL, pretrained=str(checkpoint), progress=False))
    reranked = reranked_run(test, stage2.path, world / ".vqa-search")
    laps("evaluate")
    return {
        "stage1": recall_of(test),
        "stage1_rerank": recall_of(reranked),
        "seconds": laps.total(),
        "seconds_by_step": laps.seconds,
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
    main(__doc__, run)
