"""The decode → encode runner locally vs on Ray, on this one machine: Ray's overhead, in one run.

    flock -x /tmp/cpu.lock python benchmarks/ray_runner.py --json benchmarks/results/ray_runner.json

ViT-B-32 with random weights (speed does not depend on them) on the 300 real Flickr8k photos of
../shared/flickr8k-sample (or $VQA_SEARCH_FLICKR8K_SAMPLE), JPEG decoding included. Each
configuration runs `core.runner.run` over the same files with the same mapper into a writer that
only times arrivals (shards and commit are the same code for both runners, on the driver):

- local: the CLI's plan for this machine (core/threads.plan_threads: decoding processes + torch threads);
- ray, N actors: `RayRunner(actors=N)` on a local Ray with the machine's CPUs; each actor loads the
  model once (from the object store) and runs torch on one thread.

Reported per configuration, medians of alternating repetitions: images/s end to end (from the call
to the last result: for Ray this includes putting the model in the object store and starting the
actors), the steady images/s after the first result, and the seconds to the first result. Ray's own
start (`ray.init`) is reported once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vqa_search.core.identity import resolve_identity
from vqa_search.core.image_stream import ImageReader, ImageRef
from vqa_search.core.models import load_clip
from vqa_search.core.ray_runner import RayRunner
from vqa_search.core.runner import ClipImageMapper, run
from vqa_search.core.threads import available_cores, plan_threads
from vqa_search.indexer.datasets import read_dataset

SAMPLE = Path(os.environ.get("VQA_SEARCH_FLICKR8K_SAMPLE") or
              Path(__file__).resolve().parents[1].parent / "shared" / "flickr8k-sample").expanduser()
MODEL = "ViT-B-32"
BATCH = 32


@dataclass
class ArrivalTimes:
    """A writer that only notes when each result arrives."""

    times: list[float] = field(default_factory=list)

    def add(self, item, result) -> None:
        assert result is not None, item.reason
        self.times.append(time.perf_counter())

    def close(self) -> None:
        pass


def measure(refs: list[ImageRef], clip, workers: int, runner: RayRunner | None) -> dict:
    reader = ImageReader(refs, clip.preprocess, BATCH, workers)
    arrivals = ArrivalTimes()
    started = time.perf_counter()
    run(reader, ClipImageMapper(clip), arrivals, runner=runner)
    first, last = arrivals.times[0], arrivals.times[-1]
    after_first = sum(t > first for t in arrivals.times)
    return {"images_per_s": len(refs) / (last - started), "steady_images_per_s": after_first / (last - first),
            "first_result_s": first - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--actors", default="1,2", help="Ray actor counts to measure, comma-separated")
    args = parser.parse_args()

    import ray

    load_before = os.getloadavg()[0]
    data = read_dataset(SAMPLE)
    refs = [ImageRef(data.images_dir / path, path) for path in data.images]
    plan = plan_threads()
    torch.set_num_threads(plan.threads)
    clip = load_clip(resolve_identity(MODEL, "none"), torch.device("cpu"))

    started = time.perf_counter()
    ray.init(num_cpus=available_cores(), include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - started

    configurations = {"local": None, **{f"ray, {n} actor{'s' if n > 1 else ''}": RayRunner(actors=n)
                                        for n in map(int, args.actors.split(","))}}
    runs: dict[str, list[dict]] = {name: [] for name in configurations}
    for repeat in range(args.repeats):  # alternating, so that a noisy neighbour hits every configuration
        for name, runner in configurations.items():
            runs[name].append(measure(refs, clip, plan.workers, runner))
            print(f"repeat {repeat + 1}, {name}: {runs[name][-1]}", flush=True)
    ray.shutdown()

    medians = {name: {key: round(statistics.median(r[key] for r in results), 2) for key in results[0]}
               for name, results in runs.items()}
    local = medians["local"]["images_per_s"]
    for name, row in medians.items():
        row["vs_local"] = round(row["images_per_s"] / local, 2)
    results = {
        "images": len(refs), "model": f"{MODEL} (random weights)", "batch_size": BATCH, "cores": available_cores(),
        "local_plan": {"torch_threads": plan.threads, "decoding_workers": plan.workers},
        "ray": {"version": ray.__version__, "init_s": round(ray_init_s, 1),
                "actor": "one CPU each, torch on 1 thread; decoding fused into the actors' tasks (CPU only)"},
        "repeats": args.repeats, "medians": medians, "runs": runs,
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},  # others on this shared machine
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
