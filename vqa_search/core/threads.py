"""Torch threads and decoding processes, sized together so that they never exceed the cores.

Torch's intra-op threads and DataLoader's decoding workers compete for the same cores, and threads
that spin waiting for each other cost more than they compute: on a busy 2-core machine an epoch took
9.2 s with torch's default threads (one per core, beside a decoder) and 0.4 s with one. Every
command that runs a model takes its sizes from `plan_threads`. Importing this module imports no torch.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from vqa_search.core.errors import UserError

MAX_WORKERS = 4  # more decoders than this never kept a model fed faster on the machines measured
THREADS_VARIABLE = "OMP_NUM_THREADS"  # what torch reads at import; also how a user caps it


@dataclass(frozen=True)
class ThreadPlan:
    threads: int  # torch intra-op threads
    workers: int  # decoding processes; 0 decodes in the main process


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), not all the machine has."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def plan_threads(threads: int | None = None, workers: int | None = None, cores: int | None = None) -> ThreadPlan:
    """Threads and decoding workers for a model, together at most `cores` (default: this process's).

    Left out, workers get one core fewer than there are (at most MAX_WORKERS; none on one core) and
    torch the rest; given one, the other gets what is left (at least one thread). Both given are
    used as given.
    """
    cores = max(1, cores or available_cores())
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1 (got {threads})")
    if workers is not None and workers < 0:
        raise UserError(f"--workers must be 0 or more (got {workers})")
    if workers is None:
        workers = max(0, min(MAX_WORKERS, cores - (threads or 1)))
    if threads is None:
        threads = max(1, cores - workers)
    return ThreadPlan(threads=threads, workers=workers)


def default_workers() -> int:
    """Decoding processes when none are asked for: on 2 cores one decoder keeps ViT-B-32 fed."""
    return plan_threads().workers


def threads_from_environment() -> int | None:
    """OMP_NUM_THREADS when a user set it to a positive number: the cap they chose for torch."""
    try:
        value = int(os.environ.get(THREADS_VARIABLE, ""))
    except ValueError:
        return None
    return value if value > 0 else None


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with at most `threads` torch threads, importing no torch to set them.

    Before torch is imported, OMP_NUM_THREADS tells it (so a command that never needs torch, such as
    an unchanged re-index, never loads it). A process that already runs torch with fewer threads (a
    library caller's or a test's choice) keeps them; the previous count is restored afterwards.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        previous_variable = os.environ.get(THREADS_VARIABLE)
        os.environ[THREADS_VARIABLE] = str(threads)
        try:
            yield
        finally:
            if previous_variable is None:
                os.environ.pop(THREADS_VARIABLE, None)
            else:
                os.environ[THREADS_VARIABLE] = previous_variable
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(min(threads, previous))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
