"""Dataset reading: caption formats, splits, folder scans and the errors a user can fix."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from vqa_search.core.errors import UserError
from vqa_search.indexer.datasets import IMAGE_EXTENSIONS, Caption, read_dataset, read_split_files, scan_images


def touch(root: Path, *names: str) -> None:
    """Empty files are enough: this module never decodes images."""
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("image", "caption"), *rows])
    return path


def test_image_extensions_are_lower_case():
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


def test_csv_captions_with_commas_and_quotes_round_trip(tmp_path):
    touch(tmp_path / "Images", "a.jpg", "b.jpg")
    rows = [("a.jpg", 'A dog, a "red" ball, and a lake'), ("b.jpg", "  Two cats .  "), ("a.jpg", "It's sunny")]
    write_csv(tmp_path / "captions.txt", rows)

    data = read_dataset(tmp_path)

    assert data.images_dir == tmp_path / "Images"
    assert data.caption_source == tmp_path / "captions.txt"
    assert data.captions == [Caption("a.jpg", 'A dog, a "red" ball, and a lake'), Caption("b.jpg", "Two cats ."),
                             Caption("a.jpg", "It's sunny")]
    assert data.splits == {}
    assert (data.missing_images, data.missing_captions) == (0, 0)


def test_csv_with_bom_and_blank_lines(tmp_path):
    touch(tmp_path / "Images", "a.jpg")
    (tmp_path / "captions.txt").write_bytes("\ufeffimage,caption\n\na.jpg,Café au lait\n\n".encode("utf-8"))

    assert read_dataset(tmp_path).captions == [Caption("a.jpg", "Café au lait")]


def test_token_file_tolerates_copy_suffix_artefact(tmp_path):
    touch(tmp_path / "Flicker8k_Dataset", "x.jpg", "y.jpg")
    write(tmp_path / "Flickr8k.token.txt", "x.jpg#0\tA man .\n\nx.jpg.1#0\tA man again .\ny.jpg#3\t Surf \n")

    data = read_dataset(tmp_path)

    assert data.images_dir == tmp_path / "Flicker8k_Dataset"
    assert data.captions == [Caption("x.jpg", "A man ."), Caption("x.jpg", "A man again ."), Caption("y.jpg", "Surf")]


def test_renamed_token_file_is_recognised_by_its_tab(tmp_path):
    touch(tmp_path / "images", "x.jpg")
    source = write(tmp_path / "my-captions.txt", "x.jpg#0\tA man .\n")

    assert read_dataset(tmp_path, captions=source).captions == [Caption("x.jpg", "A man .")]


def test_karpathy_flickr_json_gives_captions_and_splits(tmp_path):
    touch(tmp_path / "Images", "a.jpg", "b.jpg", "c.jpg", "d.jpg")
    entries = [
        {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "one "}, {"raw": "two"}]},
        {"filename": "b.jpg", "split": "restval", "sentences": [{"raw": "three"}]},
        {"filename": "c.jpg", "split": "val", "sentences": []},
        {"filename": "d.jpg", "split": "test", "sentences": [{"raw": "four"}]},
        {"filename": "gone.jpg", "split": "test", "sentences": [{"raw": "five"}, {"raw": "six"}]},
    ]
    write(tmp_path / "dataset_flickr8k.json", json.dumps({"images": entries, "dataset": "flickr8k"}))
    write(tmp_path / "Flickr_8k.testImages.txt", "a.jpg\n")  # the json's splits win
    write_csv(tmp_path / "captions.txt", [("a.jpg", "ignored: json comes first")])

    data = read_dataset(tmp_path)

    assert data.caption_source == tmp_path / "dataset_flickr8k.json"
    assert data.captions == [Caption("a.jpg", "one"), Caption("a.jpg", "two"), Caption("b.jpg", "three"),
                             Caption("d.jpg", "four")]
    assert data.splits == {"train": ["a.jpg", "b.jpg"], "val": ["c.jpg"], "test": ["d.jpg"]}
    assert (data.missing_images, data.missing_captions) == (1, 2)


def test_karpathy_coco_json_joins_filepath(tmp_path):
    touch(tmp_path, "val2014/COCO_val2014_1.jpg", "train2014/COCO_train2014_2.jpg")
    entries = [
        {"filepath": "val2014", "filename": "COCO_val2014_1.jpg", "split": "val", "sentences": [{"raw": "a bus"}]},
        {"filepath": "train2014", "filename": "COCO_train2014_2.jpg", "split": "restval",
         "sentences": [{"raw": "a cat"}]},
    ]
    write(tmp_path / "dataset_coco.json", json.dumps({"images": entries}))

    data = read_dataset(tmp_path)

    assert data.images == ["train2014/COCO_train2014_2.jpg", "val2014/COCO_val2014_1.jpg"]
    assert data.captions == [Caption("val2014/COCO_val2014_1.jpg", "a bus"),
                             Caption("train2014/COCO_train2014_2.jpg", "a cat")]
    assert data.splits == {"val": ["val2014/COCO_val2014_1.jpg"], "train": ["train2014/COCO_train2014_2.jpg"]}


def test_coco_names_fall_back_to_bare_file_name_when_images_is_the_subfolder(tmp_path):
    touch(tmp_path, "val2014/COCO_val2014_1.jpg")
    entries = [{"filepath": "val2014", "filename": "COCO_val2014_1.jpg", "sentences": [{"raw": "a bus"}]}]
    write(tmp_path / "dataset_coco.json", json.dumps({"images": entries}))

    data = read_dataset(tmp_path, images=tmp_path / "val2014")

    assert data.captions == [Caption("COCO_val2014_1.jpg", "a bus")]
    assert data.missing_images == 0


def test_split_files_map_dev_to_val(tmp_path):
    touch(tmp_path / "Images", "a.jpg", "b.jpg", "c.jpg")
    write(tmp_path / "Flickr_8k.trainImages.txt", "a.jpg\n\nmissing.jpg\n")
    write(tmp_path / "Flickr_8k.devImages.txt", "b.jpg\n")
    write(tmp_path / "Flickr_8k.testImages.txt", "c.jpg\r\n")

    assert read_split_files(tmp_path) == {"train": ["a.jpg", "missing.jpg"], "val": ["b.jpg"], "test": ["c.jpg"]}
    data = read_dataset(tmp_path)
    assert data.splits == {"train": ["a.jpg"], "val": ["b.jpg"], "test": ["c.jpg"]}
    assert data.caption_source is None and data.captions == []
    assert (data.missing_images, data.missing_captions) == (1, 0)


def test_plain_folder_is_scanned_recursively(tmp_path):
    touch(tmp_path, "b.JPG", "a.png", "trip/day1/c.WebP", "trip/d.Jpeg", "notes.txt", "trip/clip.mp4", "noext",
          ".hidden.jpg", ".vqa-search/thumb.jpg", "trip/.cache/e.png")

    data = read_dataset(tmp_path)

    assert data.images_dir == tmp_path
    assert data.images == ["a.png", "b.JPG", "trip/d.Jpeg", "trip/day1/c.WebP"]
    assert scan_images(tmp_path) == (data.images, {})
    assert (data.captions, data.splits, data.caption_source) == ([], {}, None)
    assert (data.missing_images, data.missing_captions) == (0, 0)


def test_captions_for_missing_images_are_counted(tmp_path):
    touch(tmp_path / "Images", "a.jpg")
    write_csv(tmp_path / "captions.txt", [("a.jpg", "kept"), ("b.jpg", "gone 1"), ("b.jpg", "gone 2"),
                                          ("c.jpg", "gone 3")])
    write(tmp_path / "Flickr_8k.trainImages.txt", "a.jpg\nb.jpg\nd.jpg\n")

    data = read_dataset(tmp_path)

    assert data.captions == [Caption("a.jpg", "kept")]
    assert data.splits == {"train": ["a.jpg"]}
    assert (data.missing_images, data.missing_captions) == (3, 3)


def test_overrides_win_over_detection(tmp_path):
    touch(tmp_path / "Images", "detected.jpg")
    touch(tmp_path / "elsewhere", "chosen.jpg")
    write_csv(tmp_path / "captions.txt", [("detected.jpg", "detected")])
    chosen = write_csv(tmp_path / "other.csv", [("chosen.jpg", "chosen")])

    data = read_dataset(str(tmp_path), captions=str(chosen), images=str(tmp_path / "elsewhere"))

    assert (data.root, data.images_dir, data.caption_source) == (tmp_path, tmp_path / "elsewhere", chosen)
    assert (data.images, data.captions) == (["chosen.jpg"], [Caption("chosen.jpg", "chosen")])


@pytest.mark.parametrize("override, message", [
    ({"captions": "nope.txt"}, "caption file not found"),
    ({"images": "nope"}, "images folder not found"),
])
def test_missing_override_paths_are_user_errors(tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        read_dataset(tmp_path, **{key: tmp_path / value for key, value in override.items()})


def test_missing_dataset_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="dataset folder not found"):
        read_dataset(tmp_path / "nope")


@pytest.mark.parametrize("name, text, message", [
    ("captions.txt", "image,caption\na.jpg,ok\n\nb.jpg\n",
     'captions.txt:4: expected 2 fields "image,caption", got 1'),
    ("captions.txt", 'image,caption\na.jpg,"two\nlines"\nb.jpg,x,y\n',
     'captions.txt:4: expected 2 fields "image,caption", got 3'),
    ("captions.txt", "file,text\na.jpg,ok\n", 'captions.txt:1: expected header "image,caption", got "file,text"'),
    ("captions.txt", "image,caption\n,no image\n", "captions.txt:2: empty image name"),
    ("Flickr8k.token.txt", "a.jpg#0\tok\na.jpg#1 no tab\n",
     'Flickr8k.token.txt:2: expected "name.jpg#i<TAB>caption", no tab found'),
    ("Flickr8k.token.txt", "\na.jpg\tno hash\n", 'Flickr8k.token.txt:2: expected "name.jpg#i<TAB>caption", no "#" found'),
    ("dataset_x.json", '{"images": [\n{"filename": "a.jpg",}\n]}', "dataset_x.json:2: not valid JSON"),
    ("dataset_x.json", '{"pictures": []}', 'dataset_x.json: expected an object with an "images" list'),
    ("dataset_x.json", '{"images": [{"filename": "a.jpg", "sentences": []}, {"filename": "b.jpg"}]}',
     'dataset_x.json: images\\[1\\]: expected "filename" and "sentences"'),
])
def test_malformed_caption_files_name_file_and_line(tmp_path, name, text, message):
    write(tmp_path / name, text)
    with pytest.raises(UserError, match=message):
        read_dataset(tmp_path)


def test_non_utf8_caption_file_is_a_user_error(tmp_path):
    (tmp_path / "captions.txt").write_bytes(b"image,caption\na.jpg,caf\xe9\n")
    with pytest.raises(UserError, match="captions.txt: not UTF-8 text"):
        read_dataset(tmp_path)


def test_shared_flickr8k_sample_csv(shared_sample):
    data = read_dataset(shared_sample)

    assert data.caption_source == shared_sample / "captions.txt"
    assert len(data.images) == 300
    assert len(data.captions) == 1500
    assert {split: len(paths) for split, paths in data.splits.items()} == {"train": 200, "val": 50, "test": 50}
    assert (data.missing_images, data.missing_captions) == (7791, 38955)  # 8,091 named, 40,455 rows


def test_shared_flickr8k_sample_token_file_agrees_with_csv(shared_sample):
    root = shared_sample
    from_csv = read_dataset(root)
    from_tokens = read_dataset(root, captions=root / "Flickr8k.token.txt")

    assert from_tokens.captions == from_csv.captions
    assert from_tokens.splits == from_csv.splits
    # The token file also names the "2258277193_586949ec62.jpg.1" artefact, which is not on disk either.
    assert (from_tokens.missing_images, from_tokens.missing_captions) == (7792, 38960)
