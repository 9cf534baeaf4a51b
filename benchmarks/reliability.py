"""Hostile files, code in weight files, kill -9 and a full disk: what `vqa-search` survives, counted.

    python benchmarks/reliability.py --json benchmarks/results/reliability.json

The figures of the README's Reliability section (issue 15). Every run goes through the real CLI in a
subprocess, with the tiny random CLIP (no download). A run that outlives its timeout is a hang; a
traceback, or an exit other than 0 or a one-line `error:` with exit 2, is a crash.

- hostile: the test suite's hostile folder (tests/test_hostile_files.py) indexed, then every entry
  of it given alone as a query image.
- code: a TorchScript archive that creates a file when loaded (tests/test_no_code_execution.py),
  given as the CLIP checkpoint, detector weights, re-ranker and VQA head; an execution is the file
  appearing. Then the crafted re-ranker and head files of tests/test_artifacts.py, each a one-line
  error naming its flaw.
- kill -9: a shapes world indexed, SIGKILLed at seeded random moments of its work and resumed; the
  final index must equal a clean run's. A moment is a random shard boundary of the work left or,
  for a quarter of the kills, the start of the commit, watched on disk: a kill by the clock mostly
  hits the imports (a resume's start-up is most of its time) and tests nothing. `index` has no
  option for the shard size, so these runs call build_index in a child `python -c` with small
  shards, for a kill to land between many of them.
- disk full (root only): the index written to a tmpfs too small for the shards or for the commit,
  then grown; the second run must resume and end equal to the clean index.

Children run with one torch thread: on a shared 2-core machine two threads spin waiting for each other.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from vqa_search.align.reranker import CrossAttentionReranker, save_reranker
from vqa_search.core.atomic import write_json
from vqa_search.cli import EXIT_USER_ERROR
from vqa_search.core.store import IndexDir
from vqa_search.core.identity import TINY_MODEL

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_artifacts import HEAD_FILES, RERANKER, RERANKER_FILES, randomized, rewrite, tiny_answerer  # noqa: E402
from test_hostile_files import make_hostile_folder  # noqa: E402  (the tests folder is not a package)
from test_no_code_execution import _Payload  # noqa: E402

TIMEOUT_S = 120  # far above any run here (a few seconds); reaching it means something blocked
TOLERANCE = 1e-5
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CLI = [sys.executable, "-m", "vqa_search.cli"]
TINY = ["--model", TINY_MODEL, "--pretrained", "none"]
CLI_IN_ONE_PROCESS = """
import json, sys, traceback
from typer.testing import CliRunner
from vqa_search.cli import app
for args in json.loads(sys.stdin.read()):
    result = CliRunner().invoke(app, args)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    print(json.dumps({"exit": result.exit_code, "stderr": stderr}), flush=True)
"""
BUILD_WITH_SMALL_SHARDS = """
import json, logging, sys
from vqa_search.core.errors import UserError
from vqa_search.indexer.build import BuildConfig, build_index
logging.getLogger().setLevel(logging.ERROR)  # open_clip's note that the weights are random
config = BuildConfig(model=sys.argv[2], pretrained="none", workers=1, rows_per_shard=int(sys.argv[3]), progress=False)
try:
    print(json.dumps(build_index(sys.argv[1], config).to_json()))
except UserError as error:  # as the CLI does
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
"""


@dataclass
class Run:
    """One finished (or timed-out) subprocess, judged the way a user would see it."""

    exit: int | None  # None: killed at the timeout
    stdout: str
    stderr: str
    seconds: float

    @property
    def hang(self) -> bool:
        return self.exit is None

    @property
    def one_line_error(self) -> bool:
        lines = self.stderr.strip().splitlines()
        return self.exit == EXIT_USER_ERROR and len(lines) == 1 and lines[0].startswith("error:")

    @property
    def crash(self) -> bool:
        return not self.hang and ("Traceback" in self.stderr or (self.exit != 0 and not self.one_line_error))

    @property
    def outcome(self) -> str:
        if self.hang:
            return "hang"
        if self.crash:
            return "crash"
        return "ok" if self.exit == 0 else "refused in one line"

    def summary(self) -> dict:
        return {"outcome": self.outcome, "exit": self.exit, "seconds": round(self.seconds, 1),
                "stderr": _excerpt(self.stderr)}


def run(command: list[str], cwd: Path, timeout: float = TIMEOUT_S, stdin: str | None = None) -> Run:
    """Run COMMAND in its own process group, so a hang is killed with its decoding workers."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
    try:
        stdout, stderr = process.communicate(stdin, timeout=timeout)
        exit_code = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        exit_code = None
    return Run(exit_code, stdout, stderr, time.perf_counter() - started)


