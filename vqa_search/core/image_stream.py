"""The reader of the decode → encode runner: image files in, decoded and preprocessed batches out.

Decoding runs in DataLoader worker processes while the model encodes the previous batch. Each file
is named by an `ImageRef`: its path and a key the caller chooses (a relative path, a file state, a
position), handed back unchanged with the result, so nothing here knows what the caller stores.
A ref may also name a member of an uncompressed tar (webdataset shards): its bytes are read in
place at their offset, never extracted. An unreadable file is not an error: it comes back in order
with the reason `load_rgb` gave. `decode` is the one way a ref becomes pixels, here and on Ray.

Everything here is a plain picklable object without global state: the reader holds what to read and
how, and builds its DataLoader only when iterated (see `core/runner.py` for the other roles).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from vqa_search.core.images import ImageSkipped, TarMember, load_rgb, load_rgb_member
from vqa_search.core.store import close_inherited_locks


@dataclass(frozen=True)
class ImageRef:
    """A file to read, and the caller's key for it (returned with its result or skip reason)."""

    path: Path  # the image file, or the tar that holds `member`
    key: Any
    member: TarMember | None = None


@dataclass(frozen=True)
class DecodedItem:
    key: Any
    width: int = 0  # as load_rgb gives them (EXIF-rotated, aspect ratio bounded); 0 when unreadable
    height: int = 0
    reason: str | None = None  # why the file could not be read; None when it was


@dataclass
class DecodedBatch:
    items: list[DecodedItem]  # every file of the batch in reading order, unreadable ones with a reason
    # one row per readable item, in order; a list when sizes differ (detectors take any size); None if none
    pixels: torch.Tensor | list[torch.Tensor] | None

    @property
    def readable(self) -> list[DecodedItem]:
        return [item for item in self.items if item.reason is None]


@dataclass
class ImageReader:
    """Reader role: decodes `refs` in order in `workers` processes (0: in this one), `batch_size` at a time."""

    refs: Sequence[ImageRef]
    preprocess: Callable[[Any], torch.Tensor]  # PIL RGB image -> tensor; runs in the workers, so picklable
    batch_size: int
    workers: int
    stack: bool = True  # False: pixels stay a list (preprocessing that keeps each image's size)

    def __len__(self) -> int:
        return len(self.refs)

    def __iter__(self) -> Iterator[DecodedBatch]:
        loader = DataLoader(
            _DecodedFiles(self.refs, self.preprocess),
            batch_size=self.batch_size,
            num_workers=self.workers,
            collate_fn=partial(_collate, stack=self.stack),
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=close_inherited_locks,  # a worker must not keep an index's lock past a kill -9
            prefetch_factor=4 if self.workers else None,
        )
        yield from loader


class _DecodedFiles(Dataset):
    def __init__(self, refs: Sequence[ImageRef], preprocess: Callable):
        self.refs = refs
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> tuple[DecodedItem, torch.Tensor | None]:
        return decode(self.refs[i], self.preprocess)


def decode(ref: ImageRef, preprocess: Callable) -> tuple[DecodedItem, torch.Tensor | None]:
    """One file (or tar member) decoded and preprocessed, or its skip reason."""
    try:
        if ref.member is None:
            loaded = load_rgb(ref.path)
        else:
            loaded = load_rgb_member(ref.path, ref.member)
    except ImageSkipped as skipped:
        return DecodedItem(ref.key, reason=str(skipped)), None
    return DecodedItem(ref.key, loaded.width, loaded.height), preprocess(loaded.image)


def _collate(decoded: list[tuple[DecodedItem, torch.Tensor | None]], stack: bool = True) -> DecodedBatch:
    items = [item for item, _ in decoded]
    pixels = [tensor for _, tensor in decoded if tensor is not None]
    if not pixels:
        return DecodedBatch(items, None)
    return DecodedBatch(items, torch.stack(pixels) if stack else pixels)
