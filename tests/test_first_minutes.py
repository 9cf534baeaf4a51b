"""Issue 16, "the first five minutes": what a new user meets first says true things in one line.

Re-runs reuse the index's model; unusable weight files are one line naming file and model; files
honour the umask; counts, folders, interrupted builds and ignored options are told as they are; the
README's VQA example is true; contact-sheet labels never overlap; the shared sample can live anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import COLOURS, SAMPLE_VARIABLE, tiny_config, write_photo
from PIL import ImageFont
from typer.testing import CliRunner

from vqa_search import Index
from vqa_search.align.regions import _load_detector_weights
from vqa_search.cli import app
from vqa_search.core.atomic import write_json
from vqa_search.core.errors import UserError
from vqa_search.core.models import load_clip
from vqa_search.core.identity import TINY_MODEL, resolve_identity
from vqa_search.core.store import IndexDir
from vqa_search.indexer import build as build_module
from vqa_search.indexer.datasets import read_dataset
from vqa_search.retrieval.searcher import find_index
from vqa_search.retrieval.sheet import SheetItem, place_labels, write_contact_sheet

REPOSITORY = Path(__file__).resolve().parents[1]
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_checkpoint(path: Path, seed: int = 1, **model_overrides) -> Path:
    torch.manual_seed(seed)
    torch.save(open_clip.create_model(TINY_MODEL, **model_overrides).state_dict(), path)
    return path


def _one_line_exit_2(result) -> str:
    assert result.exit_code == 2, result.output + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded")


# ---- 1. `index` remembers its model ------------------------------------------------------------


def test_rerun_without_model_flags_reuses_the_recorded_model(photos, monkeypatch):
    Index.build(photos, **tiny_config())
    monkeypatch.setattr(build_module, "load_clip", _must_not_load)  # the default weights would need a download
    report = Index.build(photos, workers=0, progress=False).report
    assert report.up_to_date and report.model == "vqa-tiny with weights none"
    result = runner.invoke(app, ["index", str(photos), "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output + result.stderr


def test_rerun_reuses_a_recorded_checkpoint_file_and_embeds_only_what_changed(photos, tmp_path):
    checkpoint = _tiny_checkpoint(tmp_path / "tiny.pt")
    Index.build(photos, **tiny_config(pretrained=str(checkpoint)))
    write_photo(photos / "Images" / "new.png", COLOURS[8])
    report = Index.build(photos, workers=0, progress=False).report
    assert (report.embedded_images, report.reembedded_from) == (1, None)
    assert Index.open(photos).identity.pretrained == str(checkpoint.resolve())
    checkpoint.unlink()
    with pytest.raises(UserError, match=r"checkpoint .*tiny\.pt, which no longer exists.*--pretrained"):
        Index.build(photos, workers=0, progress=False)


def test_other_weights_on_an_existing_index_need_reembed(photos, tmp_path):
    Index.build(photos, **tiny_config())
    checkpoint = _tiny_checkpoint(tmp_path / "tiny.pt")
    with pytest.raises(UserError) as refused:
        Index.build(photos, **tiny_config(pretrained=str(checkpoint)))
    message = str(refused.value)
    assert "\n" not in message and "--reembed" in message and "all 6 images and 12 captions" in message
    assert "holds vqa-tiny with weights none" in message
    assert Index.open(photos).identity.pretrained == "none"  # untouched

    report = Index.build(photos, **tiny_config(pretrained=str(checkpoint), reembed=True)).report
    assert (report.embedded_images, report.embedded_captions) == (6, 12)
    assert report.reembedded_from == "vqa-tiny with weights none"
    assert "re-embedded everything with vqa-tiny with weights" in report.summary()
    assert Index.open(photos).identity.sha256
    assert Index.build(photos, workers=0, progress=False).report.up_to_date  # and it is now the recorded model


def test_cli_names_the_reembed_flag(photos, tmp_path):
    assert runner.invoke(app, ["index", str(photos), "--model", "vqa-tiny", "--pretrained", "none",
                               "--workers", "0", "--quiet"]).exit_code == 0
    line = _one_line_exit_2(runner.invoke(app, ["index", str(photos), "--model", "ViT-B-32", "--pretrained", "none",
                                                "--workers", "0"]))
    assert "--reembed" in line and "ViT-B-32" in line
    result = runner.invoke(app, ["index", str(photos), "--model", "ViT-B-32", "--pretrained", "none", "--reembed",
                                 "--workers", "0", "--batch-size", "4", "--quiet", "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    assert json.loads(result.stdout)["reembedded_from"] == "vqa-tiny with weights none"


def test_an_interrupted_reembedding_is_finished_by_running_index_again(photos, tmp_path):
    Index.build(photos, **tiny_config())
    checkpoint = _tiny_checkpoint(tmp_path / "tiny.pt")
    # What a --reembed run killed before its first shard leaves behind: pending/ with its weights.
    IndexDir(photos / ".vqa-search").shard_writer("images", resolve_identity(TINY_MODEL, str(checkpoint)))
    report = Index.build(photos, workers=0, progress=False).report
    assert report.reembedded_from == "vqa-tiny with weights none" and report.embedded_images == 6
    assert Index.open(photos).identity.sha256


# ---- 2. weight files that do not fit -----------------------------------------------------------


@pytest.mark.parametrize("content", [
    b"hello, this is a text file\n",  # the unpickler's KeyError
    b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01",  # a pickle cut short
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(64),  # a JPEG
    b"",
])
def test_a_file_that_is_no_checkpoint_is_one_line_naming_file_and_model(tmp_path, content):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(UserError) as error:
        load_clip(resolve_identity(TINY_MODEL, str(path)), torch.device("cpu"))
    message = str(error.value)
    assert str(path) in message and "vqa-tiny" in message and "\n" not in message


def test_a_checkpoint_of_another_architecture_is_one_line_naming_file_and_model(tmp_path, photos):
    other = _tiny_checkpoint(tmp_path / "wide.pt", embed_dim=32)
    with pytest.raises(UserError, match=r"wide\.pt does not fit model vqa-tiny: .*other shapes.*--model"):
        load_clip(resolve_identity(TINY_MODEL, str(other)), torch.device("cpu"))
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    for name, path in [("wide.pt", other), ("x.pt", tmp_path / "x.pt")]:
        line = _one_line_exit_2(runner.invoke(app, ["index", str(photos), "--model", "vqa-tiny", "--pretrained",
                                                    str(path), "--workers", "0", "--quiet"]))
        assert name in line and "vqa-tiny" in line


def test_detector_weights_that_are_no_checkpoint_or_do_not_fit(tmp_path):
    model = torch.nn.Linear(3, 2)
    text = tmp_path / "detector.pth"
    text.write_text("hello")
    with pytest.raises(UserError, match=r"detector\.pth \(for detector frcnn-mobilenet\)"):
        _load_detector_weights(model, text, "frcnn-mobilenet")
    wrong = tmp_path / "wrong.pth"
    torch.save({"weight": torch.zeros(5, 5), "bias": torch.zeros(2)}, wrong)
    with pytest.raises(UserError, match=r"wrong\.pth do not fit frcnn-mobilenet: size mismatch for weight") as error:
        _load_detector_weights(model, wrong, "frcnn-mobilenet")
    assert "\n" not in str(error.value)


def test_a_trained_checkpoint_loads_without_the_random_weights_warning(tmp_path, caplog):
    checkpoint = _tiny_checkpoint(tmp_path / "tiny.pt")
    root = logging.getLogger()
    handlers = list(root.handlers)
    with caplog.at_level(logging.WARNING):
        load_clip(resolve_identity(TINY_MODEL, str(checkpoint)), torch.device("cpu"))
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    assert root.handlers == handlers and not root.filters  # nothing left behind on the root logger
    with caplog.at_level(logging.WARNING):  # random weights are still said to be random
        load_clip(resolve_identity(TINY_MODEL, "none"), torch.device("cpu"))
    assert [r for r in caplog.records if "initialized randomly" in r.getMessage()]


# ---- 3. the umask ------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(photos, tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        Index.build(photos, **tiny_config())
        index = Index.open(photos)
        write_contact_sheet([SheetItem(photos / "Images" / "photo_0.png", 1, 0.5, "a picture")], tmp_path / "s.png")
        write_json(tmp_path / "plain.json", {"a": 1})
        from vqa_search.retrieval.export import export_vectors

        export_vectors(index, tmp_path / "vectors.npz")
    finally:
        os.umask(previous)
    written = [p for p in (photos / ".vqa-search").rglob("*") if p.is_file() and p.name != ".lock"]
    written += [tmp_path / "s.png", tmp_path / "plain.json", tmp_path / "vectors.npz"]
    assert len(written) > 8
    modes = {str(p.relative_to(p.parents[1])): oct(p.stat().st_mode & 0o777) for p in written}
    assert set(modes.values()) == {oct(mode)}, modes


# ---- 4. true words -----------------------------------------------------------------------------


def test_report_counts_only_what_was_embedded_and_says_it_in_good_english(tmp_path):
    album = tmp_path / "album"
    write_photo(album / "good.png", COLOURS[0])
    (album / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    report = Index.build(album, **tiny_config()).report
    assert (report.images, report.embedded_images) == (1, 1)
    summary = report.summary()
    assert "indexed 1 image (1 embedded now) and 0 captions (0 embedded now)" in summary
    assert "skipped 1 file: bad.png" in summary
    assert "1 images" not in summary and "1 files" not in summary


def test_a_file_given_as_the_dataset_is_not_called_a_missing_folder(tmp_path):
    photo = write_photo(tmp_path / "one.png", COLOURS[0])
    with pytest.raises(UserError, match=r"must be a folder, and .*one\.png is not one"):
        read_dataset(photo)
    line = _one_line_exit_2(runner.invoke(app, ["index", str(photo), "--model", "vqa-tiny", "--pretrained", "none"]))
    assert "not found" not in line
    with pytest.raises(UserError, match="dataset folder not found"):
        read_dataset(tmp_path / "nowhere")
    (tmp_path / "album").mkdir()
    with pytest.raises(UserError, match="--captions must be a file"):
        read_dataset(tmp_path, captions=tmp_path / "album")
    with pytest.raises(UserError, match="--images must be a folder"):
        read_dataset(tmp_path, images=photo)


def test_an_interrupted_first_build_is_not_called_no_index(photos, monkeypatch):
    index_dir = IndexDir(photos / ".vqa-search")
    index_dir.shard_writer("images", resolve_identity(TINY_MODEL, "none"))  # killed before its commit
    expected = r"an interrupted build of the index at .* is pending: run `vqa-search index DATASET` again to finish it"
    with pytest.raises(UserError, match=expected):
        Index.open(photos)
    monkeypatch.chdir(photos / "Images")
    with pytest.raises(UserError, match=expected):
        find_index()
    line = _one_line_exit_2(runner.invoke(app, ["query", "a picture"]))
    assert "interrupted build" in line
    # ... and running index again, without flags, finishes it with the model it was started with.
    report = Index.build(photos, workers=0, progress=False).report
    assert report.model == "vqa-tiny with weights none" and Index.open(photos).identity.pretrained == "none"


def test_nprobe_on_a_flat_index_is_said_to_be_ignored_once(photos, our_log):
    Index.build(photos, **tiny_config())
    index = Index.open(photos)
    index.search(text="a picture", k=2, nprobe=4)
    index.search(text="a picture", k=2, nprobe=4)
    notes = [r.getMessage() for r in our_log.records if "nprobe" in r.getMessage()]
    assert len(notes) == 1 and "ignored" in notes[0] and "flat" in notes[0]
    our_log.clear()
    index.search(text="a picture", k=2)
    assert not [r for r in our_log.records if "nprobe" in r.getMessage()]


def test_train_vqa_counts_the_images_of_the_train_split(tmp_path, our_log):
    from vqa_search.shapes import ShapesConfig, make_shapes
    from vqa_search.vqa.data import read_vqa
    from vqa_search.vqa.train import VqaTrainConfig, train_vqa

    world = tmp_path / "shapes"
    make_shapes(world, ShapesConfig(images=40, seed=3, size=64), progress=False)
    train_images = {q.image for q in read_vqa(world).split("train")}
    train_vqa(world, tmp_path / "head.safetensors",
              VqaTrainConfig(model=TINY_MODEL, pretrained="none", variant="baseline", epochs=1, batch_size=32,
                             hidden=16, workers=0), progress=False)
    line = next(r.getMessage() for r in our_log.records if r.getMessage().startswith("training a "))
    images = int(re.search(r"about (\d+) images", line).group(1))
    assert images <= len(train_images) < 40, line


# ---- 5. the README's VQA example, and sheet labels ---------------------------------------------


def test_the_readme_ask_example_is_true():
    from vqa_search.shapes import ShapesConfig, plan_images

    readme = (REPOSITORY / "README.md").read_text(encoding="utf-8")
    asks = re.findall(r'vqa-search ask shapes/Images/(\S+) "([^"]+)"', readme)
    assert asks, "the README's shapes ask example is gone"
    assert "vqa-search make-shapes ./shapes\n" in readme  # the world the example is about: the defaults
    specs = {spec.filename: spec for spec in plan_images(ShapesConfig())}
    for image, question in asks:
        asked = [q for q in specs[image].questions if q["question"] == question]
        assert asked, f"{image} has no question {question!r} in vqa.jsonl: its answer is not known to be true"
        assert asked[0]["answer"] in readme.split(f'"{question}"', 1)[1][:400], "the README states the answer"


def test_labels_sharing_a_box_do_not_overlap_and_stay_in_the_picture():
    font = ImageFont.load_default()
    words = "a small red circle to the left of a blue square and two yellow triangles".split()
    shared = (40.0, 30.0, 120.0, 90.0)
    boxes = [(word, shared) for word in words] + [("whole", (0.0, 0.0, 224.0, 224.0)), ("edge", (210, 215, 224, 224))]
    placed = place_labels(boxes, font, (224, 224))
    assert [word for word, _ in placed] == [word for word, _ in boxes]  # all of them, in order
    for i, (_, a) in enumerate(placed):
        assert 0 <= a[0] < a[2] <= 224 and 0 <= a[1] < a[3] <= 224
        for _, b in placed[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    first = placed[0][1]
    assert (first[0], first[1]) == (42, 31)  # the first word sits in its box's corner, the next ones below
    assert placed[1][1][1] == first[3] and placed[1][1][0] == first[0]


def test_more_labels_than_room_drops_some_but_never_overlaps():
    font = ImageFont.load_default()
    placed = place_labels([(f"word{i}", (0.0, 0.0, 10.0, 10.0)) for i in range(200)], font, (64, 64))
    assert 0 < len(placed) < 200
    for i, (_, a) in enumerate(placed):
        for _, b in placed[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])


# ---- 6. the shared sample's location -----------------------------------------------------------


def test_the_shared_sample_location_comes_from_the_environment(tmp_path):
    command = [sys.executable, "-c", "import conftest; print(conftest.SHARED_SAMPLE)"]
    environment = {**os.environ, SAMPLE_VARIABLE: str(tmp_path / "sample")}
    shown = subprocess.run(command, cwd=Path(__file__).parent, env=environment, capture_output=True, text=True,
                           check=True).stdout.strip()
    assert shown == str(tmp_path / "sample")
    del environment[SAMPLE_VARIABLE]
    shown = subprocess.run(command, cwd=Path(__file__).parent, env=environment, capture_output=True, text=True,
                           check=True).stdout.strip()
    assert shown == str(REPOSITORY.parent / "shared" / "flickr8k-sample")
    assert SAMPLE_VARIABLE in (REPOSITORY / "README.md").read_text(encoding="utf-8")
