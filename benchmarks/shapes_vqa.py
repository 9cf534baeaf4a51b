"""VQA two ways on the shapes world: three trained heads, caption answers and the majority baseline.

    python benchmarks/shapes_vqa.py --json benchmarks/results/shapes_vqa.json

No download: generate the shapes world, train the tiny CLIP from scratch (stage 1), index the world
with it (the captions mode reads the index), then train the baseline, dual-concat and
dual-attention heads and score them, the caption answers and the majority answer on the test
questions with `bench vqa`'s code. Accuracies are the official VQA accuracy, in percent.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from vqa_search.align.finetune import FinetuneConfig, finetune
from vqa_search.indexer.build import BuildConfig, build_index
from vqa_search.models import TINY_MODEL
from vqa_search.shapes import ShapesConfig, make_shapes
from vqa_search.vqa.bench import VqaBenchConfig, run_vqa_bench
from vqa_search.vqa.heads import VARIANTS
from vqa_search.vqa.train import VqaTrainConfig, train_vqa

STAGE1 = dict(epochs=60, batch_size=128, lr=1e-3, weight_decay=0.1, patience=8)  # as benchmarks/shapes_align.py
HEAD = dict(epochs=20, batch_size=256, lr=1e-3, patience=6)
LOCAL = dict(unfreeze_last=2, local_lr=1e-3)  # the local encoder: stage 1's ViT, every block trained by the head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="Write the results here.")
    parser.add_argument("--work", type=Path, help="Keep the world, checkpoints and heads here (default: a temp dir).")
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(format="%(message)s")
    logging.getLogger("vqa_search").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as scratch:
        results = run(args.work or Path(scratch), args.images, args.seed)
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
    finetune(world, checkpoint, FinetuneConfig(model=TINY_MODEL, pretrained="none", seed=seed, **STAGE1), progress=False)
    step = lap("stage1", step)
    build_index(world, BuildConfig(model=TINY_MODEL, pretrained=str(checkpoint), progress=False))
    step = lap("index", step)

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
        step = lap(variant, step)
    bench = run_vqa_bench(world, VqaBenchConfig(split="test", mode="captions", progress=False))
    results["captions"] = _summary(bench["captions"])
    results["majority"] = _summary(bench["majority"])
    lap("captions", step)
    return {**results, "seconds": round(time.perf_counter() - started, 1), "seconds_by_step": seconds,
            "images": images, "test_questions": bench["questions"], "stage1_config": STAGE1,
            "head_config": HEAD, "local_config": LOCAL, "training": training}


def _summary(report: dict) -> dict:
    return {"overall": report["overall"], "by_type": report["by_type"], "exact_match": report["exact_match"]}


if __name__ == "__main__":
    main()