def _excerpt(text: str, limit: int = 400) -> str:
    text = text.strip()
    return text if len(text) <= limit else f"{text[:limit // 2]} [...] {text[-limit // 2:]}"


def _shown(name: str) -> str:
    """A file name as the index reports it: undecodable bytes as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


# ---- hostile files ------------------------------------------------------------------------------

def hostile_folder(work: Path) -> dict:
    """Index the hostile set; then query with each entry of its folder as the image."""
    root = work / "hostile"
    expected = make_hostile_folder(root)
    indexing = run([*CLI, "index", str(root), *TINY, "--json", "--quiet", "--workers", "1"], work)
    report = json.loads(indexing.stdout) if indexing.exit == 0 else {"skipped": []}
    reasons = {entry["path"]: entry["reason"] for entry in report["skipped"]}
    indexed = set(_committed(root / ".vqa-search")[0]) if indexing.exit == 0 else set()
    files = [{"path": path, "expected": want, "got": reasons.get(path, "indexed" if path in indexed else "missing")}
             for path, want in expected.items()]
    for file in files:
        file["as_expected"] = file["got"] == (file["expected"] or "indexed")

    queries = []
    for entry in sorted((root / "Images").iterdir()):
        query = run([*CLI, "query", "--image", str(entry), "--index", str(root / ".vqa-search"), "-k", "3", "--json"],
                    work)
        queries.append({"path": _shown(entry.name), "indexed": _shown(entry.name) in indexed, **query.summary()})
    return {
        "index": {"inputs": len(expected), "indexed": len(indexed),
                  "skipped_with_reason": sum(reason is not None for reason in reasons.values()),
                  "as_expected": sum(file["as_expected"] for file in files),
                  "unexpected_indexed": sorted(indexed - set(expected)), **indexing.summary(), "files": files},
        "queries": {"inputs": len(queries), **_outcome_counts(queries), "files": queries},
    }


def _outcome_counts(summaries: list[dict]) -> dict:
    outcomes = [summary["outcome"] for summary in summaries]
    return {key: outcomes.count(outcome) for key, outcome in
            [("ok", "ok"), ("refused", "refused in one line"), ("crashes", "crash"), ("hangs", "hang")]}


# ---- code in weight files -----------------------------------------------------------------------

def code_execution(world: Path, work: Path) -> dict:
    """Every loader that takes a file is handed the archive; the marker file must never appear."""
    proof, marker = work / "proof-it-runs", work / "code-ran"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script / load are deprecated, not gone
        torch.jit.script(_Payload(str(proof))).save(str(work / "proof.pt"))
        torch.jit.load(str(work / "proof.pt"))
        archive = work / "evil.pt"
        torch.jit.script(_Payload(str(marker))).save(str(archive))
    dataset = work / "code-world"
    shutil.copytree(world, dataset)
    index = dataset / ".vqa-search"
    image = next((dataset / "Images").iterdir())
    loaders = {
        "index --pretrained": [*CLI, "index", str(dataset), "--model", TINY_MODEL, "--pretrained", str(archive),
                               "--out", str(work / "evil-index"), "--workers", "1", "--quiet"],
        "regions --detector-weights": [*CLI, "regions", str(dataset), "--detector", "frcnn-mobilenet",
                                       "--detector-weights", str(archive), "--workers", "1", "--quiet"],
        "query --reranker": [*CLI, "query", "a red circle", "--index", str(index), "--reranker", str(archive)],
        "ask --head": [*CLI, "ask", str(image), "what color is the circle?", "--index", str(index),
                       "--head", str(archive)],
    }
    results = []
    for loader, command in loaders.items():
        outcome = run(command, work)
        results.append({"loader": loader, "code_ran": marker.exists(), **outcome.summary()})
        marker.unlink(missing_ok=True)
    return {"payload_runs_under_torch_jit_load": proof.exists(), "loaders": len(results),
            "code_executions": sum(r["code_ran"] for r in results), **_outcome_counts(results), "runs": results}


def crafted_files(world: Path, work: Path) -> dict:
    """The test suite's crafted re-ranker and head files (tests/test_artifacts.py), each given to the CLI.

    They run in one interpreter through typer's CliRunner, the CLI's own entry point: 40 fresh
    processes would spend three minutes importing torch. A hang is the whole batch's timeout.
    """
    reranker = save_reranker(randomized(CrossAttentionReranker(RERANKER), seed=0), work / "reranker.safetensors")
    head = tiny_answerer().save(work / "head.safetensors", record={})
    image = next((world / "Images").iterdir())
    cases = []
    for kind, valid, params in [("re-ranker", reranker, RERANKER_FILES), ("head", head, HEAD_FILES)]:
        for param in params:
            edit, fragment = param.values
            path = rewrite(valid, work / f"{kind}-{param.id}.safetensors", edit)
            args = (["query", "a red circle", "--index", str(world / ".vqa-search"), "--reranker", str(path)]
                    if kind == "re-ranker" else ["ask", str(image), "what color is the circle?", "--head", str(path)])
            cases.append({"file": f"{kind} {param.id}", "flaw": fragment, "args": args})
    batch = run([sys.executable, "-c", CLI_IN_ONE_PROCESS], work, stdin=json.dumps([c["args"] for c in cases]))
    answers = [json.loads(line) for line in batch.stdout.splitlines()]
    results = []
    for case, answer in zip(cases, answers):
        outcome = Run(answer["exit"], "", answer["stderr"], 0.0)
        results.append({"file": case["file"], "outcome": outcome.outcome,
                        "names_the_flaw": case["flaw"] in answer["stderr"], "stderr": _excerpt(answer["stderr"])})
    results += [{"file": case["file"], "outcome": "hang" if batch.hang else "crash", "names_the_flaw": False,
                 "stderr": _excerpt(batch.stderr)} for case in cases[len(answers):]]
    return {"files": len(results), **_outcome_counts(results),
            "names_the_flaw": sum(r["names_the_flaw"] for r in results), "seconds": round(batch.seconds, 1),
            "runs": results}


# ---- the index on disk ----------------------------------------------------------------------------

def _committed(index: Path) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """Image paths and vectors, caption texts and vectors of the generation the manifest names."""
    gen = IndexDir(index).generation(IndexDir(index).read_manifest()["generation"])
    return (pq.read_table(gen / "images.parquet").column("path").to_pylist(), np.load(gen / "image_embeddings.npy"),
            pq.read_table(gen / "captions.parquet").column("text").to_pylist(), np.load(gen / "caption_embeddings.npy"))


def equals_clean(index: Path, clean: Path) -> bool:
    """Same image paths and captions in the same order, and the same vectors to TOLERANCE."""
    if not IndexDir(index).exists():
        return False
    paths, vectors, texts, text_vectors = _committed(index)
    clean_paths, clean_vectors, clean_texts, clean_text_vectors = _committed(clean)
    return (paths == clean_paths and texts == clean_texts
            and np.allclose(vectors, clean_vectors, rtol=0, atol=TOLERANCE)
            and np.allclose(text_vectors, clean_text_vectors, rtol=0, atol=TOLERANCE))


def _pending_rows(index: Path) -> tuple[list[str], list[str]]:
    """Image paths and caption texts of the complete shards in pending/, duplicates included."""
    pending = IndexDir(index).pending

    def rows(kind: str, column: str) -> list[str]:
        return [row for shard in sorted(pending.glob(f"{kind}-*.parquet"))
                for row in pq.read_table(shard, columns=[column]).column(column).to_pylist()]

    return rows("images", "path"), rows("captions", "text")


def _leftovers(index: Path) -> dict:
    """What a finished run should not leave: staging folders, pending shards, half-written temp files."""
    return {"staging": len(list(index.glob(".staging-*"))), "pending": IndexDir(index).pending.exists(),
            "temp_files": len(list(index.rglob(".*.tmp")))}


def _size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


# ---- kill -9 -------------------------------------------------------------------------------------

def _build_command(dataset: Path, rows_per_shard: int) -> list[str]:
    return [sys.executable, "-c", BUILD_WITH_SMALL_SHARDS, str(dataset), TINY_MODEL, str(rows_per_shard)]


def clean_run(world: Path, rows_per_shard: int, work: Path) -> Run:
    """The reference index, built in one uninterrupted run."""
    return run(_build_command(world, rows_per_shard), work)


@dataclass
class KillMoment:
    """When to kill: once `shards` more shards are complete, or, when `shards` is 0, as soon as the
    commit starts (a staging folder or a new generation appears)."""

    shards: int

    def describe(self) -> str:
        return f"after {self.shards} new shards" if self.shards else "as the commit starts"

    def reached(self, index: Path, shards_before: int) -> bool:
        if self.shards:
            return _shard_count(index) >= shards_before + self.shards
        return any(index.glob(".staging-*")) or any(index.glob("gen-*"))


def _shard_count(index: Path) -> int:
    return len(list(IndexDir(index).pending.glob("*-*.parquet")))


def _kill_moment(rng: random.Random, index: Path, clean_index: Path, rows_per_shard: int) -> KillMoment:
    """A quarter of the kills hit the commit; the others a random shard boundary of the work left."""
    if rng.random() < 0.25:
        return KillMoment(0)
    images, _, texts, _ = _committed(clean_index)
    kept_images, kept_texts = _pending_rows(index)
    left = len(images) - len(set(kept_images)) + len(set(texts)) - len(set(kept_texts))
    return KillMoment(rng.randint(1, max(1, -(-left // rows_per_shard) - 1)))


def kill_and_resume(world: Path, clean_index: Path, work: Path, kills: int, rows_per_shard: int, seed: int) -> dict:
    """SIGKILL `index` at random moments of its work (a shard boundary or the commit), each run
    resuming the last one. Polling the disk every 2 ms, the kill lands a few milliseconds after
    the moment: inside the next shard or inside the commit.

    Once a run gets past the commit, its round ends: one more run lets it finish, the index must
    equal the clean one, and the next round starts from nothing, so every kill hits a run with work left.
    """
    dataset = work / "killed"
    shutil.copytree(world, dataset, ignore=shutil.ignore_patterns(".vqa-search"))
    index = dataset / ".vqa-search"
    rng = random.Random(seed)
    rounds, current = [], []
    kept: tuple[set[str], set[str]] = (set(), set())
    for _ in range(kills):
        moment = _kill_moment(rng, index, clean_index, rows_per_shard)
        record, kept = _kill_once(dataset, index, moment, rows_per_shard, kept)
        current.append(record)
        if IndexDir(index).exists():
            rounds.append(_finish_round(dataset, index, clean_index, rows_per_shard, current, kept[0], work))
            current, kept = [], (set(), set())
    if current or not rounds:
        rounds.append(_finish_round(dataset, index, clean_index, rows_per_shard, current, kept[0], work))
    records = [record for one in rounds for record in one["runs"]]
    phases = [record["phase"] for record in records]
    finals = [one["final"] for one in rounds]
    return {
        "runs": len(records), "kills": sum(r["outcome"] == "killed" for r in records),
        "rows_per_shard": rows_per_shard, "seed": seed,
        "phases": {phase: phases.count(phase) for phase in dict.fromkeys(phases)},
        "resumes_that_lost": sum(r["lost"] > 0 for r in records),
        "resumes_that_duplicated": sum(r["duplicated"] > 0 for r in records)
                                   + sum(bool(f["embedded_again"]) for f in finals),
        "resumes_refused": sum(r["outcome"] == "refused in one line" for r in records),
        "crashes": sum(r["outcome"] == "crash" for r in records) + sum(f["outcome"] == "crash" for f in finals),
        "rounds": len(rounds), "rounds_equal_to_clean": sum(f["equals_clean"] for f in finals),
        "rounds_with_leftovers": sum(bool(f["staging"] or f["pending"] or f["temp_files"]) for f in finals),
        "hangs": sum(f["outcome"] == "hang" for f in finals),
        "detail": rounds,
    }


def _kill_once(dataset: Path, index: Path, moment: KillMoment, rows_per_shard: int,
               kept: tuple[set[str], set[str]]) -> tuple[dict, tuple[set[str], set[str]]]:
    """One run killed at MOMENT, and what the index holds afterwards against KEPT, what it held before."""
    rows_before = sum(map(len, _pending_rows(index)))
    shards_before = _shard_count(index)
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(_build_command(dataset, rows_per_shard), env=ENV, stdout=subprocess.DEVNULL,
                                   stderr=stderr, text=True)
        while process.poll() is None and not moment.reached(index, shards_before):
            if time.perf_counter() - started > TIMEOUT_S:
                break
            time.sleep(0.002)
        exit_code = process.poll()
        if exit_code is None:
            process.send_signal(signal.SIGKILL)  # the main process only, as `kill -9 PID` does
            process.wait()
        stderr.seek(0)
        errors = stderr.read()
    images, texts = _pending_rows(index)
    now = (set(images), set(texts))
    if IndexDir(index).exists():
        committed_images, _, committed_texts, _ = _committed(index)
        now = (now[0] | set(committed_images), now[1] | set(committed_texts))
    if exit_code is not None:
        outcome = Run(exit_code, "", errors, time.perf_counter() - started).outcome
    elif errors.strip():  # it had failed already, and the kill caught it on its way out
        outcome = "crash" if "Traceback" in errors else "refused in one line"
    else:
        outcome = "killed"
    record = {
        "kill": moment.describe(), "killed_after_s": round(time.perf_counter() - started, 2), "outcome": outcome,
        "phase": _phase(outcome, index, rows_before, len(images), len(texts)),
        "pending_images": len(images), "pending_captions": len(texts),
        "lost": len(kept[0] - now[0]) + len(kept[1] - now[1]),
        "duplicated": len(images) - len(set(images)) + len(texts) - len(set(texts)),
        "staging": len(list(index.glob(".staging-*"))), "exit": exit_code, "stderr": _excerpt(errors),
    }
    return record, now


def _phase(outcome: str, index: Path, rows_before: int, images: int, texts: int) -> str:
    """Where the kill landed, read from what it left on disk."""
    if outcome != "killed":
        return "finished before the kill" if outcome == "ok" else f"{outcome} before the kill"
    if IndexDir(index).exists():
        return "after the commit point"
    if list(index.glob(".staging-*")) or list(index.glob("gen-*")):
        return "while committing"
    if images + texts == rows_before:
        return "start-up (no new shard yet)"
    return "embedding captions" if texts else "embedding images"


def _finish_round(dataset: Path, index: Path, clean_index: Path, rows_per_shard: int, records: list[dict],
                  kept_images: set[str], work: Path) -> dict:
    """Let the last killed run's resume finish; check the index, then remove it for the next round.

    It should embed exactly the images no shard or commit kept: any more were embedded twice.
    """
    final = run(_build_command(dataset, rows_per_shard), work)
    report = json.loads(final.stdout) if final.exit == 0 else {}
    embedded_again = report["embedded_images"] - (report["images"] - len(kept_images)) if report else None
    result = {"runs": records, "final": {**final.summary(), "embedded_images": report.get("embedded_images"),
                                         "embedded_again": embedded_again,
                                         "equals_clean": equals_clean(index, clean_index), **_leftovers(index)}}
    shutil.rmtree(index)
    return result


# ---- disk full -----------------------------------------------------------------------------------

def disk_full(world: Path, clean_index: Path, work: Path, fractions: list[float]) -> dict:
    """The index on a tmpfs of FRACTION x the clean index's size: it must fail in one line, then resume."""
    if os.geteuid() != 0:
        return {"skipped": "needs root to mount a tmpfs"}
    clean_bytes = _size(clean_index)
    cases = []
    for fraction in fractions:
        mount = work / f"tmpfs-{fraction:g}"
        mount.mkdir()
        size = int(clean_bytes * fraction)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            return {"skipped": f"mount -t tmpfs failed: {mounted.stderr.strip()}"}
        try:
            cases.append(_fill_then_resume(world, clean_index, mount, fraction, size, clean_bytes, work))
        finally:
            subprocess.run(["umount", str(mount)], check=True)
    return {"clean_index_bytes": clean_bytes, "cases": cases}


