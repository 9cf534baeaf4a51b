"""Indexes larger than memory: vqa-search's on-disk IVF-PQ against autofaiss, on the same vectors in one run.

    flock -x /tmp/cpu.lock python benchmarks/index_scale.py --sizes 1000000 --json benchmarks/results/index_scale.json
    python benchmarks/index_scale.py --stats my_embeddings.npy      # the same statistics for real vectors

For each size: vectors written in chunks straight to a memory-mapped .npy under --data (not the repo),
1,000 held-out queries from the same distribution, their exact top-10 (computed block by block),
then per tool, each in a fresh process: build time and peak RSS (getrusage of that process), index
size on disk, and in another fresh process recall@10 against the exact top-10 and single-query p50.

vqa-search: `choose_for_budget(n, 512, --max-index-memory, "ivfpq-ondisk")` (the on-disk form even where
the vectors would fit the budget, as `vqa-search index --index-type ivfpq-ondisk` does) picks nlist, PQ bytes; the index is trained
on a sample, filled block by block from the memory map and merged into one .ivfdata
(`faiss_index.build_ondisk`), nprobe is then measured down to recall@10 >= 0.95 on 200 held-out
indexed vectors (`tune_nprobe`, part of the build time, as in `vqa-search index`); queries read it
memory-mapped and re-score the PQ candidates with the stored vectors (also memory-mapped).
autofaiss 2.18.0 runs in its own virtualenv (--autofaiss-python) with the same index memory budget,
--autofaiss-ram as the memory it may build with, and max_index_query_time_ms=10; --autofaiss-key says which index it builds: `own` is its own choice
(get_optimal_index_keys_v2), `same` the same IVF/PQ sizes as vqa-search's in autofaiss's form
in autofaiss's own form, OPQ{m}_{y},IVF{nlist}_HNSW32,PQ{m}x8 with its y = (min(d/m, 6) + 1)·m), whose nprobe and efSearch autofaiss then tunes itself.

The vectors: a mixture of CLUSTERS anisotropic Gaussians around a common direction, normalised onto
the sphere. Cluster sizes follow a power law (Zipf, exponent 1: a few big topics, a long tail).
Centres are the common direction (CLIP embeddings share one: a random pair's cosine is far above 0)
plus a spread drawn with a power-law spectrum (eigenvalue j ~ j^-SPECTRUM_DECAY in a random basis);
each cluster's noise has that spectrum too, rescaled per dimension by the cluster's own log-normal
factors, so no two clusters have the same shape. `stats` (printed and stored) gives the spectrum
slope, the dimensions holding 90 % of the variance, and the mean cosine of random pairs and of
nearest neighbours, for comparing with real embeddings (`--stats FILE.npy`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DIM = 512
CLUSTERS = 4000
ZIPF = 1.0
SPECTRUM_DECAY = 1.0
COMMON = 0.75  # weight of the shared direction in a centre
SPREAD = 0.65  # weight of a centre's own direction
NOISE = 0.55  # norm of a vector's noise against its unit-ish centre
QUERIES = 1000
K = 10
CHUNK = 131_072
SEED = 0
BUDGET = "4G"


# ---- the synthetic vectors --------------------------------------------------------------------------

class Mixture:
    def __init__(self, seed: int = SEED):
        rng = np.random.default_rng(seed)
        self.basis, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
        self.basis = self.basis.astype(np.float32)
        spectrum = np.arange(1, DIM + 1, dtype=np.float32) ** (-SPECTRUM_DECAY / 2)  # std: sqrt of eigenvalues
        self.spectrum = spectrum / np.linalg.norm(spectrum)
        common = rng.standard_normal(DIM).astype(np.float32)
        common /= np.linalg.norm(common)
        own = (rng.standard_normal((CLUSTERS, DIM)).astype(np.float32) * self.spectrum) @ self.basis
        own /= np.linalg.norm(own, axis=1, keepdims=True)
        self.centres = COMMON * common + SPREAD * own
        self.shapes = np.exp(rng.normal(0.0, 0.5, (CLUSTERS, DIM))).astype(np.float32) * self.spectrum
        self.shapes /= np.linalg.norm(self.shapes, axis=1, keepdims=True)
        weights = np.arange(1, CLUSTERS + 1, dtype=np.float64) ** -ZIPF
        self.weights = weights / weights.sum()

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        cluster = rng.choice(CLUSTERS, size=n, p=self.weights)
        noise = (rng.standard_normal((n, DIM), dtype=np.float32) * self.shapes[cluster]) @ self.basis
        vectors = self.centres[cluster] + NOISE * noise
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def write_vectors(path: Path, n: int, mixture: Mixture, seed: int) -> float:
    """n vectors in chunks straight into a memory-mapped .npy; the seconds it took."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    partial = path.with_suffix(".partial.npy")
    out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(n, DIM))
    for start in range(0, n, CHUNK):
        out[start : start + CHUNK] = mixture.sample(min(CHUNK, n - start), rng)
        if start // CHUNK % 16 == 15:
            out.flush()
    out.flush()
    del out
    os.replace(partial, path)
    return time.perf_counter() - started


