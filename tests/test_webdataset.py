"""webdataset tar shards (img2dataset's output) as a dataset: records point into the tars, nothing is
extracted, hostile member names are refused, and an unchanged or merely touched tar embeds nothing again."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import COLOURS, tiny_config, write_photo

from vqa_search.core.images import ImageSkipped, load_rgb_member
from vqa_search.core.store import IndexDir
from vqa_search.indexer.build import BuildConfig, build_index
from vqa_search.indexer.datasets import read_dataset

HOSTILE = {"../escaped.jpg": "unsafe member name (absolute, or with ..): refused",
           "/etc/absolute.jpg": "unsafe member name (absolute, or with ..): refused",
           "link.jpg": "not a regular file in the tar (a link, folder or device)"}


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_shards(root: Path, photos: Path) -> list[bytes]:
    """Two tars of 3 samples ({key}.jpg + .txt + .json) as img2dataset writes them; the second also holds
    hostile members. Returns the image bytes in key order."""
    root.mkdir(parents=True)
    images = []
    for shard in range(2):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as archive:
            for k in range(3):
                key = f"{shard:04d}{k:05d}"
                data = write_photo(photos / f"{key}.png", COLOURS[3 * shard + k]).read_bytes()
                images.append(data)
                add_member(archive, f"{key}.jpg", data)
                add_member(archive, f"{key}.txt", f"a picture, sample {key}\n".encode())
                add_member(archive, f"{key}.json", b'{"url": "http://example.com"}')
            if shard == 1:
                for name in ("../escaped.jpg", "/etc/absolute.jpg"):
                    add_member(archive, name, images[0])
                link = tarfile.TarInfo("link.jpg")
                link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
                archive.addfile(link)
    return images


@pytest.fixture
def shards(tmp_path) -> Path:
    write_shards(tmp_path / "shards", tmp_path / "photos")
    return tmp_path / "shards"


def test_records_point_into_the_tars_and_hostile_members_are_refused(shards, tmp_path):
    before = sorted(p.name for p in tmp_path.rglob("*"))
    data = read_dataset(shards)
    assert data.images == [f"0000{s}.tar/000{s}0000{k}.jpg" for s in range(2) for k in range(3)]
    assert [(c.image, c.text) for c in data.captions] == [
        (path, f"a picture, sample {path.split('/')[1][:-4]}") for path in data.images]
    assert data.unreadable == {f"00001.tar/{name}": reason for name, reason in sorted(HOSTILE.items())}
    for path in data.images:  # a member's bytes, read at its offset, are the photo that went in
        member = data.members[path]
        with open(shards / path.split("/")[0], "rb") as tar:
            tar.seek(member.offset)
            png = tar.read(member.size)
        assert png.startswith(b"\x89PNG") and len(png) == member.size
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing extracted anywhere


def test_a_tar_rewritten_after_listing_is_skipped_not_misread(shards):
    data = read_dataset(shards)
    member = data.members[data.images[0]]
    tar = shards / "00000.tar"
    os.utime(tar, ns=(member.tar_mtime_ns + 10**9, member.tar_mtime_ns + 10**9))
    with pytest.raises(ImageSkipped, match="tar file changed since it was read"):
        load_rgb_member(tar, member)


def test_index_of_shards_equals_the_same_photos_in_a_folder(shards, tmp_path, one_torch_thread):
    report = build_index(shards, BuildConfig(**tiny_config()))
    assert (report.images, report.embedded_images, report.captions) == (6, 6, 6)
    assert {entry["path"] for entry in report.skipped} == {f"00001.tar/{name}" for name in HOSTILE}
    build_index(tmp_path / "photos", BuildConfig(**tiny_config()))  # the naive reference: the same files on disk

    def vectors_by_hash(root: Path) -> dict[str, np.ndarray]:
        index = IndexDir(root / ".vqa-search")
        gen = index.generation(index.read_manifest()["generation"])
        hashes = pq.read_table(gen / "images.parquet").column("sha256").to_pylist()
        return dict(zip(hashes, np.load(gen / "image_embeddings.npy")))

    ours, reference = vectors_by_hash(shards), vectors_by_hash(tmp_path / "photos")
    assert ours.keys() == reference.keys()
    for sha in ours:
        np.testing.assert_array_equal(ours[sha], reference[sha])

    assert build_index(shards, BuildConfig(**tiny_config())).up_to_date  # the members' file states match
    os.utime(shards / "00000.tar")  # touched: its members are hashed again, found, and not embedded
    touched = build_index(shards, BuildConfig(**tiny_config()))
    assert (touched.up_to_date, touched.embedded_images) == (False, 0)

    from vqa_search.align.region_store import RegionSet, compute_regions
    from vqa_search.align.regions import RegionConfig

    settings = {"source": "clip-patches", "workers": 0, "progress": False}
    assert compute_regions(shards, RegionConfig(**settings)).computed == 6  # members read in place here too
    compute_regions(tmp_path / "photos", RegionConfig(**settings))
    ours, reference = RegionSet.open(shards), RegionSet.open(tmp_path / "photos")
    np.testing.assert_array_equal(ours.features(range(6)), reference.features(range(6)))