def _fill_then_resume(world: Path, clean_index: Path, mount: Path, fraction: float, size: int, clean_bytes: int,
                      work: Path) -> dict:
    index = mount / "idx"
    command = [*CLI, "index", str(world), *TINY, "--out", str(index), "--workers", "1", "--quiet", "--json"]
    full = run(command, work)
    kept_images, kept_texts = _pending_rows(index)
    left = _leftovers(index)
    subprocess.run(["mount", "-o", f"remount,size={3 * clean_bytes}", "tmpfs", str(mount)], check=True)
    resumed = run(command, work)
    report = json.loads(resumed.stdout) if resumed.exit == 0 else {}
    return {
        "fraction": fraction, "tmpfs_bytes": size,
        "full": {**full.summary(), "one_line_error": full.one_line_error, **left,
                 "pending_images_kept": len(kept_images), "pending_captions_kept": len(kept_texts)},
        "after_making_room": {**resumed.summary(), "embedded_images": report.get("embedded_images"),
                              "images": report.get("images"), "embedded_captions": report.get("embedded_captions"),
                              "captions": report.get("captions"), "equals_clean": equals_clean(index, clean_index),
                              **_leftovers(index)},
    }


# ---- the run -------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--images", type=int, default=300, help="images of the shapes world")
    parser.add_argument("--kills", type=int, default=10, help="kill -9 then resume, this many times")
    parser.add_argument("--rows-per-shard", type=int, default=16)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.4, 0.9],
                        help="tmpfs sizes, as fractions of the clean index's size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's note that the tiny heads' CLIP is random

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        world = work / "shapes"
        made = run([*CLI, "make-shapes", str(world), "--images", str(args.images), "--seed", str(args.seed), "--quiet"],
                   work)
        if made.exit != 0:
            sys.exit(f"make-shapes failed: {made.stderr}")
        clean = clean_run(world, args.rows_per_shard, work)
        if clean.exit != 0:
            sys.exit(f"the clean index failed: {clean.stderr}")
        clean_index = world / ".vqa-search"
        results = {
            "images": args.images, "clean_index_seconds": round(clean.seconds, 1),
            "hostile": hostile_folder(work),
            "code": code_execution(world, work),
            "crafted": crafted_files(world, work),
            "kill": kill_and_resume(world, clean_index, work, args.kills, args.rows_per_shard, args.seed),
            "disk_full": disk_full(world, clean_index, work, args.fractions),
        }
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["load_average_1min"] = os.getloadavg()[0]
    print_table(results)
    if args.json:
        write_json(args.json, results)


