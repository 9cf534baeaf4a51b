"""Seconds per image of each region source on real photos: what `vqa-search regions` will cost.

    python benchmarks/regions_speed.py --json benchmarks/results/regions_speed.json

Speed does not depend on the weights, so the detectors and ViT-B-32 are randomly initialised (the
detectors are saved to a file and loaded like user weights). Images are Flickr8k photos from
../shared/flickr8k-sample (or the folder $VQA_SEARCH_FLICKR8K_SAMPLE names), decoded beforehand;
each figure is the median of several runs over the same images, after one warm-up image. The
detectors run at their own input size (800 px short side), with their own 1000 RPN proposals per
image and with `--proposals 100`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from vqa_search.align.regions import DETECTORS, RegionConfig, load_extractor
from vqa_search.core.atomic import write_json
from vqa_search.core.images import load_rgb
from vqa_search.core.models import load_clip
from vqa_search.core.identity import resolve_identity

PROPOSALS = 100
SAMPLE = Path(os.environ.get("VQA_SEARCH_FLICKR8K_SAMPLE") or
              Path(__file__).resolve().parents[2] / "shared" / "flickr8k-sample").expanduser() / "Images"


def seconds_per_image(extractor, images, runs: int) -> float:
    extractor.extract(images[:1])  # warm-up: lazy model construction, allocator
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        extractor.extract(images)
        times.append((time.perf_counter() - started) / len(images))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="photos per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not SAMPLE.is_dir():
        print(f"skipped: the Flickr8k sample is not at {SAMPLE.parent} (set VQA_SEARCH_FLICKR8K_SAMPLE to its folder)")
        return
    images = [load_rgb(path).image for path in sorted(SAMPLE.glob("*.jpg"))[: args.images]]
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name, (build, _) in DETECTORS.items():
            weights = Path(workdir) / f"{name}.pth"
            torch.save(build(weights=None, weights_backbone=None).state_dict(), weights)
            for proposals in (None, PROPOSALS):  # the detector's own 1000, then `regions --proposals 100`
                extractor = load_extractor(RegionConfig(detector=name, detector_weights=weights, proposals=proposals))
                rows.append({"source": f"detector {name}" + (f", {proposals} proposals" if proposals else ""),
                             "seconds_per_image": seconds_per_image(extractor, images, args.runs)})
        clip = load_clip(resolve_identity("ViT-B-32", "none"))
        extractor = load_extractor(RegionConfig(source="clip-patches"), clip)
        rows.append({"source": "clip-patches ViT-B-32", "seconds_per_image": seconds_per_image(extractor, images, args.runs)})
    result = {"images": len(images), "runs": args.runs, "torch_threads": torch.get_num_threads(),
              "load_average_1min": os.getloadavg()[0], "results": rows}
    print(f"{len(images)} Flickr8k photos, median of {args.runs} runs, {result['torch_threads']} torch threads, "
          f"load average {result['load_average_1min']:.1f}")
    print(f"{'source':<44} {'s / image':>10}")
    for row in rows:
        print(f"{row['source']:<44} {row['seconds_per_image']:>10.3f}")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    sys.exit(main())
