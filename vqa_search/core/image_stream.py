"""Decode and preprocess images in worker processes while the model embeds the previous batch."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vqa_search.core.encode import encode_image_batch
from vqa_search.core.images import ImageSkipped, load_rgb
from vqa_search.core.store import FileState, ImageRecord, close_inherited_locks
from vqa_search.core.models import Clip


def default_workers() -> int:
    """Leave one core to the model: on 2 cores one decoder keeps ViT-B-32 fed."""
    return max(1, min(4, (os.cpu_count() or 1) - 1))


@dataclass
class DecodedBatch:
    records: list[ImageRecord]  # every file of the batch, skipped ones with a reason
    # one row per record without a reason, in order; a list when sizes differ (detectors take any size)
    pixels: torch.Tensor | list[torch.Tensor] | None


class _ImageFiles(Dataset):
    def __init__(self, images_dir: Path, records: Sequence[ImageRecord], preprocess: Callable):
        self.images_dir = images_dir
        self.records = records
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        record = self.records[i]
        try:
            loaded = load_rgb(self.images_dir / record.state.path)
        except ImageSkipped as skipped:
            return replace(record, reason=str(skipped)), None
        return replace(record, width=loaded.width, height=loaded.height), self.preprocess(loaded.image)


def _collate(items, stack: bool = True) -> DecodedBatch:
    records = [record for record, _ in items]
    pixels = [tensor for _, tensor in items if tensor is not None]
    if not pixels:
        return DecodedBatch(records, None)
    return DecodedBatch(records, torch.stack(pixels) if stack else pixels)


def decoded_batches(
    images_dir: Path, records: Sequence[ImageRecord], preprocess: Callable, batch_size: int, workers: int,
    stack: bool = True,
) -> Iterator[DecodedBatch]:
    loader = DataLoader(
        _ImageFiles(images_dir, records, preprocess),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=partial(_collate, stack=stack),
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=close_inherited_locks,
        prefetch_factor=4 if workers else None,
    )
    yield from loader


def unindexed_records(paths: Sequence[str]) -> list[ImageRecord]:
    """Records for decoding files outside an index, where file states are never stored."""
    return [ImageRecord(FileState(path, 0, 0), sha256="") for path in paths]


def embed_image_files(
    clip: Clip, images_dir: Path, paths: Sequence[str], batch_size: int, workers: int, progress: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Embed files without writing an index: (vector by path, reason by path for unreadable files)."""
    records = unindexed_records(paths)
    vectors, skipped = {}, {}
    with tqdm(total=len(records), unit="img", desc="images", disable=not progress) as bar:
        for batch in decoded_batches(images_dir, records, clip.preprocess, batch_size, workers):
            embedded = iter(encode_image_batch(clip, batch.pixels) if batch.pixels is not None else ())
            for record in batch.records:
                if record.reason is None:
                    vectors[record.state.path] = next(embedded)
                else:
                    skipped[record.state.path] = record.reason
            bar.update(len(batch.records))
    return vectors, skipped