def print_table(results: dict) -> None:
    hostile, queries = results["hostile"]["index"], results["hostile"]["queries"]
    code, crafted, kill, disk = results["code"], results["crafted"], results["kill"], results["disk_full"]
    rows = [
        ("hostile folder, indexed", hostile["inputs"], int(hostile["outcome"] == "crash"),
         int(hostile["outcome"] == "hang"),
         f"{hostile['indexed']} indexed, {hostile['skipped_with_reason']} skipped with a reason, "
         f"{hostile['as_expected']}/{hostile['inputs']} as expected"),
        ("hostile files as query image", queries["inputs"], queries["crashes"], queries["hangs"],
         f"{queries['ok']} answered, {queries['refused']} refused in one line"),
        ("TorchScript in weight files", code["loaders"], code["crashes"], code["hangs"],
         f"{code['code_executions']} code executions, {code['refused']} refused in one line "
         f"(payload runs under torch.jit.load: {code['payload_runs_under_torch_jit_load']})"),
        ("crafted re-ranker/head files", crafted["files"], crafted["crashes"], crafted["hangs"],
         f"{crafted['refused']} refused in one line, {crafted['names_the_flaw']} naming the flaw, "
         f"{crafted['ok']} loaded"),
        ("kill -9, then resume", kill["runs"], kill["crashes"], kill["hangs"],
         f"{kill['kills']} killed: {kill['resumes_that_lost']} resumes lost work, "
         f"{kill['resumes_that_duplicated']} duplicated, "
         f"{kill['resumes_refused']} refused in one line; "
         f"{kill['rounds_equal_to_clean']}/{kill['rounds']} final indexes equal the clean one, "
         f"{kill['rounds_with_leftovers']} left files behind"),
    ]
    for case in disk.get("cases", []):
        full, room = case["full"], case["after_making_room"]
        rows.append((f"disk full at {case['fraction']:.0%} of index", 1,
                     int(full["outcome"] == "crash") + int(room["outcome"] == "crash"),
                     int(full["outcome"] == "hang") + int(room["outcome"] == "hang"),
                     f"exit {full['exit']}, one-line error: {full['one_line_error']}, staging left {full['staging']}; "
                     f"then embedded {room['embedded_images']}/{room['images']} images, "
                     f"equals clean: {room['equals_clean']}"))
    if "skipped" in disk:
        rows.append(("disk full", 0, 0, 0, f"skipped: {disk['skipped']}"))
    print(f"{results['images']}-image shapes world, {TINY_MODEL} random weights, {results['seconds']:.0f} s, "
          f"load average {results['load_average_1min']:.1f}")
    print(f"{'part':<30} {'tried':>5} {'crashes':>7} {'hangs':>5}  result")
    for part, tried, crashes, hangs, note in rows:
        print(f"{part:<30} {tried:>5} {crashes:>7} {hangs:>5}  {note}")
    print("kill -9 landed: " + ", ".join(f"{count} {phase}" for phase, count in kill["phases"].items()))


if __name__ == "__main__":
    main()
