"""Start-up time of the command line: what a user waits for before anything happens.

    python benchmarks/startup.py --json benchmarks/results/startup.json
    python benchmarks/startup.py --json after.json --before before.json   # a before/after table

    # "before": an older tree (e.g. `git archive COMMIT vqa_search | tar -x -C /tmp/old`), past the
    # editable install: no site, so PYTHONPATH names the old tree first and then site-packages
    PYTHONPATH=/tmp/old:$(python -c 'import site; print(site.getsitepackages()[0])') \
        python benchmarks/startup.py --launcher "python -S -m vqa_search.cli" --json before.json

Every command runs as a user runs it (the `vqa-search` script, a fresh process), `--repeat` times
(5 by default) in alternating order, and the median wall time is reported. Each command also runs
once with `python -X importtime` (PYTHONPROFILEIMPORTTIME=1) to record which heavy packages it
imports (torch, open_clip, faiss, ...) and what its heaviest imports cost. The model-free commands
work on a small shapes world indexed with the tiny random model, prepared first (not timed).

Targets (issue 16): every `--help` at most 0.5 s; commands that need no model (`make-shapes`,
`bench report`, `export`, `info`, an unchanged re-index) at most 1 s. Machines are shared and
noisy: the load average is recorded with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
HEAVY = ("torch", "torchvision", "open_clip", "faiss", "pyarrow", "numpy", "PIL", "matplotlib", "timm")
HELP_TARGET, NO_MODEL_TARGET = 0.5, 1.0
TINY = ["--model", "vqa-tiny", "--pretrained", "none"]


def commands(world: Path, index_dir: Path, scratch: Path, report_file: Path) -> list[dict]:
    """(name, arguments after `vqa-search`, target seconds); `{run}` is replaced by the run number."""
    return [
        {"name": "vqa-search --help", "args": ["--help"], "target": HELP_TARGET},
        {"name": "vqa-search -h", "args": ["-h"], "target": HELP_TARGET},
        {"name": "vqa-search --version", "args": ["--version"], "target": HELP_TARGET},
        {"name": "vqa-search index --help", "args": ["index", "--help"], "target": HELP_TARGET},
        {"name": "vqa-search train finetune --help", "args": ["train", "finetune", "--help"], "target": HELP_TARGET},
        {"name": "vqa-search bench --help", "args": ["bench", "--help"], "target": HELP_TARGET},
        {"name": "vqa-search make-shapes --help", "args": ["make-shapes", "--help"], "target": HELP_TARGET},
        {"name": "vqa-search make-shapes (20 images)",
         "args": ["make-shapes", str(scratch / "shapes-{run}"), "--images", "20", "--size", "64", "-q"],
         "target": NO_MODEL_TARGET},
        {"name": "vqa-search bench report", "args": ["bench", "report", str(report_file)], "target": NO_MODEL_TARGET},
        {"name": "vqa-search export (.npz)", "args": ["export", str(world), "--out", str(scratch / "v-{run}.npz")],
         "target": NO_MODEL_TARGET},
        {"name": "vqa-search info", "args": ["info", str(world)], "target": NO_MODEL_TARGET},
        {"name": "vqa-search info --json", "args": ["info", str(world), "--json"], "target": NO_MODEL_TARGET},
        {"name": "vqa-search index (unchanged, 300 images)", "args": ["index", str(world), *TINY, "-q"],
         "target": NO_MODEL_TARGET},
    ]


def script() -> str:
    found = Path(sys.executable).with_name("vqa-search")
    return str(found) if found.exists() else shutil.which("vqa-search") or "vqa-search"


LAUNCHER = [script()]  # what runs `vqa-search`; --launcher replaces it


def run_once(argv: list[str], env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    return time.perf_counter() - started, done


def import_profile(argv: list[str]) -> dict:
    """Which heavy packages the command imports, and its heaviest imports (cumulative ms)."""
    _, done = run_once(argv, env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    entries = []
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if match:
            entries.append((match.group(4), int(match.group(2)), len(match.group(3)) // 2))
    packages = {}
    for name, cumulative, _ in entries:
        if "." not in name:  # a package's own line holds everything it imported the first time
            packages[name] = max(packages.get(name, 0), cumulative)
    heaviest = sorted(packages.items(), key=lambda item: -item[1])[:8]
    return {
        "imports": sorted(name for name in HEAVY if name in packages),
        "heaviest_ms": {name: round(us / 1000, 1) for name, us in heaviest},
        "modules_imported": len(entries),
    }


def prepare(workdir: Path) -> tuple[Path, Path]:
    """A 300-image shapes world indexed with the tiny random model, and a results file for `bench report`."""
    world = workdir / "world"
    for argv in (["make-shapes", str(world), "--images", "300", "--size", "64", "-q"],
                 ["index", str(world), *TINY, "--workers", "0", "-q"]):
        done = subprocess.run([*LAUNCHER, *argv], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"setup failed: vqa-search {' '.join(argv)}\n{done.stderr}")
    report_file = RESULTS / "recall_shapes.jsonl"
    return world, report_file


def measure(repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        workdir = Path(tmp)
        world, report_file = prepare(workdir)
        scratch = workdir / "scratch"
        scratch.mkdir()
        todo = commands(world, world / ".vqa-search", scratch, report_file)
        times = {c["name"]: [] for c in todo}
        codes = {c["name"]: set() for c in todo}
        errors = {}
        floor = []
        for run in range(repeats):  # alternating: a burst of load hits every command alike
            floor.append(run_once([sys.executable, "-c", "pass"])[0])
            for command in todo:
                argv = [*LAUNCHER, *(arg.replace("{run}", f"{run}") for arg in command["args"])]
                seconds, done = run_once(argv)
                times[command["name"]].append(seconds)
                codes[command["name"]].add(done.returncode)
                if done.returncode != 0:
                    errors[command["name"]] = (done.stderr.strip().splitlines() or [""])[-1][:200]
        profiles = {c["name"]: import_profile([*LAUNCHER, *(a.replace("{run}", "profile") for a in c["args"])])
                    for c in todo}
        torch_alone = statistics.median(run_once([sys.executable, "-c", "import torch"])[0] for _ in range(3))
        cli_import = import_profile([*LAUNCHER[:-2], "-c", "import vqa_search.cli"] if LAUNCHER[-2:] == ["-m", "vqa_search.cli"]
                                    else [sys.executable, "-c", "import vqa_search.cli"])
    results = []
    for command in todo:
        name = command["name"]
        ok = codes[name] == {0}
        results.append({
            "command": name,
            "median_s": round(statistics.median(times[name]), 3) if ok else None,
            "runs_s": [round(t, 3) for t in times[name]],
            "target_s": command["target"],
            "met": ok and statistics.median(times[name]) <= command["target"],
            "exit_codes": sorted(codes[name]),
            "error": None if ok else errors.get(name),
            **profiles[name],
        })
    return {
        "repeats": repeats,
        "python_floor_s": round(statistics.median(floor), 3),
        "import_torch_s": round(torch_alone, 3),
        "import_vqa_search_cli": cli_import,
        "results": results,
        "launcher": " ".join(LAUNCHER),
        "machine": {"cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def table(after: dict, before: dict | None) -> str:
    old = {r["command"]: r for r in (before or {}).get("results", [])}
    lines = ["| command | before | after | target | imports torch / open_clip / faiss (after) |",
             "|---|---:|---:|---:|---|"]
    for result in after["results"]:
        previous = old.get(result["command"])
        was = (f"{previous['median_s']:.2f} s" if previous and previous["median_s"] is not None
               else "(missing)" if previous else "")
        now = f"{result['median_s']:.2f} s" if result["median_s"] is not None else "failed"
        heavy = " / ".join("yes" if name in result["imports"] else "no" for name in ("torch", "open_clip", "faiss"))
        lines.append(f"| `{result['command']}` | {was} | {now} | ≤ {result['target_s']} s | {heavy} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--before", type=Path, help="an earlier run's JSON: kept in the output and tabled against")
    parser.add_argument("--launcher", help="command that runs vqa-search (default: the installed script)")
    args = parser.parse_args()
    if args.launcher:
        LAUNCHER[:] = [sys.executable if word == "python" else word for word in shlex.split(args.launcher)]
    after = measure(args.repeat)
    before = json.loads(args.before.read_text()) if args.before else None
    if before is not None:
        after["before"] = {key: before[key] for key in ("results", "python_floor_s", "import_torch_s",
                                                        "import_vqa_search_cli", "launcher", "machine", "created")
                           if key in before}
    print(table(after, after.get("before")))
    print(f"python -c pass: {after['python_floor_s']:.2f} s; import torch: {after['import_torch_s']:.2f} s; "
          f"load average {after['machine']['load_average']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(after, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
