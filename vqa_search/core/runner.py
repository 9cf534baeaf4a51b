"""One decode → encode loop, in three roles wired by `run` (after clip-retrieval's `clip_inference`).

- reader (`core/image_stream.ImageReader`): image references in, batches of decoded, preprocessed
  pixels out, unreadable files in order with their reason;
- mapper: a batch's pixels in, one result per readable item out (`ClipImageMapper`: CLIP vectors;
  elsewhere region features, a tower's frozen prefix stream, the pixels themselves);
- writer: every item in reading order, with its result or its skip reason (`Collector` keeps them
  in memory; the index and the region sets write shards).

The roles are plain picklable objects without global state, so that another engine can run them
elsewhere; `run` is the one loop, here in this process with a progress bar, or with `runner=RayRunner(...)`
as a Ray Data pipeline on a cluster (`core/ray_runner.py`): decoding and the mapper run on the
workers, the writer stays here, so features choose the engine by passing one argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
from tqdm import tqdm

from vqa_search.core.encode import encode_image_batch
from vqa_search.core.image_stream import DecodedBatch, DecodedItem, ImageReader
from vqa_search.core.models import Clip
from vqa_search.core.ray_runner import RayRunner, run_on_ray


class Mapper(Protocol):
    def __call__(self, batch: DecodedBatch) -> Sequence:
        """One result per `batch.readable` item, in order (a (B, ...) array or tensor, or a list)."""


class Writer(Protocol):
    def add(self, item: DecodedItem, result: Any) -> None:
        """`result` is None exactly when the item could not be read (`item.reason` says why)."""

    def close(self) -> None:
        """Called once at the end, also when the run fails or is interrupted: keep what was done."""


@dataclass
class ClipImageMapper:
    """CLIP image vectors: float32, L2-normalised, one row per readable image."""

    clip: Clip
    encode: Callable[[Clip, torch.Tensor], np.ndarray] = encode_image_batch

    def __call__(self, batch: DecodedBatch) -> np.ndarray:
        return self.encode(self.clip, batch.pixels)

    def to(self, device: torch.device) -> "ClipImageMapper":
        """On `device` (a Ray actor's GPU): the optional method an engine calls on a mapper it shipped."""
        return replace(self, clip=replace(self.clip, model=self.clip.model.to(device), device=device))


@dataclass
class Collector:
    """Writer that keeps everything in memory: results by key in reading order, skip reasons by key."""

    results: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)

    def add(self, item: DecodedItem, result: Any) -> None:
        if item.reason is None:
            self.results[item.key] = result
        else:
            self.skipped[item.key] = item.reason

    def close(self) -> None:
        pass

    def stacked(self) -> np.ndarray | torch.Tensor:
        """The results (at least one) as one array, or tensor for tensor results; row i = the i-th key."""
        rows = list(self.results.values())
        return torch.stack(rows) if isinstance(rows[0], torch.Tensor) else np.stack(rows)


def run(reader: ImageReader, mapper: Mapper, writer: Writer, progress: bool = False, desc: str = "images",
        runner: RayRunner | None = None) -> Writer:
    """Decode, map and write every item of `reader`, in order; returns `writer`. Never trains (no autograd).

    With a `RayRunner` the reader and the mapper run on a Ray cluster and the writer here, with the
    same calls in the same order (see `core/ray_runner.py`).
    """
    if runner is not None:
        return run_on_ray(reader, mapper, writer, runner, progress, desc)
    bar = tqdm(total=len(reader), unit="img", desc=desc, disable=not progress, smoothing=0.1)
    try:
        for batch in reader:
            readable = batch.readable
            with torch.no_grad():
                results = list(mapper(batch)) if readable else []
            if len(results) != len(readable):
                raise ValueError(f"{type(mapper).__name__} gave {len(results)} results for {len(readable)} images")
            rows = iter(results)
            for item in batch.items:
                writer.add(item, None if item.reason is not None else next(rows))
            bar.update(len(batch.items))
    finally:
        writer.close()  # on Ctrl-C too: what was written is kept
        bar.close()
    return writer
