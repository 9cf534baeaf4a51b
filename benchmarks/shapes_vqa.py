"""VQA two ways on the shapes world: three trained heads, caption answers and the majority baseline.

    python benchmarks/shapes_vqa.py --json benchmarks/results/shapes_vqa.json

No download: generate the shapes world, train the tiny CLIP from scratch (stage 1), index the world
with it (the captions mode reads the index), then train the baseline, dual-concat and
dual-attention heads and score them, the caption answers and the majority answer on the test
questions with `bench vqa`'s code. Accuracies are the official VQA accuracy, in percent.
"""

from __future__ import annotations

from pathlib import Path

from shapes_stage1 import STAGE1, Laps, main, world_with_stage1
from vqa_search.indexer.build import BuildConfig, build_index
from vqa_search.core.identity import TINY_MODEL
from vqa_search.vqa.bench import VqaBenchConfig, run_vqa_bench
from vqa_search.vqa.heads import VARIANTS
from vqa_search.vqa.train import VqaTrainConfig, train_vqa

HEAD = dict(epochs=20, batch_size=256, lr=1e-3, patience=6)
LOCAL = dict(unfreeze_last=2, local_lr=1e-3)  # the local encoder: stage 1's ViT, every block trained by the head


def run(work: Path, images: int, seed: int) -> dict:
    laps = Laps()
    world, checkpoint, _ = world_with_stage1(work, images, seed, laps)
    build_index(world, BuildConfig(model=TINY_MODEL, pretrained=str(checkpoint), progress=False))
    laps("index")

    results, training = {}, {}
    for variant in VARIANTS:
        head = work / f"{variant}.safetensors"
        local = LOCAL if variant != "baseline" else {}
        trained = train_vqa(world, head, VqaTrainConfig(
            variant=variant, model=TINY_MODEL, pretrained=str(checkpoint), local_model=TINY_MODEL,
            local_pretrained=str(checkpoint), seed=seed, **HEAD, **local), progress=False)
        bench = run_vqa_bench(world, VqaBenchConfig(head=head, split="test", mode="head", progress=False))
        results[variant] = _summary(bench["head"])
        training[variant] = {"best_epoch": trained.best_epoch, "epochs": len(trained.history),
                             "val": trained.best["val"]["overall"], "seconds": round(trained.seconds, 1)}
        laps(variant)
    bench = run_vqa_bench(world, VqaBenchConfig(split="test", mode="captions", progress=False))
    results["captions"] = _summary(bench["captions"])
    results["majority"] = _summary(bench["majority"])
    laps("captions")
    return {**results, "seconds": laps.total(), "seconds_by_step": laps.seconds,
            "images": images, "test_questions": bench["questions"], "stage1_config": STAGE1,
            "head_config": HEAD, "local_config": LOCAL, "training": training}


def _summary(report: dict) -> dict:
    return {"overall": report["overall"], "by_type": report["by_type"], "exact_match": report["exact_match"]}


if __name__ == "__main__":
    main(__doc__, run)
