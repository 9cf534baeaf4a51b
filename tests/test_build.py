"""Index building: on-disk format, incremental updates, bad input, locking."""

from __future__ import annotations

import json
import os

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import COLOURS, tiny_config, write_photo

from vqa_search import Index
from vqa_search.core.errors import UserError
from vqa_search.indexer import build as build_module
from vqa_search.core.store import IndexDir


def _generation(index_dir):
    manifest = json.loads((index_dir / "manifest.json").read_text())
    return manifest, index_dir / f"gen-{manifest['generation']:06d}"


def test_build_returns_the_opened_index_and_its_report(photos):
    index = Index.build(photos, **tiny_config())
    assert isinstance(index, Index) and index.dir.path == photos / ".vqa-search"
    assert index.report.embedded_images == 6 and index.image_paths == [f"photo_{i}.png" for i in range(6)]
    assert Index.open(photos).report is None  # only a build has one


def test_index_files_are_open_formats(photos):
    report = Index.build(photos, **tiny_config()).report
    assert (report.images, report.captions, report.embedded_images, report.embedded_captions) == (6, 12, 6, 12)
    manifest, gen = _generation(photos / ".vqa-search")
    assert manifest["model"] == {"model": "vqa-tiny", "pretrained": "none", "sha256": None}
    assert manifest["counts"] == {"images": 6, "captions": 12, "skipped": 0}
    assert manifest["index"]["images"]["type"] == "flat"
    assert manifest["dataset"]["images_dir"] == "../Images"
    images = pq.read_table(gen / "images.parquet").to_pydict()
    assert images["path"] == [f"photo_{i}.png" for i in range(6)]
    assert images["width"] == [48] * 6 and images["height"] == [40] * 6
    captions = pq.read_table(gen / "captions.parquet").to_pydict()
    assert captions["image_id"] == [i // 2 for i in range(12)]
    assert captions["text"][1] == 'the "colour" (220, 30, 30)'
    vectors = np.load(gen / "image_embeddings.npy")
    assert vectors.shape == (6, manifest["dim"]) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert faiss.read_index(str(gen / "images.faiss")).ntotal == 6
    assert faiss.read_index(str(gen / "captions.faiss")).ntotal == 12


def test_rerun_unchanged_embeds_nothing_and_loads_no_model(photos, monkeypatch):
    Index.build(photos, **tiny_config())
    monkeypatch.setattr(build_module, "load_clip", _must_not_be_called)
    report = Index.build(photos, **tiny_config()).report
    assert report.up_to_date and report.embedded_images == 0 and report.embedded_captions == 0


def _must_not_be_called(*args, **kwargs):
    raise AssertionError("the model was loaded for an unchanged folder")


def test_incremental_add_change_delete(photos):
    Index.build(photos, **tiny_config())
    before = Index.open(photos)
    old_vectors = {p: before.embeddings()[i].copy() for i, p in enumerate(before.image_paths)}

    write_photo(photos / "Images" / "new" / "added.png", COLOURS[7])
    write_photo(photos / "Images" / "photo_1.png", COLOURS[8], size=(40, 48))  # changed content
    (photos / "Images" / "photo_2.png").unlink()
    os.utime(photos / "Images" / "photo_3.png", ns=(1, 1))  # touched, same content
    report = Index.build(photos, **tiny_config()).report

    assert report.embedded_images == 2  # the new and the changed photo, nothing else
    assert report.embedded_captions == 0
    after = Index.open(photos)
    assert after.image_paths == ["new/added.png", "photo_0.png", "photo_1.png", "photo_3.png", "photo_4.png",
                                 "photo_5.png"]
    assert len(after.caption_texts) == 10  # photo_2's captions are gone
    for i, path in enumerate(after.image_paths):
        if path in ("photo_0.png", "photo_3.png", "photo_4.png", "photo_5.png"):
            np.testing.assert_array_equal(after.embeddings()[i], old_vectors[path])
    assert not np.allclose(after.embeddings()[2], old_vectors["photo_1.png"])
    assert len(list((photos / ".vqa-search").glob("gen-*"))) == 2  # the live one and its predecessor
    assert not (photos / ".vqa-search" / "pending").exists()


def test_search_finds_the_query_image_first(photos):
    Index.build(photos, **tiny_config())
    index = Index.open(photos / ".vqa-search")
    result = index.search(image=photos / "Images" / "photo_4.png", k=3)
    assert [hit.rank for hit in result.results] == [1, 2, 3]
    assert result.results[0].image == "photo_4.png"
    assert result.results[0].score == pytest.approx(1.0, abs=1e-5)
    assert result.results[0].captions == ["a picture, number 4", 'the "colour" (150, 40, 180)']
    scores = [hit.score for hit in result.results]
    assert scores == sorted(scores, reverse=True)


def test_caption_target_returns_captions_of_the_right_image(photos):
    Index.build(photos, **tiny_config())
    index = Index.open(photos)
    result = index.search(text="a picture, number 2", k=12, target="captions")
    assert len(result.results) == 12
    top = result.results[0]
    assert top.caption == "a picture, number 2" and top.image == "photo_2.png" and top.caption_id == 4
    assert top.score == pytest.approx(1.0, abs=1e-5)


def test_index_is_found_from_a_subfolder(photos, monkeypatch):
    Index.build(photos, **tiny_config())
    monkeypatch.chdir(photos / "Images")
    assert Index.open().dir.path == (photos / ".vqa-search").resolve()


def test_folder_without_captions(tmp_path):
    for i in range(3):
        write_photo(tmp_path / "album" / f"img{i}.jpg", COLOURS[i])
    report = Index.build(tmp_path / "album", **tiny_config()).report
    assert (report.images, report.captions) == (3, 0)
    index = Index.open(tmp_path / "album")
    assert index.search(text="anything", k=2).results[0].caption is None
    with pytest.raises(UserError, match="no caption vectors"):
        index.search(text="anything", target="captions")


def test_bad_files_are_skipped_and_reported(photos):
    images = photos / "Images"
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.png").write_text("not an image")
    full = (images / "photo_0.png").read_bytes()
    (images / "cut.png").write_bytes(full[: len(full) // 2])
    report = Index.build(photos, **tiny_config()).report
    assert report.images == 6
    assert sorted(s["path"] for s in report.skipped) == ["cut.png", "empty.jpg", "notes.png"]
    manifest, _ = _generation(photos / ".vqa-search")
    assert manifest["counts"]["skipped"] == 3
    assert all(s["reason"] for s in manifest["skipped"])
    assert "skipped 3 files" in report.summary()
    # Skipped files are remembered: an unchanged rerun does not try them again.
    assert Index.build(photos, **tiny_config()).report.up_to_date


def test_empty_folder_and_unreadable_folder_are_user_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images in"):
        Index.build(tmp_path / "empty", **tiny_config())
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.jpg").write_text("text")
    with pytest.raises(UserError, match="no readable image"):
        Index.build(tmp_path / "junk", **tiny_config())


def test_second_writer_is_refused(photos):
    with IndexDir(photos / ".vqa-search").lock():
        with pytest.raises(UserError, match="another vqa-search process"):
            Index.build(photos, **tiny_config())


def test_query_with_other_weights_is_refused(photos, tmp_path):
    Index.build(photos, **tiny_config())
    with pytest.raises(UserError, match="was built with vqa-tiny with weights none"):
        Index.open(photos, model="ViT-B-32", pretrained="none")


def test_changed_checkpoint_is_refused(photos, tmp_path):
    import open_clip
    import torch

    checkpoint = tmp_path / "tiny.pt"
    torch.save(open_clip.create_model("vqa-tiny").state_dict(), checkpoint)
    Index.build(photos, **tiny_config(pretrained=str(checkpoint)))
    torch.save(open_clip.create_model("vqa-tiny").state_dict(), checkpoint)  # other random weights
    with pytest.raises(UserError, match="changed since the index"):
        Index.open(photos).search(text="a dog")


@pytest.mark.parametrize("kwargs, message", [
    ({"text": "  "}, "query text is empty"),
    ({"text": "dog", "k": 0}, "k must be at least 1"),
    ({"text": "dog", "target": "videos"}, "unknown target"),
    ({}, "either a query text or --image"),
    ({"image": "/nowhere.jpg"}, "query image not found"),
])
def test_query_mistakes(photos, kwargs, message):
    Index.build(photos, **tiny_config())
    with pytest.raises(UserError, match=message):
        Index.open(photos).search(**kwargs)


def test_ivf_index_with_nprobe(tmp_path):
    for i in range(80):
        write_photo(tmp_path / "many" / f"{i:03d}.png", tuple((i * 37 + c * 91) % 256 for c in range(3)))
    Index.build(tmp_path / "many", **tiny_config(index_type="ivf"))
    manifest, _ = _generation(tmp_path / "many" / ".vqa-search")
    spec = manifest["index"]["images"]
    assert spec["type"] == "ivf" and spec["nlist"] >= 2 and spec["nprobe"] >= 1
    index = Index.open(tmp_path / "many")
    everything = index.search(image=tmp_path / "many" / "005.png", k=5, nprobe=spec["nlist"])
    assert everything.results[0].image == "005.png"


def test_nprobe_is_one_search_s_own():
    from vqa_search.core.faiss_index import IndexSpec, build_faiss, search

    vectors = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
    index = build_faiss(vectors, IndexSpec("ivf", nlist=32, nprobe=1))
    queries = vectors[:50] + 0.5
    stored = search(index, queries, 10)
    everything = search(index, queries, 10, nprobe=32)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    assert (everything[1] == exact).all() and not (stored[1] == exact).all()
    assert index.nprobe == 1 and (search(index, queries, 10)[1] == stored[1]).all()


def test_open_searcher_survives_a_new_commit(photos):
    Index.build(photos, **tiny_config())
    searcher = Index.open(photos)
    write_photo(photos / "Images" / "late.png", COLOURS[9])
    Index.build(photos, **tiny_config())
    assert len(searcher.search(text="a dog", k=10).results) == 6  # still the generation it opened
    assert len(Index.open(photos).search(text="a dog", k=10).results) == 7
