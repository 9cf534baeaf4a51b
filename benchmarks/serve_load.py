"""Load on `vqa-search serve`: N concurrent clients on loopback for a bounded time.

    # the real run: 8 clients for 60 s on an 8,000-image shapes world, ViT-B-32 with random weights
    python benchmarks/serve_load.py --images 8000 --model ViT-B-32 --clients 8 --seconds 60 \\
        --json benchmarks/results/serve_load.json
    # the same with `vqa-search index` committing a new generation underneath every 10 s
    python benchmarks/serve_load.py --images 8000 --model ViT-B-32 --commit-every 10 --json ...
    # a smoke run in well under two minutes
    python benchmarks/serve_load.py --images 200 --model vqa-tiny --clients 8 --seconds 20 --commit-every 5

The world is made with `make-shapes` and indexed once (kept in --work, reused when it is there); the
server is `vqa-search serve` in its own process on 127.0.0.1, on a port the system picks, so the
clients (threads with keep-alive connections) do not share its interpreter. Each client loops over
a mix of requests: a text search (k=10), "more like this" of an indexed image, and a thumbnail.
Reported: requests per second, p50 / p95 / p99 latency in ms (all and per kind), errors (anything
but 200, or a failed connection), and the same text searches timed in this process without HTTP
before the server starts (`in_process_search`: what the model alone costs on this machine). With
--commit-every S a committer adds one picture and runs `vqa-search index` every S seconds during the
load; the report then counts the commits and the generations the responses came from
(X-Index-Generation), and any error is a failed switch.

Only ever loopback, and bounded: --seconds is at most 600.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import quote

import numpy as np

QUERIES = ["a red circle", "a small blue square to the left of a green star", "two triangles, one green and one yellow",
           "a large purple diamond", "three stars", "a white circle above an orange square", "a gray picture",
           "a yellow star to the right of a red triangle"]
MIX = (("search", 0.6), ("more_like", 0.2), ("thumbnail", 0.2))
MAX_SECONDS = 600


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vqa_search.cli", *args], check=True, capture_output=True, text=True,
                          **kwargs)


def make_world(work: Path, images: int, size: int, model: str) -> Path:
    root = work / f"shapes-{images}-{size}-{model}"
    if not (root / ".vqa-search" / "manifest.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        started = time.perf_counter()
        cli("make-shapes", str(root), "--images", str(images), "--size", str(size), "-q")
        cli("index", str(root), "--model", model, "--pretrained", "none", "-q")
        print(f"made and indexed {images} images in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return root


def start_server(root: Path) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen([sys.executable, "-m", "vqa_search.cli", "serve", "--index", str(root), "--port", "0"],
                               stderr=subprocess.PIPE, text=True)
    line = process.stderr.readline()
    found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if not found:
        process.kill()
        raise SystemExit(f"the server did not start: {line}{process.stderr.read()}")
    port = int(found.group(1))
    threading.Thread(target=process.stderr.read, daemon=True).start()  # keep its pipe from filling
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            status, _, _ = request(http.client.HTTPConnection("127.0.0.1", port, timeout=30), "/api/health")
            if status == 200:
                return process, port
        except OSError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not get ready in 600 s")


def request(connection: http.client.HTTPConnection, path: str) -> tuple[int, bytes, str | None]:
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, response.read(), response.getheader("X-Index-Generation")


class Client(threading.Thread):
    def __init__(self, port: int, index: str, images: int, until: float, seed: int):
        super().__init__(daemon=True)
        self.port, self.index, self.images, self.until = port, index, images, until
        self.random = random.Random(seed)
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.errors: Counter = Counter()
        self.generations: Counter = Counter()

    def path(self) -> tuple[str, str]:
        kind = self.random.choices([kind for kind, _ in MIX], [weight for _, weight in MIX])[0]
        base = f"/api/indexes/{self.index}"
        if kind == "search":
            return kind, f"{base}/search?q={quote(self.random.choice(QUERIES))}&k=10"
        image_id = self.random.randrange(self.images)
        if kind == "more_like":
            return kind, f"{base}/search?image_id={image_id}&k=10"
        return kind, f"{base}/thumbnails/{image_id}"

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while time.monotonic() < self.until:
            kind, path = self.path()
            started = time.perf_counter()
            try:
                status, _, generation = request(connection, path)
            except (OSError, http.client.HTTPException) as error:
                self.errors[type(error).__name__] += 1
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                continue
            self.latencies[kind].append((time.perf_counter() - started) * 1000)
            if status != 200:
                self.errors[str(status)] += 1
            if generation:
                self.generations[generation] += 1
        connection.close()


def committer(root: Path, every: float, until: float, done: list) -> None:
    """Adds a picture and commits a new generation every `every` seconds until the load ends."""
    from PIL import Image

    number = 0
    while time.monotonic() + every < until:
        time.sleep(every)
        Image.new("RGB", (32, 32), (number * 40 % 256, 90, 200)).save(root / "Images" / f"added_{number:04d}.png")
        started = time.perf_counter()
        cli("index", str(root), "-q", env={**os.environ, "OMP_NUM_THREADS": "1"})
        done.append(round(time.perf_counter() - started, 2))
        number += 1


def in_process_search(root: Path, repeats: int = 40) -> dict:
    """The same text searches (k=10) in this process, without HTTP, before the server starts: the
    model's own cost on this machine, which the server's text-search latency is compared with."""
    from vqa_search.retrieval.searcher import Index

    index = Index.open(root)
    index.search(text="warm", k=10)
    latencies = []
    for number in range(repeats):
        started = time.perf_counter()
        index.search(text=QUERIES[number % len(QUERIES)], k=10)
        latencies.append((time.perf_counter() - started) * 1000)
    return percentiles(latencies)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    array = np.asarray(values)
    return {"n": len(values), "p50_ms": round(float(np.percentile(array, 50)), 1),
            "p95_ms": round(float(np.percentile(array, 95)), 1), "p99_ms": round(float(np.percentile(array, 99)), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--size", type=int, default=96, help="Picture side in pixels.")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model, random weights (vqa-tiny: a smoke run).")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--commit-every", type=float, default=None, help="Commit a new generation every S seconds.")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "vqa-search-serve-load")
    parser.add_argument("--json", type=Path, default=None, help="Write the results here (appended to its runs).")
    args = parser.parse_args()
    if not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--seconds must be in (0, {MAX_SECONDS}]")

    root = make_world(args.work, args.images, args.size, args.model)
    reference = in_process_search(root)
    if args.commit_every:  # a copy, so that the kept world stays as made
        live = args.work / "live"
        shutil.rmtree(live, ignore_errors=True)
        shutil.copytree(root, live, symlinks=True)
        root = live
    process, port = start_server(root)
    try:
        name = json.loads(request(http.client.HTTPConnection("127.0.0.1", port), "/api/indexes")[1])["default"]
        request(http.client.HTTPConnection("127.0.0.1", port, timeout=120), f"/api/indexes/{name}/search?q=warm&k=10")
        until = time.monotonic() + args.seconds
        clients = [Client(port, name, args.images, until, seed) for seed in range(args.clients)]
        commits: list[float] = []
        threads = clients + ([threading.Thread(target=committer, args=(root, args.commit_every, until, commits),
                                               daemon=True)] if args.commit_every else [])
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for client in clients:
            client.join(args.seconds + 120)
        elapsed = time.perf_counter() - started  # the clients' time: a commit may still be finishing
        for thread in threads[len(clients):]:
            thread.join(300)
    finally:
        process.terminate()
        process.wait(30)

    latencies = defaultdict(list)
    errors, generations = Counter(), Counter()
    for client in clients:
        for kind, values in client.latencies.items():
            latencies[kind] += values
        errors.update(client.errors)
        generations.update(client.generations)
    every = [value for values in latencies.values() for value in values]
    run = {
        "command": " ".join(["python", "benchmarks/serve_load.py", *sys.argv[1:]]),
        "images": args.images, "size": args.size, "model": args.model, "pretrained": "none",
        "clients": args.clients, "seconds": round(elapsed, 1), "cores": os.cpu_count(),
        "load_average_after": [round(value, 2) for value in os.getloadavg()],  # other work on the machine shows here
        "requests": len(every) + sum(count for kind, count in errors.items() if not kind.isdigit()),
        "requests_per_second": round(len(every) / elapsed, 1),
        "all": percentiles(every), **{kind: percentiles(values) for kind, values in sorted(latencies.items())},
        "in_process_search": reference,
        "errors": dict(errors),
        "commit_every": args.commit_every, "commit_seconds": commits,
        "generations_seen": dict(sorted(generations.items(), key=lambda item: int(item[0]))),
    }
    print(json.dumps(run, indent=2))
    if args.json:
        runs = json.loads(args.json.read_text())["runs"] if args.json.is_file() else []
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": runs + [run]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
