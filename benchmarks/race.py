"""A side-by-side race of vqa-search against other photo-search tools on the same photos (issue 19).

    # once: the photo sets, and the random-weight model files the other tools load (needs torch,
    # open_clip and onnx in this python; not timed)
    python benchmarks/race.py prepare
    # the race itself, alone on the CPU
    flock -x /tmp/cpu.lock python benchmarks/race.py run --json benchmarks/results/race.json \\
        --vqa-search "python -m vqa_search.cli" --tools vqa-search,rclip3

Photos: the 300 real Flickr8k photos of the shared sample (or $VQA_SEARCH_FLICKR8K_SAMPLE) plus 200
mirrored, re-encoded (JPEG quality 90) copies of the first 200, so 500 distinct files, written to a
scratch folder (--scratch, default /tmp/vqa-search-race), never into the repository; the 20-photo set is
the first 20 real ones. Every tool runs with random weights (speed does not depend on them), in its
own virtualenv (--venvs, default /root/race-venvs; the README says how each is installed):

- vqa-search: `index PHOTOS --model ViT-B-32 --pretrained none --out STATE -q`, the command given by
  --vqa-search (so that any tree or install can be raced), plus --vqa-search-args;
- rclip 3.3.0: `rclip -f -t 1 QUERY` in the photo folder (rclip cannot index without searching: each
  of its runs also embeds one text query), RCLIP_DATADIR holding a seeded random open_clip
  ViT-B-32-256 exported to visual.onnx / textual.onnx as rclip's own conversion script does (opset 18,
  input/output names `input` / `output`, dynamic batch) and open_clip's BPE vocabulary;
- rclip 2.1.6: the same command, its ViT-B-32-quickgelu `openai` weights replaced by seeded random
  ones in a private Hugging Face cache read offline.

Measured per tool: a cold index of 500 photos (no state), an unchanged re-run on them, a cold index
of 20 photos; repetitions alternate tool and task, so a burst of load hits every tool alike. Each
run waits until the 1-minute load average is at most --max-load (recorded); a run that starts above
it, or during which other processes used more than --max-foreign cores (all CPU time in
/proc/stat less the run's own, from wait4), is disturbed: kept in the JSON, left out of the medians
and run again (at most --attempts times); a task left with disturbed runs only is summarised from
them and flagged (`from_disturbed_runs`). Steady images/s is 480 / (median cold 500 − median cold
20): the marginal rate, start-up and model loading cancelled, the same formula for every tool. The
largest process RSS is wait4's ru_maxrss (the largest process of the run's tree), median over the
cold 500 runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SAMPLE = Path(os.environ.get("VQA_SEARCH_FLICKR8K_SAMPLE") or ROOT.parent / "shared" / "flickr8k-sample").expanduser()
RCLIP3_SUBDIR = "ViT-B-32-256-datacomp_s34b_b86k"  # where rclip 3 looks for its model files
RCLIP2_HUB_REPO = "timm/vit_base_patch32_clip_224.openai"  # open_clip's hub entry for ViT-B-32-quickgelu `openai`
QUERY = "a dog running on the grass"
TASKS = ("cold-500", "rerun-500", "cold-20")
TOOLS = ("vqa-search", "rclip3", "rclip2")
SEED = 0
DEFAULT_VQA_SEARCH = f"{sys.executable} -m vqa_search.cli"


# ---------------------------------------------------------------------------------------------- prepare


def prepare_photos(scratch: Path) -> dict[str, Path]:
    """500 photos (300 real + 200 mirrored re-encoded copies) and 20 photos, made once."""
    from PIL import Image, ImageOps

    real = sorted((SAMPLE / "Images").glob("*.jpg"))
    if len(real) < 200:
        sys.exit(f"need the Flickr8k sample's photos in {SAMPLE / 'Images'} (found {len(real)})")
    sets = {"500": scratch / "photos-500", "20": scratch / "photos-20"}
    for name, folder in sets.items():
        if folder.is_dir() and len(list(folder.iterdir())) == int(name):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for path in real[: int(name)] if name == "20" else real:
            shutil.copy2(path, folder / path.name)
        if name == "500":
            for path in real[:200]:
                with Image.open(path) as image:
                    ImageOps.mirror(image.convert("RGB")).save(folder / f"mirrored_{path.name}", quality=90)
    return sets


def _export_wrappers(model):
    """rclip's export wrappers: pixels -> image embedding, token ids -> text embedding (unnormalised)."""
    import torch

    class Visual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = model.visual

        def forward(self, x):
            return self.visual(x)

    class Textual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model.encode_text(x)

    return Visual(), Textual()