def stats(path: Path, sample: int = 20_000) -> dict:
    """Spectrum and cosine statistics of a sample of the vectors in an .npy file."""
    from vqa_search.core.faiss_index import read_rows

    n = len(np.load(path, mmap_mode="r"))
    rows = np.sort(np.random.default_rng(1).choice(n, size=min(n, sample), replace=False))
    x = read_rows(path, rows)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    eig = np.linalg.eigvalsh(np.cov((x - x.mean(0)).T))[::-1]
    eig = np.clip(eig, 1e-12, None)
    ranks = np.arange(1, 101)
    slope = float(-np.polyfit(np.log(ranks), np.log(eig[:100]), 1)[0])
    cumulative = np.cumsum(eig) / eig.sum()
    half = len(x) // 2
    random_pairs = float(np.mean(np.sum(x[:half] * x[half : 2 * half], axis=1)))
    sims = x[:2000] @ x.T
    sims[np.arange(min(2000, len(x))), np.arange(min(2000, len(x)))] = -1
    return {"sample": len(x), "spectrum_slope_top100": round(slope, 3),
            "dims_for_90pct_variance": int(np.searchsorted(cumulative, 0.9) + 1),
            "mean_cosine_random_pair": round(random_pairs, 3),
            "mean_cosine_nearest_neighbour_in_sample": round(float(sims.max(1).mean()), 3),
            "norm_of_mean": round(float(np.linalg.norm(x.mean(0))), 3)}


# ---- children: one process per build and per search, so getrusage is theirs alone -------------------

def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_build_vqa(data: Path, out: Path, budget: str) -> dict:
    from vqa_search.core import faiss_index as fi
    from vqa_search.core.memory import parse_memory

    vectors = data / "vectors.npy"
    n = len(np.load(vectors, mmap_mode="r"))
    started = time.perf_counter()
    spec = fi.choose_for_budget(n, DIM, parse_memory(budget), "ivfpq-ondisk")
    out.mkdir(parents=True, exist_ok=True)
    built, stages = fi.build_ondisk_measured(vectors, spec, out, "images")
    seconds = time.perf_counter() - started
    (out / "spec.json").write_text(json.dumps(built.to_json()))
    return {"build_seconds": seconds, "stages": stages, "peak_rss_bytes": peak_rss(),
            "index_bytes": (out / "images.faiss").stat().st_size + (out / "images.ivfdata").stat().st_size,
            "params": built.to_json(), "block_rows": fi.block_rows(DIM, spec.budget_bytes)}


