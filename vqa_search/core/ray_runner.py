"""The decode → encode runner on a Ray cluster: `core/runner.py`'s roles as a Ray Data pipeline.

    driver: refs (path, tar offset) ──▶ decode tasks (CPU) ──▶ mapper actors (model loaded once each,
    a GPU each with --gpus-per-actor) ──▶ results stream back ──▶ the writer, here, in reading order

- Reader: `image_stream.decode`, the local runner's own, in Ray tasks. On CPU-only actors Ray fuses
  this step into the actors' tasks (same resources): each actor decodes the batches it encodes, so
  pixels never cross processes; with GPUs the decoding runs in separate CPU tasks feeding them.
- Mapper: the caller's mapper object, put once in Ray's object store and loaded once per actor
  (`ray.get` in the actor's constructor), so every actor runs exactly the weights the driver checked
  and no worker needs a checkpoint or model cache of its own. With a GPU the actor moves it there
  (`mapper.to(device)`, when the mapper has it). It travels as the driver loaded it: a driver with a
  GPU would ship CUDA tensors that CPU-only actors cannot load, so run the driver on a node without
  one (the usual head node) or with CUDA_VISIBLE_DEVICES= set.
- Rows carry each ref's position and the caller's key (a mapper may read it: regions look up
  given boxes by path); results come back with the position, and the driver hands its own key on.
- Writer: stays on the driver. Workers never write: they return results and the driver's writer
  (the index's or the region sets' `ShardWriter`) writes the shards, so the commit is the local
  runner's. Ray restarts a killed actor and retries its tasks (Ray Data's default max_restarts=-1,
  max_task_retries=-1); a retried batch could reach the driver twice, so the driver passes each
  position to the writer once and skips repeats: no image is written twice. A driver that dies
  keeps what its writer flushed, and the next run computes only what no shard holds.

Only refs and keys go out and results come back: no pixels cross the driver. The
commit (and, for the index, the FAISS build) stays on the driver. Ray is imported only here, only
when run: it is an optional extra (`pip install 'vqa-search[ray]'`).
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vqa_search.core.errors import UserError

if TYPE_CHECKING:
    from vqa_search.core.image_stream import ImageReader
    from vqa_search.core.runner import Mapper, Writer

RUNNERS = ("local", "ray")
NO_MEMBER = -1  # the offset column of a plain file (not a tar member)


@dataclass(frozen=True)
class RayRunner:
    """Where and how wide to run on Ray; `run(..., runner=None)` runs in this process instead."""

    address: str | None = None  # None: RAY_ADDRESS, else a Ray started on this machine
    actors: int | None = None  # mapper actors; None: one per GPU (with gpus_per_actor), else one per CPU
    gpus_per_actor: float = 0.0


def choose_runner(name: str, address: str | None = None, actors: int | None = None,
                  gpus_per_actor: float | None = None) -> RayRunner | None:
    """The command-line choice (--runner, --ray-address, --actors, --gpus-per-actor), checked before any work."""
    if name not in RUNNERS:
        raise UserError(f"--runner must be one of {', '.join(RUNNERS)} (got {name!r})")
    if name == "local":
        given = [flag for flag, value in (("--ray-address", address), ("--actors", actors),
                                          ("--gpus-per-actor", gpus_per_actor)) if value is not None]
        if given:
            raise UserError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --runner ray")
        return None
    if importlib.util.find_spec("ray") is None:
        raise UserError("--runner ray needs Ray, which is not installed: pip install 'vqa-search[ray]'")
    if actors is not None and actors < 1:
        raise UserError(f"--actors must be at least 1 (got {actors})")
    if gpus_per_actor is not None and gpus_per_actor < 0:
        raise UserError(f"--gpus-per-actor must be 0 or more (got {gpus_per_actor})")
    return RayRunner(address, actors, gpus_per_actor or 0.0)


def run_on_ray(reader: ImageReader, mapper: Mapper, writer: Writer, runner: RayRunner, progress: bool = False,
               desc: str = "images") -> Writer:
    """`core.runner.run` on Ray: the same `writer.add` calls, in the same order, then `writer.close()`."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext
    from tqdm import tqdm

    from vqa_search.core.image_stream import DecodedItem

    refs = reader.refs
    bar = tqdm(total=len(refs), unit="img", desc=desc, disable=not progress, smoothing=0.1)
    try:
        if not refs:
            return writer
        _connect(runner)
        context = DataContext.get_current()
        context.execution_options.preserve_order = True  # the writer sees reading order, as locally
        context.enable_progress_bars = False  # ours counts what the writer received
        context.print_on_execution_start = False
        context.enable_fallback_to_arrow_object_ext_type = True  # the caller's keys are Python objects
        actors = runner.actors or _default_actors(runner.gpus_per_actor)
        mapper_ref = ray.put(mapper)  # held here for the whole run, so a restarted actor can load it again
        rows = [_ref_row(i, ref) for i, ref in enumerate(refs)]
        batches = (
            ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / reader.batch_size))
            .map_batches(_Decode(reader.preprocess), batch_size=reader.batch_size, batch_format="numpy")
            .map_batches(_MapperActor, fn_constructor_args=([mapper_ref], runner.gpus_per_actor > 0, reader.stack),
                         batch_size=reader.batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=actors),
                         num_cpus=1, num_gpus=runner.gpus_per_actor or None)
        )
        written = set()
        for batch in batches.iter_batches(batch_size=None, batch_format="numpy"):
            for i, width, height, reason, result in _unpacked(batch):
                if i in written:  # a retried batch after a lost actor: already written
                    continue
                written.add(i)
                writer.add(DecodedItem(refs[i].key, width, height, reason), result)
                bar.update(1)
        if len(written) != len(refs):
            raise RuntimeError(f"Ray returned {len(written)} of {len(refs)} images")
    finally:
        writer.close()  # on Ctrl-C or a failed run too: what was written is kept
        bar.close()
    return writer


