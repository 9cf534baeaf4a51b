"""What a cold `vqa-search index` of a few photos spends its start-up on, phase by phase (issue 19).

    flock -x /tmp/cpu.lock python benchmarks/cold_start.py --json benchmarks/results/cold_start.json

Each repetition is a fresh interpreter that times, one after the other, what a cold index with the
PyTorch backend goes through: the light imports (numpy, pyarrow), torch, torch._dynamo (which
torchvision.ops imports), the rest of torchvision, transformers (which open_clip imports when it is
installed), the rest of open_clip, building ViT-B-32 with its random initialisation and without it
(what a checkpoint or tag load now does), and encoding 20 Flickr8k photos with 1 and with 2 torch
threads. Each phase is incremental: an import counts only what the earlier ones did not bring in.
Medians of --repeat fresh processes; the load average is recorded with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("VQA_SEARCH_FLICKR8K_SAMPLE") or ROOT.parent / "shared" / "flickr8k-sample").expanduser()

PHASES = r"""
import json, sys, time
from pathlib import Path
laps, last = {}, time.perf_counter()
def lap(name):
    global last
    now = time.perf_counter(); laps[name] = now - last; last = now
import numpy, pyarrow.parquet; lap("numpy + pyarrow")
import torch; lap("torch")
import torch._dynamo; lap("torch._dynamo (for torchvision.ops)")
import torchvision; lap("torchvision, the rest")
try:
    import transformers; lap("transformers (open_clip imports it if installed)")
except ImportError:
    pass
import open_clip; lap("open_clip, the rest")
from vqa_search.core.models import without_weight_init
torch.manual_seed(0)
model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32"); lap("ViT-B-32 with random init")
with without_weight_init():
    open_clip.create_model("ViT-B-32")
lap("ViT-B-32 without init (weights loaded after)")
model.eval()
from PIL import Image
photos = sorted(Path(sys.argv[1]).glob("*.jpg"))[:20]
pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in photos]); lap("decode + preprocess 20 photos")
for threads in (1, 2):
    torch.set_num_threads(threads)
    with torch.inference_mode():
        model.encode_image(pixels[:1]); lap(f"first forward, {threads} thread(s)")
        model.encode_image(pixels); lap(f"encode 20 photos, {threads} thread(s)")
import faiss; lap("faiss")
print("LAPS " + json.dumps(laps))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs, loads = [], []
    floor = []
    for _ in range(args.repeat):
        loads.append(round(os.getloadavg()[0], 2))
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        floor.append(time.perf_counter() - started)
        done = subprocess.run([sys.executable, "-c", PHASES, str(SAMPLE / "Images")], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "2"})
        line = [x for x in done.stdout.splitlines() if x.startswith("LAPS ")]
        if not line:
            sys.exit(done.stderr)
        runs.append(json.loads(line[0][5:]))
    medians = {name: round(statistics.median(run[name] for run in runs), 3) for name in runs[0]}
    for name, seconds in medians.items():
        print(f"{seconds:7.3f} s  {name}")
    print(f"python -c pass: {statistics.median(floor):.3f} s; load average at the starts: {loads}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"medians_s": medians, "runs": runs, "load_average": loads,
                                         "python_floor_s": round(statistics.median(floor), 3),
                                         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n")


if __name__ == "__main__":
    main()