def prepare_rclip3(models: Path) -> Path:
    """A seeded random open_clip ViT-B-32-256 in the files rclip 3 loads, exported as its
    scripts/convert_model.py does (TorchScript exporter, opset 18, names input/output, dynamic batch)."""
    import open_clip
    import torch

    target = models / "rclip3" / RCLIP3_SUBDIR
    vocab = models / "rclip3" / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz"
    if (target / "visual.onnx").is_file() and (target / "textual.onnx").is_file() and vocab.is_file():
        return target.parent
    target.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    model, _, _ = open_clip.create_model_and_transforms("ViT-B-32-256", pretrained=None)
    model.eval()
    common = dict(input_names=["input"], output_names=["output"], opset_version=18, dynamo=False,
                  dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    visual, textual = _export_wrappers(model)
    torch.onnx.export(visual, (torch.randn(1, 3, 256, 256),), str(target / "visual.onnx"), **common)
    torch.onnx.export(textual, (torch.zeros(1, 77, dtype=torch.long),), str(target / "textual.onnx"), **common)
    vocab.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz", vocab)
    return target.parent


def prepare_rclip2(models: Path) -> Path:
    """A Hugging Face cache holding seeded random ViT-B-32-quickgelu weights where open_clip looks for
    the `openai` ones, read with HF_HUB_OFFLINE=1."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    hub = models / "rclip2-hf" / "hub"
    repo = hub / ("models--" + RCLIP2_HUB_REPO.replace("/", "--"))
    revision = "0" * 40
    weights = repo / "snapshots" / revision / "open_clip_model.safetensors"
    if weights.is_file():
        return hub
    torch.manual_seed(SEED)
    model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return hub


# ------------------------------------------------------------------------------------------------- run


def cpu_busy_seconds() -> float:
    """All CPU time the machine spent outside idle and iowait, in seconds."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # idle, iowait
    return busy / os.sysconf("SC_CLK_TCK")


def run_child(argv: list[str], cwd: Path | None, env: dict) -> dict:
    """One run in a fresh helper process, so that ru_maxrss is this run's tree alone."""
    probe = (
        "import json, os, resource, subprocess, sys, time\n"
        "from pathlib import Path\n"
        "def busy():\n"
        "    f = [int(x) for x in Path('/proc/stat').read_text().splitlines()[0].split()[1:]]\n"
        "    return (sum(f) - f[3] - f[4]) / os.sysconf('SC_CLK_TCK')\n"
        "argv, cwd = json.loads(sys.argv[1]), sys.argv[2] or None\n"
        "b = busy(); t = time.perf_counter()\n"
        "p = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)\n"
        "out, err = p.communicate()\n"
        "wall = time.perf_counter() - t; machine = busy() - b\n"
        "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(json.dumps({'wall_s': wall, 'code': p.returncode, 'cpu_s': u.ru_utime + u.ru_stime,\n"
        "  'max_rss_kib': u.ru_maxrss, 'machine_busy_s': machine,\n"
        "  'stdout': out.decode(errors='replace')[-1500:], 'stderr': err.decode(errors='replace')[-1500:]}))\n"
    )
    done = subprocess.run([sys.executable, "-S", "-c", probe, json.dumps(argv), str(cwd or "")],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    result = json.loads(done.stdout)
    result["foreign_cores"] = max(0.0, result["machine_busy_s"] - result["cpu_s"]) / result["wall_s"]
    return result


class Tool:
    name = ""

    def __init__(self, args: argparse.Namespace, photos: dict[str, Path]):
        self.args, self.photos = args, photos
        self.state = args.scratch / "state" / self.name

    @functools.cached_property
    def version_text(self) -> str:
        return self.version()

    def reset(self, size: str) -> None:
        shutil.rmtree(self.state / size, ignore_errors=True)
        (self.state / size).mkdir(parents=True)

    def command(self, size: str) -> tuple[list[str], Path | None, dict]:
        raise NotImplementedError

    def version(self) -> str:
        return ""


class VqaSearch(Tool):
    """One vqa-search to race: `LABEL=COMMAND` (or just COMMAND, labelled vqa-search) from --vqa-search."""

    def __init__(self, args, photos, given: str):
        label, _, command = given.partition("=") if "=" in given.split(" ")[0] else ("vqa-search", "", given)
        launcher, _, extra = command.partition(" -- ")  # after " -- ": more `index` arguments for this one
        self.name, self.launcher, self.extra = label, shlex.split(launcher), shlex.split(extra)
        super().__init__(args, photos)

    def command(self, size):
        argv = [*self.launcher, "index", str(self.photos[size]), "--model", "ViT-B-32",
                "--pretrained", "none", "--out", str(self.state / size / "index"), "-q",
                *shlex.split(self.args.vqa_search_args), *self.extra]
        return argv, self.args.scratch, dict(os.environ)  # not the cwd: `-m` would import a tree found there

    def version(self):
        done = subprocess.run([*self.launcher, "--version"], capture_output=True, text=True, cwd=self.args.scratch)
        return done.stdout.strip()


class Rclip(Tool):
    venv = ""

    def command(self, size):
        rclip = str(self.args.venvs / self.venv / "bin" / "rclip")
        return [rclip, "-f", "-t", "1", QUERY], self.photos[size], {**os.environ, **self.environment(size)}

    def environment(self, size: str) -> dict:
        return {"RCLIP_DATADIR": str(self.state / size)}

    def version(self):
        done = subprocess.run([str(self.args.venvs / self.venv / "bin" / "rclip"), "--version"],
                              capture_output=True, text=True, env={**os.environ, **self.environment("500")})
        return done.stdout.strip()


class Rclip3(Rclip):
    name, venv = "rclip3", "rclip3"

    def reset(self, size):
        super().reset(size)
        models = self.args.scratch / "models" / "rclip3"
        for entry in models.iterdir():  # the model files, linked into a fresh data folder
            (self.state / size / entry.name).symlink_to(entry)


class Rclip2(Rclip):
    name, venv = "rclip2", "rclip2"

    def environment(self, size):
        return {"RCLIP_DATADIR": str(self.state / size), "HF_HUB_CACHE": str(self.args.scratch / "models" / "rclip2-hf" / "hub"),
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


TOOL_CLASSES = {cls.name: cls for cls in (Rclip3, Rclip2)}


def wait_for_quiet(max_load: float, max_wait: float) -> float:
    """Wait until the 1-minute load average is at most max_load (at most max_wait seconds); return it."""
    deadline = time.monotonic() + max_wait
    while os.getloadavg()[0] > max_load and time.monotonic() < deadline:
        time.sleep(2)
    return os.getloadavg()[0]


def one_run(tool: Tool, task: str, args) -> dict:
    size = task.split("-")[1]
    if task.startswith("cold"):
        tool.reset(size)
    argv, cwd, env = tool.command(size)
    load = wait_for_quiet(args.max_load, args.max_wait)
    result = run_child(argv, cwd, env)
    result.update(tool=tool.name, task=task, load_at_start=round(load, 2),
                  disturbed=load > args.max_load or result["foreign_cores"] > args.max_foreign)
    if result["code"] != 0:
        raise SystemExit(f"{tool.name} {task} failed ({result['code']}): {shlex.join(argv)}\n{result['stderr']}")
    print(f"{tool.name:11s} {task:9s} {result['wall_s']:7.2f} s  rss {result['max_rss_kib'] / 2**20:5.2f} GiB  "
          f"load {load:4.2f}  others {result['foreign_cores']:.2f} cores{'  DISTURBED' if result['disturbed'] else ''}",
          flush=True)
    return result


def race(args) -> dict:
    photos = {"500": args.scratch / "photos-500", "20": args.scratch / "photos-20"}
    tools = []
    for name in args.tools:
        tools += ([VqaSearch(args, photos, given) for given in args.vqa_search or [DEFAULT_VQA_SEARCH]]
                  if name == "vqa-search" else [TOOL_CLASSES[name](args, photos)])
    runs = []
    for tool in tools:
        tool.version_text  # asked once, before the timed runs
    print(f"race of {', '.join(tool.name for tool in tools)} started {time.strftime('%H:%M:%S')}", flush=True)
    for repetition in range(args.repeat):
        order = tools[repetition % len(tools):] + tools[: repetition % len(tools)]  # alternate who goes first
        for task in args.tasks:
            for tool in order:
                for attempt in range(args.attempts):  # a disturbed run is done again (a cold one from scratch)
                    result = one_run(tool, task, args)
                    result.update(repetition=repetition, attempt=attempt)
                    runs.append(result)
                    write_json(args.json, results(args, tools, runs))  # a run cut short keeps what it measured
                    if not result["disturbed"]:
                        break
    return results(args, tools, runs)


def results(args, tools: list[Tool], runs: list[dict]) -> dict:
    """Medians of the undisturbed runs of each tool and task, with every run (kept or not)."""
    summary = {}
    for tool in tools:
        kept, undisturbed = {}, []
        for task in TASKS:
            done = [r for r in runs if r["tool"] == tool.name and r["task"] == task]
            kept[task] = [r for r in done if not r["disturbed"]]
            if kept[task]:
                undisturbed.append(task)
            else:  # every run of it disturbed: the median of all of them, flagged as such
                kept[task] = done
        median = {task: statistics.median(r["wall_s"] for r in kept[task]) if kept[task] else None for task in TASKS}
        cold500, cold20 = median["cold-500"], median["cold-20"]
        summary[tool.name] = {
            "version": tool.version_text,
            "cold_500_s": _round(cold500), "cold_20_s": _round(cold20), "rerun_500_s": _round(median["rerun-500"]),
            "steady_images_per_s": _round(480 / (cold500 - cold20)) if cold500 and cold20 and cold500 > cold20 else None,
            "max_rss_gib": _round(statistics.median(r["max_rss_kib"] for r in kept["cold-500"]) / 2**20)
            if kept["cold-500"] else None,
            "kept_runs": {task: len(kept[task]) for task in TASKS},
            "from_disturbed_runs": [task for task in TASKS if task not in undisturbed and kept[task]],
            "command": shlex.join(tool.command("500")[0]),
        }
    return {
        "summary": summary,
        "runs": runs,
        "settings": {"repeat": args.repeat, "max_load": args.max_load, "max_foreign_cores": args.max_foreign,
                     "attempts": args.attempts, "tasks": args.tasks, "query": QUERY, "vqa_search": args.vqa_search or [DEFAULT_VQA_SEARCH],
                     "vqa_search_args": args.vqa_search_args,
                     "photos": "300 Flickr8k sample photos + 200 mirrored JPEG q90 copies; 20 = first 20 real"},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    temp.replace(path)


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def table(results: dict) -> str:
    lines = ["| tool | 500 photos, cold | 20 photos, cold | unchanged re-run | steady images/s | largest process RSS |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in results["summary"].items():
        def cell(value, unit):
            return "–" if value is None else f"{value:.2f} {unit}" if unit == "s" else f"{value:.1f}{unit}"
        flag = f" (disturbed: {', '.join(row['from_disturbed_runs'])})" if row["from_disturbed_runs"] else ""
        lines.append(f"| {name} ({row['version']}){flag} | {cell(row['cold_500_s'], 's')} | {cell(row['cold_20_s'], 's')} | "
                     f"{cell(row['rerun_500_s'], 's')} | {cell(row['steady_images_per_s'], '')} | "
                     f"{cell(row['max_rss_gib'], ' GiB')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "run"])
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/vqa-search-race"))
    parser.add_argument("--venvs", type=Path, default=Path("/root/race-venvs"))
    parser.add_argument("--tools", default="vqa-search,rclip3", type=lambda s: s.split(","),
                        help=f"comma-separated, of {', '.join(TOOLS)}")
    parser.add_argument("--vqa-search", action="append",
                        help="[LABEL=]COMMAND [-- INDEX-ARGS] that runs vqa-search (any tree: e.g. 'after=env "
                             "PYTHONPATH=/work/main python -m vqa_search.cli -- --threads 2'); repeat to race "
                             "several; default: this python's")
    parser.add_argument("--vqa-search-args", default="", help="more arguments for `vqa-search index`, e.g. '--backend onnx'")
    parser.add_argument("--tasks", default=",".join(TASKS), type=lambda s: s.split(","),
                        help=f"comma-separated, of {', '.join(TASKS)} (a re-run alone needs the index of an earlier run)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--attempts", type=int, default=3, help="tries per run before a disturbed one is given up")
    parser.add_argument("--max-load", type=float, default=0.7)
    parser.add_argument("--max-wait", type=float, default=240.0, help="seconds to wait for the load to fall")
    parser.add_argument("--max-foreign", type=float, default=0.15, help="cores other processes may use during a run")
    parser.add_argument("--json", type=Path, default=RESULTS / "race.json")
    args = parser.parse_args()
    args.scratch = args.scratch.resolve()
    unknown = set(args.tools) - set(TOOLS)
    if unknown:
        parser.error(f"unknown tools: {', '.join(sorted(unknown))}")
    if set(args.tasks) - set(TASKS):
        parser.error(f"unknown tasks: {', '.join(sorted(set(args.tasks) - set(TASKS)))}")
    if args.step == "prepare":
        prepare_photos(args.scratch)
        prepare_rclip3(args.scratch / "models")
        prepare_rclip2(args.scratch / "models")
        print(f"prepared {args.scratch}")
        return
    print(table(race(args)))


if __name__ == "__main__":
    main()
