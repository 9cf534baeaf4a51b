"""The decode → encode runner equals decoding, preprocessing and encoding each file alone, in order.

Its roles (reader, mapper, writer) must pickle: a distributed engine will ship them to other processes.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from conftest import write_photo
from torchvision.transforms.functional import to_tensor

from vqa_search.core.encode import encode_image_batch
from vqa_search.core.image_stream import DecodedBatch, DecodedItem, ImageReader, ImageRef
from vqa_search.core.images import ImageSkipped, load_rgb
from vqa_search.core.models import load_clip
from vqa_search.core.identity import TINY_MODEL, resolve_identity
from vqa_search.core.runner import ClipImageMapper, Collector, run

BROKEN = "broken.jpg"


@pytest.fixture(scope="module")
def clip(one_torch_thread):
    return load_clip(resolve_identity(TINY_MODEL, "none"), torch.device("cpu"))


@pytest.fixture
def refs(tmp_path) -> list[ImageRef]:
    """Five files of different sizes, the third one unreadable, keyed by their names."""
    names = ["a.png", "b.png", BROKEN, "c.png", "d.png"]
    for i, name in enumerate(names):
        if name != BROKEN:
            write_photo(tmp_path / name, (40 * i, 200 - 30 * i, 90), size=(48 + 7 * i, 40 + 5 * i))
    (tmp_path / BROKEN).write_bytes(b"not a jpeg at all")
    return [ImageRef(tmp_path / name, name) for name in names]


@dataclass
class MeanColour:
    """A mapper for differently sized images (unstacked, as detectors take them): mean RGB and size."""

    def __call__(self, batch: DecodedBatch) -> torch.Tensor:
        assert isinstance(batch.pixels, list)
        return torch.stack([torch.cat([pixels.mean(dim=(1, 2)), torch.tensor(pixels.shape[1:], dtype=torch.float32)])
                            for pixels in batch.pixels])


@dataclass
class Log:
    """A writer that records every call, in order."""

    calls: list[tuple] = field(default_factory=list)
    closed: bool = False

    def add(self, item: DecodedItem, result) -> None:
        result = None if result is None else np.asarray(result)
        self.calls.append((item.key, item.width, item.height, item.reason, result))

    def close(self) -> None:
        self.closed = True


def _reference(refs: list[ImageRef], preprocess, encode_one) -> list[tuple]:
    """Each file alone: load_rgb, preprocess, a batch of one."""
    calls = []
    for ref in refs:
        try:
            loaded = load_rgb(ref.path)
        except ImageSkipped as skipped:
            calls.append((ref.key, 0, 0, str(skipped), None))
            continue
        result = encode_one([preprocess(loaded.image)])[0]
        calls.append((ref.key, loaded.width, loaded.height, None, np.asarray(result)))
    return calls


def _roles(clip, stack: bool):
    if stack:
        return clip.preprocess, ClipImageMapper(clip), lambda pixels: encode_image_batch(clip, torch.stack(pixels))
    mapper = MeanColour()
    return to_tensor, mapper, lambda pixels: mapper(DecodedBatch([DecodedItem(0, 1, 1)], pixels))


def _assert_same(got: list[tuple], want: list[tuple]) -> None:
    assert [call[:4] for call in got] == [call[:4] for call in want]
    for (*_, result), (*_, expected) in zip(got, want):
        if expected is None:
            assert result is None
        else:
            np.testing.assert_allclose(result, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("stack", [True, False])
def test_runner_equals_each_file_alone(clip, refs, workers, stack):
    preprocess, mapper, encode_one = _roles(clip, stack)
    writer = run(ImageReader(refs, preprocess, batch_size=2, workers=workers, stack=stack), mapper, Log())
    assert writer.closed
    want = _reference(refs, preprocess, encode_one)
    assert want[2][3] == "not an image"  # the broken file is skipped in its place, with load_rgb's reason
    _assert_same(writer.calls, want)


def test_collector_keeps_reading_order_and_reasons(clip, refs):
    found = run(ImageReader(refs, clip.preprocess, batch_size=3, workers=0), ClipImageMapper(clip), Collector())
    assert list(found.results) == ["a.png", "b.png", "c.png", "d.png"]
    assert found.skipped == {BROKEN: "not an image"}
    stacked = found.stacked()
    assert stacked.shape == (4, clip.model.visual.output_dim)
    np.testing.assert_array_equal(stacked[2], found.results["c.png"])


def test_a_batch_of_only_unreadable_files_reaches_the_writer(clip, tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    writer = run(ImageReader([ImageRef(tmp_path / "x.png", 7)], clip.preprocess, 4, 0), ClipImageMapper(clip), Log())
    assert writer.calls == [(7, 0, 0, "empty file", None)]


def test_an_interrupted_run_closes_its_writer(clip, refs):
    seen = []

    def fails_on_second(batch):
        seen.append(batch)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return encode_image_batch(clip, batch.pixels)

    writer = Log()
    with pytest.raises(KeyboardInterrupt):
        run(ImageReader(refs, clip.preprocess, 2, 0), fails_on_second, writer)
    assert writer.closed and [call[0] for call in writer.calls] == ["a.png", "b.png"]


def test_roles_pickle_and_run_the_same_after(clip, refs):
    reader = ImageReader(refs, clip.preprocess, batch_size=2, workers=0)
    mapper, writer = ClipImageMapper(clip), Collector()
    copies = [pickle.loads(pickle.dumps(role)) for role in (reader, mapper, writer)]
    got = run(*copies).results
    want = run(reader, mapper, writer).results
    assert list(got) == list(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-6, rtol=0)
