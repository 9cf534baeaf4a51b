"""Folders as people and attackers leave them: every awkward file is indexed or skipped with a reason,
found at discovery, and none hangs the run, crashes it or costs unbounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from conftest import COLOURS, write_photo
from test_images import png_header_only
from vqa_search.core.files import NotARegularFile, open_regular
from vqa_search.core.images import MAX_ASPECT_RATIO, ImageSkipped, load_rgb
from vqa_search.core.identity import sha256_file
from vqa_search.retrieval.searcher import Index

HANG_LIMIT_S = 120  # far above a normal run of a few seconds; reaching it means something blocked
BAD_UTF8 = os.fsdecode(b"bad-\xff-name.jpg")


def _long_png(path: Path, width: int = 1, height: int = 20_000) -> Path:
    """A few hundred bytes that preprocessing would blow up to gigabytes without an aspect-ratio bound."""
    Image.new("RGB", (width, height), (200, 30, 30)).save(path)
    return path


def make_hostile_folder(root: Path) -> dict[str, str | None]:
    """Writes the hostile set; returns shown path -> expected skip reason (None: indexed)."""
    images = root / "Images"
    outside = root / "outside"
    for i, colour in enumerate(COLOURS[:3]):
        write_photo(images / f"good_{i}.png", colour)
    write_photo(outside / "elsewhere.png", COLOURS[4])
    write_photo(outside / "folder" / "inside_linked_folder.png", COLOURS[5])
    write_photo(images / "two\nlines.png", COLOURS[6])
    (images / "linked.png").symlink_to(outside / "elsewhere.png")
    (images / "linked_folder").symlink_to(outside / "folder", target_is_directory=True)
    os.mkfifo(images / "fifo.jpg")
    (images / "zero.jpg").symlink_to("/dev/zero")
    (images / "dangling.jpg").symlink_to(images / "nowhere.jpg")
    (images / "loop_a.jpg").symlink_to(images / "loop_b.jpg")
    (images / "loop_b.jpg").symlink_to(images / "loop_a.jpg")
    write_photo(images / BAD_UTF8, COLOURS[7])
    _long_png(images / "long.png")
    png_header_only(images / "bomb.png", 100_000, 100_000)
    (images / "fake.jpg").write_text("this is not a picture")
    (images / "empty.png").write_bytes(b"")
    good = (images / "good_0.png").read_bytes()
    (images / "truncated.png").write_bytes(good[: len(good) // 2])
    return {
        "good_0.png": None, "good_1.png": None, "good_2.png": None, "two\nlines.png": None,
        "linked.png": None, "long.png": None,
        "fifo.jpg": "not a regular file (a FIFO)",
        "zero.jpg": "not a regular file (a character device)",
        "dangling.jpg": "broken symlink (its target does not exist)",
        "loop_a.jpg": "symlink loop", "loop_b.jpg": "symlink loop",
        "bad-\\xff-name.jpg": "file name is not valid UTF-8 (rename the file to index it)",
        "bomb.png": "decompression bomb (10000000000 pixels > limit 89478485)",
        "fake.jpg": "not an image",
        "empty.png": "empty file",
        "truncated.png": "truncated file",
    }


def _index(dataset: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "vqa_search.cli", "index", str(dataset), "--model", "vqa-tiny",
               "--pretrained", "none", "--workers", "1", "--batch-size", "4", "--json", "--quiet", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=HANG_LIMIT_S)


@pytest.mark.slow
def test_hostile_folder_indexes_what_it_can_and_names_the_rest(tmp_path):
    expected = make_hostile_folder(tmp_path / "hostile")
    run = _index(tmp_path / "hostile")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert {entry["path"]: entry["reason"] for entry in report["skipped"]} == {
        path: reason for path, reason in expected.items() if reason is not None}
    indexed = sorted(path for path, reason in expected.items() if reason is None)
    index = Index.open(tmp_path / "hostile" / ".vqa-search")
    assert sorted(index.image_paths) == indexed  # the linked folder is not entered
    assert index.image_file(index.image_paths.index("two\nlines.png")).is_file()
    assert index.search(text="a picture", k=10).results  # the index answers

    again = _index(tmp_path / "hostile")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["up_to_date"]  # the same skips, found the same way, every run


def test_special_files_never_block_a_reader(tmp_path):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    outcome = {}

    def read_everything():
        for name, read in [("hash", sha256_file), ("decode", load_rgb), ("open", open_regular)]:
            try:
                read(fifo)
            except (NotARegularFile, ImageSkipped) as error:
                outcome[name] = str(error)

    reader = threading.Thread(target=read_everything, daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert outcome == dict.fromkeys(["hash", "decode", "open"], "not a regular file (a FIFO)")
    with pytest.raises(ImageSkipped, match="character device"):
        load_rgb(Path("/dev/zero"))


def test_long_images_are_cropped_to_the_bounded_ratio(tmp_path):
    tall = load_rgb(_long_png(tmp_path / "tall.png", 3, 3000))
    wide = load_rgb(_long_png(tmp_path / "wide.png", 3000, 5))
    panorama = load_rgb(_long_png(tmp_path / "panorama.png", 800, 100))
    assert (tall.width, tall.height) == (3, 3 * MAX_ASPECT_RATIO)
    assert (wide.width, wide.height) == (5 * MAX_ASPECT_RATIO, 5)
    assert (panorama.width, panorama.height) == (800, 100)  # 8:1 is kept whole


def test_middle_of_a_long_image_is_kept(tmp_path):
    """The crop keeps the centre, the only part CLIP's centre crop would have used."""
    image = Image.new("RGB", (10, 400), (0, 0, 0))
    image.paste((255, 0, 0), (0, 195, 10, 205))
    image.save(tmp_path / "striped.png")
    cropped = load_rgb(tmp_path / "striped.png").image
    assert cropped.size == (10, 80)
    assert cropped.getpixel((5, 40)) == (255, 0, 0) and cropped.getpixel((5, 0)) == (0, 0, 0)


_PEAK_MEMORY = """
import resource, sys
from vqa_search.indexer.build import BuildConfig, build_index
build_index(sys.argv[1], BuildConfig(model="vqa-tiny", pretrained="none", workers=0, progress=False))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_rss_mib(dataset: Path) -> float:
    run = subprocess.run([sys.executable, "-c", _PEAK_MEMORY, str(dataset)], capture_output=True, text=True,
                         timeout=HANG_LIMIT_S)
    assert run.returncode == 0, run.stderr
    return int(run.stdout.split()[-1]) / 1024  # Linux reports KiB


@pytest.mark.slow
def test_extreme_aspect_ratio_costs_no_more_memory_than_a_photo(tmp_path):
    """Unbounded, this 1 x 20000 PNG was resized to 64 x 1.28 million pixels for vqa-tiny (+280 MiB
    at peak, measured; +4.1 GB for ViT-B-32's 224 pixels)."""
    write_photo(tmp_path / "normal" / "photo.png", COLOURS[0])
    (tmp_path / "long").mkdir()
    _long_png(tmp_path / "long" / "long.png")
    normal, long = _peak_rss_mib(tmp_path / "normal"), _peak_rss_mib(tmp_path / "long")
    assert long - normal < 100, f"peak RSS {long:.0f} MiB against {normal:.0f} MiB for a normal photo"
