"""Frozen-feature caches in RAM vs memory-mapped from disk: peak memory and epoch time of a VQA head.

    flock -x /tmp/cpu.lock python benchmarks/feature_cache.py --json benchmarks/results/feature_cache.json

A shapes world (`--images`, 2,000 by default); a dual-attention head whose local encoder has
ViT-B-16's token grid and width (197 tokens x 768, 224 px, patch 16), so each image's cached stream
is ViT-B-16's size (296 KiB in float16), but only 1 block deep, so computing them is cheap (random
weights: the cost and size do not depend on them). The head trains with the local encoder
frozen. Each training runs in a fresh process, sampling /proc/self/status every 20 ms:

- anonymous RSS (heap: what has to fit in RAM),
- file-backed RSS (pages of memory-mapped files: page cache the kernel drops under pressure),

for `--cache memory`, `--cache disk` computing the cache, and `--cache disk` reusing it. Epoch time
is the median of the epochs' training seconds (val excluded) in each run.

The second part measures float16 storage for stage 1's `--unfreeze-last` streams (which are float32):
the same seeded run of a tiny CLIP with the streams stored as float32 and as float16, loss and val
recall per epoch side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LOCAL_MODEL = "bench-b16-grid-1block"
LOCAL_CONFIG = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 768, "head_width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
HEAD = dict(variant="dual-attention", model="vqa-tiny", pretrained="none", local_model=LOCAL_MODEL,
            local_pretrained="none", unfreeze_last=0, epochs=2, patience=2, batch_size=256, hidden=256)


class Sampler:
    """Peak VmRSS, RssAnon and RssFile of this process, read every `period` seconds."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self, period: float = 0.02):
        self.period, self.peaks, self.stop = period, dict.fromkeys(self.FIELDS, 0), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            time.sleep(self.period)

    def sample(self) -> None:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in self.peaks:
                    self.peaks[name] = max(self.peaks[name], int(value.split()[0]) * 1024)

    def __enter__(self) -> "Sampler":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.sample()


def child(world: Path, cache: str, cache_dir: Path, config_dir: Path, out: Path) -> dict:
    import torch

    from vqa_search.core import models
    from vqa_search.vqa.train import VqaTrainConfig, train_vqa

    models.open_clip.add_model_config(config_dir)
    torch.set_num_threads(2)
    started = time.perf_counter()
    with Sampler() as sampler:
        result = train_vqa(world, out, VqaTrainConfig(**HEAD, cache=cache, cache_dir=cache_dir, workers=1),
                           progress=False)
    total = time.perf_counter() - started
    epochs = [record["seconds"] for record in result.history]
    return {"cache": cache, "peak_rss_gib": sampler.peaks["VmRSS"] / 2**30,
            "peak_anon_rss_gib": sampler.peaks["RssAnon"] / 2**30, "peak_file_rss_gib": sampler.peaks["RssFile"] / 2**30,
            "epoch_seconds": epochs, "epoch_seconds_median": statistics.median(epochs),
            "features_seconds": total - sum(r["seconds"] + r["val_seconds"] for r in result.history),
            "total_seconds": total, "losses": [record["loss"] for record in result.history],
            "val_accuracy": [record["val"]["overall"] for record in result.history]}


def run_child(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, "child", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def cache_part(work: Path, images: int) -> dict:
    from vqa_search.shapes import ShapesConfig, make_shapes

    world = work / "shapes"
    if not (world / "vqa.jsonl").is_file():
        make_shapes(world, ShapesConfig(images=images, seed=11), progress=False)
    config_dir = work / "configs"
    config_dir.mkdir(exist_ok=True)
    (config_dir / f"{LOCAL_MODEL}.json").write_text(json.dumps(LOCAL_CONFIG))
    cache_dir = work / "cache"
    runs = {}
    for name, cache in (("memory", "memory"), ("disk_compute", "disk"), ("disk_reuse", "disk")):
        runs[name] = run_child([str(world), cache, str(cache_dir), str(config_dir), str(work / f"{name}.safetensors")])
        print(name, json.dumps(runs[name]), file=sys.stderr)
    stream_files = list(cache_dir.glob("vqa-local-streams-*/rows.npy"))
    memory, disk = runs["memory"], runs["disk_reuse"]
    return {
        "images": images, "local_stream_per_image_bytes": 197 * 768 * 2,
        "cache_on_disk_gib": sum(path.stat().st_size for path in cache_dir.rglob("*") if path.is_file()) / 2**30,
        "local_streams_gib": sum(path.stat().st_size for path in stream_files) / 2**30,
        "runs": runs,
        "same_losses_memory_vs_disk": memory["losses"] == runs["disk_compute"]["losses"] == disk["losses"],
        "anon_rss_ratio_disk_to_memory": disk["peak_anon_rss_gib"] / memory["peak_anon_rss_gib"],
        "epoch_time_ratio_disk_to_memory": disk["epoch_seconds_median"] / memory["epoch_seconds_median"],
    }


def fp16_part(work: Path) -> dict:
    """Stage 1 --unfreeze-last with the cached streams stored as float32 and as float16, same seed."""
    import numpy as np
    import torch

    from vqa_search.align import finetune as stage1
    from vqa_search.shapes import ShapesConfig, make_shapes

    world = work / "stage1-shapes"
    if not (world / "captions.txt").is_file():
        make_shapes(world, ShapesConfig(images=400, seed=7, size=64), progress=False)
    torch.set_num_threads(2)
    out = {}
    # float32 with another seed: how far two equally good runs drift apart, the scale to judge float16 by
    for name, dtype, seed in (("float32", np.float32, 42), ("float16", np.float16, 42), ("float32_seed43", np.float32, 43)):
        stage1.STREAM_DTYPE = dtype
        config = stage1.FinetuneConfig(model="vqa-tiny", pretrained="none", workers=1, lr=1e-3, batch_size=32,
                                       epochs=6, patience=6, weight_decay=0.1, unfreeze_last=1, cache="memory",
                                       seed=seed)
        result = stage1.finetune(world, work / f"stage1-{name}.safetensors", config, progress=False)
        out[name] = {"losses": [r["loss"] for r in result.history],
                     "mean_recall": [r["mean_recall"] for r in result.history]}
    stage1.STREAM_DTYPE = np.float32
    for other in ("float16", "float32_seed43"):
        a, b = out["float32"], out[other]
        out[f"{other}_vs_float32"] = {
            "max_loss_difference": max(abs(x - y) for x, y in zip(a["losses"], b["losses"])),
            "best_mean_recall_difference": max(b["mean_recall"]) - max(a["mean_recall"])}
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        world, cache, cache_dir, config_dir, out = sys.argv[2:7]
        print(json.dumps(child(Path(world), cache, Path(cache_dir), Path(config_dir), Path(out))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--work", type=Path, default=None, help="Keep the world and caches here (default: a temp dir).")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/feature_cache.json"))
    parser.add_argument("--skip-fp16", action="store_true")
    parser.add_argument("--skip-cache", action="store_true", help="Only the stage-1 float16 part.")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="feature-cache-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = {"command": "flock -x /tmp/cpu.lock python benchmarks/feature_cache.py"}
    if not args.skip_cache:
        results["cache"] = cache_part(work, args.images)
    if not args.skip_fp16:
        results["stage1_fp16_streams"] = fp16_part(work)
    results["seconds"] = time.perf_counter() - started
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
