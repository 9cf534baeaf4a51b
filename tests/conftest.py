"""Shared fixtures: a tiny random CLIP and small photo folders generated on the fly."""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from vqa_search.core.identity import TINY_MODEL

# ONNX exports (core/backends.py) go to a cache of this test session, never the user's: set before any
# test runs, so the commands tests start in subprocesses inherit it. Each weights' export is made once.
os.environ["VQA_SEARCH_CACHE"] = tempfile.mkdtemp(prefix="vqa-search-test-cache-")

# The 300-photo Flickr8k sample (Images/, captions.txt, Flickr8k.token.txt, split files): where the
# environment variable says, else ../shared/flickr8k-sample beside the repository.
SAMPLE_VARIABLE = "VQA_SEARCH_FLICKR8K_SAMPLE"
SHARED_SAMPLE = Path(os.environ.get(SAMPLE_VARIABLE) or
                     Path(__file__).resolve().parents[1].parent / "shared" / "flickr8k-sample").expanduser()
COLOURS = [(220, 30, 30), (30, 200, 40), (30, 60, 220), (240, 220, 20), (150, 40, 180), (250, 140, 0),
           (20, 200, 200), (240, 240, 240), (20, 20, 20), (120, 80, 40)]


def tiny_config(**overrides) -> dict:
    """BuildConfig fields for fast, deterministic, offline test runs: the PyTorch fp32 reference, whose
    vectors are exact (an image finds itself at 1.0); test_backends.py tests the other backends."""
    return {"model": TINY_MODEL, "pretrained": "none", "workers": 0, "progress": False, "batch_size": 4,
            "backend": "torch", "precision": "fp32", **overrides}


def write_photo(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (48, 40)) -> Path:
    """A distinct picture per colour: a coloured square on a gradient, so embeddings differ."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    for x in range(size[0]):
        image.putpixel((x, 0), (x * 5 % 256, 0, 0))
    image.save(path)
    return path


def write_captions(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second intra-op thread, and on a busy 2-core machine the two
    spin waiting for each other: test_finetune.py took 219 s with two threads next to one busy
    process, 11 s with one; a small detector forward 2 s instead of 20 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def our_log(caplog) -> Iterator[pytest.LogCaptureFixture]:
    """caplog for the package's logger, which the CLI detaches from the root logger once a CLI test has run."""
    logger = logging.getLogger("vqa_search")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="vqa_search")
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture
def shared_sample() -> Path:
    """The 300 real Flickr8k photos with the full caption files; absent from users' clones."""
    if not SHARED_SAMPLE.is_dir():
        pytest.skip(f"shared Flickr8k sample not found at {SHARED_SAMPLE} (set {SAMPLE_VARIABLE} to its folder)")
    return SHARED_SAMPLE


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A Flickr8k-shaped folder: Images/ with 6 photos and captions.txt with 2 captions each."""
    return photos_folder(tmp_path / "photos")


def photos_folder(root: Path) -> Path:
    """The `photos` fixture's folder, at `root`."""
    rows = []
    for i, colour in enumerate(COLOURS[:6]):
        name = f"photo_{i}.png"
        write_photo(root / "Images" / name, colour)
        rows += [(name, f"a picture, number {i}"), (name, f'the "colour" {colour}')]
    write_captions(root / "captions.txt", rows)
    return root


def make_serve_world(root: Path, images: int = 40) -> Path:
    """A shapes world indexed with the tiny random CLIP, with patch-token regions, a re-ranker at
    INDEX/reranker.safetensors and an (untrained) answer head at root/head.safetensors: all `serve` reads."""
    from test_rerank import trained_like  # the stage-2 tests' random re-ranker

    from vqa_search.align.region_store import RegionSet, compute_regions
    from vqa_search.align.regions import RegionConfig
    from vqa_search.align.reranker import save_reranker
    from vqa_search.indexer.build import BuildConfig, build_index
    from vqa_search.retrieval.searcher import Index
    from vqa_search.shapes import ShapesConfig, make_shapes
    from vqa_search.vqa.answerer import Answerer
    from vqa_search.vqa.answers import AnswerVocab
    from vqa_search.vqa.heads import AnswerHead, HeadConfig

    make_shapes(root, ShapesConfig(images=images, size=32, seed=5), progress=False)
    build_index(root, BuildConfig(**tiny_config()))
    compute_regions(root, RegionConfig(source="clip-patches", workers=0, progress=False))
    index = Index.open(root)
    save_reranker(trained_like(index, RegionSet.open(root)), index.dir.path / "reranker.safetensors")
    vocab = AnswerVocab(["yes", "no", "red", "blue", "circle", "2"])
    torch.manual_seed(0)
    head = AnswerHead(HeadConfig("baseline", answers=len(vocab.answers), embed_dim=index.embeddings().shape[1],
                                 hidden=16))
    Answerer(head, vocab, index.clip, None, "bce").save(root / "head.safetensors", record={})
    return root


@contextlib.contextmanager
def running_server(app) -> Iterator[str]:
    """uvicorn serving `app` on a free loopback port in a thread; yields its base URL, stops on exit."""
    import socket
    import threading

    import uvicorn

    listening = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
    thread.start()
    try:
        for _ in range(600):
            if server.started:
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{listening.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listening.close()


@pytest.fixture(scope="session")
def serve_world(tmp_path_factory) -> Path:
    """One indexed shapes world for the read-only `serve` tests (tests that change files make their own)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return make_serve_world(tmp_path_factory.mktemp("serve") / "shapes")
    finally:
        torch.set_num_threads(threads)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(os.environ["VQA_SEARCH_CACHE"], ignore_errors=True)