def child_search_vqa(data: Path, out: Path) -> dict:
    from vqa_search.core import faiss_index as fi

    spec = fi.IndexSpec.from_json(json.loads((out / "spec.json").read_text()))
    index = fi.open_ondisk(out / "images.faiss", data / "vectors.npy", spec)
    result = _timed_queries(lambda q: fi.search(index, q, K)[1], data)
    curve = []  # the same queries at other nprobe values: what the chosen one trades
    for nprobe in sorted({max(1, spec.nprobe // 4), max(1, spec.nprobe // 2), spec.nprobe * 2}):
        index.nprobe = nprobe
        point = _timed_queries(lambda q: fi.search(index, q, K)[1], data)
        curve.append({"nprobe": nprobe, "recall_at_10": point["recall_at_10"], "p50_ms": point["p50_ms"]})
    return {**result, "nprobe_curve": curve}


def _timed_queries(search, data: Path) -> dict:
    queries = np.load(data / "queries.npy")
    truth = np.load(data / "truth.npy")
    found, times = [], []
    for query in queries:
        started = time.perf_counter()
        ids = search(query[None])
        times.append(time.perf_counter() - started)
        found.append(ids[0])
    recall = float(np.mean([len(set(f[:K]) & set(t[:K])) / K for f, t in zip(found, truth)]))
    return {"recall_at_10": recall, "p50_ms": float(np.median(times) * 1000),
            "p90_ms": float(np.percentile(times, 90) * 1000), "search_peak_rss_bytes": peak_rss()}


def child_build_autofaiss(data: Path, out: Path, budget: str, key: str, vqa_params: dict, ram: str) -> dict:
    from autofaiss import build_index
    from autofaiss.external.optimize import get_optimal_index_keys_v2

    n = len(np.load(data / "vectors.npy", mmap_mode="r"))
    own = get_optimal_index_keys_v2(n, DIM, budget)[0]
    m = vqa_params["pq_bytes"]
    index_key = own if key == "own" else f"OPQ{m}_{(min(DIM // m, 6) + 1) * m},IVF{vqa_params['nlist']}_HNSW32,PQ{m}x8"
    embeddings = out / "embeddings"
    embeddings.mkdir(parents=True, exist_ok=True)
    link = embeddings / "vectors.npy"
    if not link.exists():
        link.symlink_to((data / "vectors.npy").resolve())
    started = time.perf_counter()
    _, infos = build_index(embeddings=str(embeddings), index_path=str(out / "knn.index"),
                           index_infos_path=str(out / "infos.json"), index_key=index_key, metric_type="ip",
                           max_index_memory_usage=budget, current_memory_available=ram,
                           max_index_query_time_ms=10.0, nb_cores=os.cpu_count())
    seconds = time.perf_counter() - started
    return {"build_seconds": seconds, "peak_rss_bytes": peak_rss(), "index_bytes": (out / "knn.index").stat().st_size,
            "params": {"index_key": index_key, "own_choice": own, "index_param": (infos or {}).get("index_param")}}


def child_search_autofaiss(data: Path, out: Path) -> dict:
    import faiss

    index = faiss.read_index(str(out / "knn.index"))
    params = json.loads((out / "infos.json").read_text()).get("index_param")
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)
    return _timed_queries(lambda q: index.search(q, K)[1], data)


CHILDREN = {"build-vqa": child_build_vqa, "search-vqa": child_search_vqa,
            "build-autofaiss": child_build_autofaiss, "search-autofaiss": child_search_autofaiss}


def run_child(python: str, name: str, *args: str) -> dict:
    command = [python, __file__, "--child", name, *args]
    print("$", " ".join(command), flush=True)
    # OpenMP threads that sleep instead of spinning at barriers: a busy machine otherwise slows FAISS 5x
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": f"exit {done.returncode}", "output": done.stdout[-2000:]}
    return json.loads(lines[-1])


# ---- the run ------------------------------------------------------------------------------------------

def prepare(data: Path, n: int) -> dict:
    from vqa_search.core.faiss_index import exact_neighbours, memory_mapped_blocks

    data.mkdir(parents=True, exist_ok=True)
    mixture = Mixture()
    timings = {}
    if not (data / "vectors.npy").exists():
        timings["generate_seconds"] = write_vectors(data / "vectors.npy", n, mixture, seed=SEED + 1)
    if not (data / "queries.npy").exists():
        np.save(data / "queries.npy", mixture.sample(QUERIES, np.random.default_rng(SEED + 2)))
    if not (data / "truth.npy").exists():
        started = time.perf_counter()
        _, truth = exact_neighbours(np.load(data / "queries.npy"), memory_mapped_blocks(data / "vectors.npy", 500_000), K)
        np.save(data / "truth.npy", truth)
        timings["exact_top10_seconds"] = time.perf_counter() - started
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--data", type=Path, default=Path("/tmp/index_scale"))
    parser.add_argument("--budget", default=BUDGET, help="--max-index-memory of both tools")
    parser.add_argument("--tools", default="vqa-search,autofaiss")
    parser.add_argument("--autofaiss-python", default="/root/race-venvs/autofaiss/bin/python")
    parser.add_argument("--autofaiss-key", choices=("own", "same"), default="same")
    parser.add_argument("--autofaiss-ram", default="16G", help="autofaiss's current_memory_available (it refuses "
                        "to build when that is the index budget itself)")
    parser.add_argument("--json", type=Path, help="results file; rows of other sizes in it are kept")
    parser.add_argument("--stats", type=Path, help="only print the statistics of this .npy file")
    parser.add_argument("--table", action="store_true", help="only print the README table of --json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, *rest = args.child
        if name == "build-autofaiss":
            rest = [*rest[:4], json.loads(rest[4]), rest[5]]
        print(json.dumps(CHILDREN[name](*[Path(a) if i < 2 else a for i, a in enumerate(rest)])), flush=True)
        return
    if args.stats:
        print(json.dumps(stats(args.stats), indent=2))
        return
    if args.table:
        print(table(json.loads(args.json.read_text())))
        return
    results = json.loads(args.json.read_text()) if args.json and args.json.exists() else {"rows": []}
    results.update({"dim": DIM, "k": K, "queries": QUERIES, "budget": args.budget, "cores": os.cpu_count(),
                    "mixture": {"clusters": CLUSTERS, "zipf": ZIPF, "spectrum_decay": SPECTRUM_DECAY,
                                "common": COMMON, "spread": SPREAD, "noise": NOISE},
                    "command": "python benchmarks/index_scale.py " + " ".join(sys.argv[1:])})
    tools = args.tools.split(",")
    for n in (int(size) for size in args.sizes.split(",")):
        data = args.data / f"n{n}"
        kept = next((r for r in results["rows"] if r["n"] == n), {})  # other tools' results of an earlier run
        row = {**kept, "n": n, **prepare(data, n), "data_stats": stats(data / "vectors.npy")}
        print(json.dumps(row), flush=True)
        if "vqa-search" in tools:
            row["vqa-search"] = run_child(sys.executable, "build-vqa", str(data), str(data / "vqa"), args.budget)
            if "error" not in row["vqa-search"]:
                row["vqa-search"].update(run_child(sys.executable, "search-vqa", str(data), str(data / "vqa")))
            print(json.dumps(row["vqa-search"]), flush=True)
        if "autofaiss" in tools:
            params = (row.get("vqa-search") or {}).get("params") or _vqa_params(n, args.budget)
            key = args.autofaiss_key
            built = run_child(args.autofaiss_python, "build-autofaiss", str(data), str(data / f"autofaiss-{key}"),
                              args.budget, key, json.dumps(params), args.autofaiss_ram)
            if "error" not in built:
                built.update(run_child(args.autofaiss_python, "search-autofaiss", str(data),
                                       str(data / f"autofaiss-{key}")))
            row[f"autofaiss-{key}"] = built
            print(json.dumps(built), flush=True)
        results["rows"] = [r for r in results["rows"] if r["n"] != n] + [row]
        results["rows"].sort(key=lambda r: r["n"])
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2) + "\n")


def table(results: dict) -> str:
    """The README's table: one line per size and tool."""
    lines = ["| vectors | tool | index | build | peak RSS (build) | on disk | recall@10 | query p50 | RSS (queries) |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in results["rows"]:
        for tool in ("vqa-search", "autofaiss-same", "autofaiss-own"):
            got = row.get(tool)
            if not got:
                continue
            if "error" in got:
                lines.append(f"| {row['n']:,} | {tool} | failed: {got['error']} | | | | | | |")
                continue
            params = got["params"]
            index = (f"IVF{params['nlist']},PQ{params['pq_bytes']} on disk, nprobe {params['nprobe']}, "
                     f"top 100 re-scored" if tool == "vqa-search" else f"{params['index_key']} ({params.get('index_param')})")
            lines.append(f"| {row['n']:,} | {tool} | {index} | {got['build_seconds']:.0f} s | "
                         f"{_bytes(got['peak_rss_bytes'])} | {_bytes(got['index_bytes'])} | "
                         f"{got.get('recall_at_10', float('nan')):.3f} | {got.get('p50_ms', float('nan')):.2f} ms | "
                         f"{_bytes(got.get('search_peak_rss_bytes', 0))} |")
    return "\n".join(lines)


def _bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _vqa_params(n: int, budget: str) -> dict:
    from vqa_search.core.faiss_index import choose_for_budget
    from vqa_search.core.memory import parse_memory

    return choose_for_budget(n, DIM, parse_memory(budget), "ivfpq-ondisk").to_json()


if __name__ == "__main__":
    main()
