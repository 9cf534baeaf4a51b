"""What the shapes benchmarks share: their command line, step timing, and the world with its stage-1 CLIP."""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from vqa_search.align.finetune import FinetuneConfig, FinetuneResult, finetune
from vqa_search.core.identity import TINY_MODEL
from vqa_search.shapes import ShapesConfig, make_shapes

STAGE1 = dict(epochs=60, batch_size=128, lr=1e-3, weight_decay=0.1, patience=8)  # from scratch: a large lr


class Laps:
    """Seconds spent in each named step, and in all of them."""

    def __init__(self) -> None:
        self.started = self._since = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[step] = round(now - self._since, 1)
        self._since = now

    def total(self) -> float:
        return round(time.perf_counter() - self.started, 1)


def world_with_stage1(work: Path, images: int, seed: int, laps: Laps) -> tuple[Path, Path, FinetuneResult]:
    """Generate the shapes world in WORK and train the tiny CLIP on it from scratch."""
    world, checkpoint = work / "shapes", work / "stage1.safetensors"
    make_shapes(world, ShapesConfig(images=images, seed=seed))
    laps("generate")
    stage1 = finetune(world, checkpoint, FinetuneConfig(model=TINY_MODEL, pretrained="none", seed=seed, **STAGE1),
                      progress=False)
    laps("stage1")
    return world, checkpoint, stage1


def main(description: str, run: Callable[[Path, int, int], dict]) -> None:
    """Parse the shared options, run the benchmark in WORK (or a temp dir), print and save its results."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="Write the results here.")
    parser.add_argument("--work", type=Path, help="Keep the world, checkpoints and heads here (default: a temp dir).")
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(format="%(message)s")
    logging.getLogger("vqa_search").setLevel(logging.INFO)  # one line per epoch, not open_clip's chatter
    with tempfile.TemporaryDirectory() as scratch:
        results = run(args.work or Path(scratch), args.images, args.seed)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