def _connect(runner: RayRunner) -> None:
    """Join the cluster at `runner.address` (or RAY_ADDRESS), else start Ray on this machine; once per process."""
    import ray

    if ray.is_initialized():
        return
    try:
        if runner.address is not None or os.environ.get("RAY_ADDRESS"):
            ray.init(address=runner.address, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, log_to_driver=False)
    except ConnectionError as error:
        raise UserError(f"cannot reach the Ray cluster at {runner.address or 'RAY_ADDRESS'}: {error}") from None


def _default_actors(gpus_per_actor: float) -> int:
    """One actor per GPU share, else one per CPU (torch runs one thread in each)."""
    import ray

    resources = ray.cluster_resources()
    if gpus_per_actor > 0:
        actors = int(resources.get("GPU", 0) // gpus_per_actor)
        if actors < 1:
            raise UserError(f"--gpus-per-actor {gpus_per_actor}: the Ray cluster has {resources.get('GPU', 0):g} GPUs")
        return actors
    return max(1, int(resources.get("CPU", 1)))


def _ref_row(i: int, ref) -> dict:
    member = ref.member
    return {"i": i, "key": ref.key, "path": str(ref.path), "offset": member.offset if member else NO_MEMBER,
            "size": member.size if member else 0, "tar_bytes": member.tar_bytes if member else 0,
            "tar_mtime_ns": member.tar_mtime_ns if member else 0}


@dataclass
class _Decode:
    """The reader's decoding as a Ray task: a batch of refs in, pixels (numpy) or skip reasons out."""

    preprocess: Any

    def __call__(self, rows: dict) -> dict:
        import numpy as np

        from vqa_search.core.image_stream import ImageRef, decode
        from vqa_search.core.images import TarMember

        items, pixels = [], []
        for key, path, offset, size, tar_bytes, tar_mtime_ns in zip(
                rows["key"], rows["path"], rows["offset"], rows["size"], rows["tar_bytes"], rows["tar_mtime_ns"]):
            member = TarMember(int(offset), int(size), int(tar_bytes), int(tar_mtime_ns)) if offset != NO_MEMBER else None
            item, tensor = decode(ImageRef(Path(path), key, member), self.preprocess)
            items.append(item)
            pixels.append(tensor.numpy() if tensor is not None else np.zeros(0, np.float32))
        return {"i": rows["i"], "key": _objects([item.key for item in items]), **_item_columns(items),
                "pixels": _objects(pixels)}


class _MapperActor:
    """The mapper in a Ray actor: loaded once (from the object store), then batch after batch."""

    def __init__(self, mapper_ref: list, on_gpu: bool, stack: bool):
        import ray
        import torch

        torch.set_num_threads(1)  # the actor's one CPU; more threads only wait for each other
        self.mapper = ray.get(mapper_ref[0])
        if on_gpu and torch.cuda.is_available() and hasattr(self.mapper, "to"):
            self.mapper = self.mapper.to(torch.device("cuda"))
        self.stack = stack

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        import torch

        from vqa_search.core.image_stream import DecodedBatch, DecodedItem

        # the caller's keys travel with the rows: a mapper may use them (regions look up given boxes by path)
        items = [DecodedItem(key, int(w), int(h), str(r) or None)
                 for key, w, h, r in zip(batch["key"], batch["width"], batch["height"], batch["reason"])]
        pixels = [torch.from_numpy(np.asarray(p)) for item, p in zip(items, batch["pixels"]) if item.reason is None]
        decoded = DecodedBatch(items, (torch.stack(pixels) if self.stack else pixels) if pixels else None)
        with torch.no_grad():
            results = list(self.mapper(decoded)) if pixels else []
        if len(results) != len(pixels):
            raise ValueError(f"{type(self.mapper).__name__} gave {len(results)} results for {len(pixels)} images")
        parts = [_parts(result) for result in results]
        width = len(parts[0]) if parts else 1
        readable = iter(parts)
        per_item = [next(readable) if item.reason is None else (np.zeros(0, np.float32),) * width for item in items]
        columns = {f"result_{k}": _objects([p[k] for p in per_item]) for k in range(width)}
        is_tuple = bool(results) and isinstance(results[0], tuple)
        return {"i": batch["i"], **_item_columns(items), **columns, "is_tuple": np.full(len(items), is_tuple)}


def _parts(result) -> tuple:
    """A mapper's result for one image as numpy arrays: an array or tensor, or a tuple of them."""
    import numpy as np
    import torch

    values = result if isinstance(result, tuple) else (result,)
    return tuple(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for v in values)


def _item_columns(items: list) -> dict:
    import numpy as np

    return {"width": np.array([item.width for item in items], np.int32),
            "height": np.array([item.height for item in items], np.int32),
            "reason": np.array([item.reason or "" for item in items], dtype=object)}


def _objects(arrays: list) -> Any:
    """A column of per-row arrays (Ray Data stores them as fixed- or variable-shaped tensors)."""
    import numpy as np

    column = np.empty(len(arrays), dtype=object)
    for row, array in enumerate(arrays):  # one by one: a slice assignment would broadcast equal shapes
        column[row] = array
    return column


def _unpacked(batch: dict):
    """(position, width, height, reason or None, result or None) per row of an actor's output batch."""
    results = sorted((name for name in batch if name.startswith("result_")), key=lambda name: int(name[7:]))
    for row in range(len(batch["i"])):
        reason = str(batch["reason"][row]) or None
        parts = tuple(batch[name][row] for name in results)
        result = None if reason is not None else parts if batch["is_tuple"][row] else parts[0]
        yield int(batch["i"][row]), int(batch["width"][row]), int(batch["height"][row]), reason, result
