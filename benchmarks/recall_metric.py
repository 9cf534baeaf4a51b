"""Time the recall metric on a Flickr8k-test-sized gallery: 5,000 captions x 1,000 images.

    python benchmarks/recall_metric.py --json benchmarks/results/recall_metric.json

Both directions (text->image ranks over 5,000 x 1,000 scores, image->text over 1,000 x 5,000), from
the similarity matrix to R@K, median and mean rank; median of several repetitions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from vqa_search.retrieval.metrics import first_correct_ranks, summarize

IMAGES, CAPTIONS_PER_IMAGE = 1000, 5


def one_run(scores: np.ndarray, caption_image: np.ndarray) -> float:
    started = time.perf_counter()
    image_ids = np.arange(IMAGES)
    summarize(first_correct_ranks(scores, caption_image, image_ids))
    summarize(first_correct_ranks(scores.T, image_ids, caption_image))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((IMAGES * CAPTIONS_PER_IMAGE, IMAGES)).astype(np.float32)
    caption_image = np.repeat(np.arange(IMAGES), CAPTIONS_PER_IMAGE)
    seconds = [one_run(scores, caption_image) for _ in range(args.repeats)]
    results = {"captions": len(scores), "images": IMAGES, "repeats": args.repeats,
               "median_seconds_both_directions": statistics.median(seconds)}
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
