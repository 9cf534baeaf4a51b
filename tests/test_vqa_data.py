"""The JSON-lines and VQA v2 readers on small files written here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_photo
from vqa_search.core.errors import UserError
from vqa_search.vqa.data import read_vqa, report_groups


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture
def jsonl(tmp_path) -> Path:
    write_photo(tmp_path / "pics" / "a.png", (200, 0, 0))
    return write_jsonl(tmp_path / "vqa.jsonl", [
        {"image": "pics/a.png", "question": "is it red?", "answers": ["yes"] * 10, "type": "yes/no",
         "split": "train"},
        {"image": "pics/a.png", "question": "what color is it?", "answers": ["red", "dark red"], "type": "color",
         "answer_type": "other", "split": "val", "question_id": 7},
        {"image": "pics/missing.png", "question": "how many?", "answers": ["2"], "type": "number", "split": "val"},
    ])


def test_jsonl_reader_resolves_images_beside_the_file(jsonl, tmp_path, our_log):
    data = read_vqa(jsonl)
    assert data.source == "jsonl"
    assert [q.image for q in data.questions][:2] == [(tmp_path / "pics" / "a.png").resolve()] * 2
    first, second, third = data.questions
    assert first.answers == ("yes",) * 10 and first.answer_type == "yes/no" and first.category == "yes/no"
    assert (second.answer_type, second.category, second.question_id) == ("other", "color", "7")
    assert third.answer_type == "number"
    assert data.missing_images() == 1
    assert "1 images named by the questions are not on disk" in our_log.text
    assert read_vqa(tmp_path).questions == data.questions  # the folder holding vqa.jsonl


def test_absolute_image_paths_and_questions_without_a_split(tmp_path):
    image = write_photo(tmp_path / "a.png", (0, 200, 0))
    path = write_jsonl(tmp_path / "data" / "q.jsonl", [
        {"image": str(image), "question": "q", "answers": ["yes"], "type": "yes/no"}])
    data = read_vqa(path)
    assert data.questions[0].image == image and data.questions[0].question_id == "1"  # the line number
    assert data.splits() == {"no split": 1}


def test_images_option_moves_the_base_of_relative_paths(jsonl, tmp_path):
    data = read_vqa(jsonl, images=tmp_path / "elsewhere")
    assert data.questions[0].image == (tmp_path / "elsewhere" / "pics" / "a.png").resolve()


def test_splits_and_report_groups(jsonl):
    data = read_vqa(jsonl)
    assert data.splits() == {"train": 1, "val": 2}
    assert [q.question for q in data.split("val")] == ["what color is it?", "how many?"]
    with pytest.raises(UserError, match=r"no 'test' questions .* splits found: train \(1\), val \(2\)"):
        data.split("test")
    assert [report_groups(q) for q in data.questions] == [("yes/no",), ("other", "color"), ("number",)]


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not a VQA record"),
    ('{"image": "a.png", "question": "q"}', "line 2: not a VQA record (missing 'answers')"),
    ('{"image": "a.png", "question": "q", "answers": "yes", "type": "yes/no"}', "non-empty list"),
    ('{"image": "a.png", "question": "q", "answers": ["x"], "type": "shape"}', "give answer_type"),
    ('{"image": "a.png", "question": "q", "answers": ["x"], "type": "shape", "answer_type": "shape"}',
     "line 2: not a VQA record (answer type 'shape' is none of yes/no, number, other)"),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "vqa.jsonl"
    path.write_text(json.dumps({"image": "a.png", "question": "q", "answers": ["yes"], "type": "yes/no"}) + "\n"
                    + line + "\n")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_vqa(path)


def v2_folder(root: Path, layout_subfolders: bool = False, image_dir: str = "val2014") -> Path:
    questions = {"questions": [{"image_id": 42, "question": "What color is the bus?", "question_id": 420},
                               {"image_id": 7, "question": "How many dogs are there?", "question_id": 70},
                               {"image_id": 7, "question": "Is it sunny?", "question_id": 71}]}
    answers = lambda *given: [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(given)]
    annotations = {"annotations": [
        {"question_id": 420, "image_id": 42, "question_type": "what color is the", "answer_type": "other",
         "answers": answers(*["red"] * 10), "multiple_choice_answer": "red"},
        {"question_id": 70, "image_id": 7, "question_type": "how many", "answer_type": "number",
         "answers": answers(*["2"] * 9, "3"), "multiple_choice_answer": "2"},
        {"question_id": 71, "image_id": 7, "question_type": "is it", "answer_type": "yes/no",
         "answers": answers(*["yes"] * 10), "multiple_choice_answer": "yes"},
    ]}
    question_dir = root / "Questions" if layout_subfolders else root
    annotation_dir = root / "Annotations" if layout_subfolders else root
    question_dir.mkdir(parents=True, exist_ok=True)
    annotation_dir.mkdir(parents=True, exist_ok=True)
    (question_dir / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(questions))
    (annotation_dir / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(annotations))
    for image_id in (42, 7):
        write_photo(root / image_dir / f"COCO_val2014_{image_id:012d}.jpg", (0, 0, 200))
    return root


@pytest.mark.parametrize("subfolders", [False, True])
def test_vqa_v2_reader(tmp_path, subfolders):
    root = v2_folder(tmp_path / "vqa2", subfolders)
    data = read_vqa(root)
    assert data.source == "vqa-v2" and data.missing_images() == 0
    assert data.splits() == {"val": 3}
    bus, dogs, sunny = data.questions
    assert bus.image == (root / "val2014" / "COCO_val2014_000000000042.jpg").resolve()
    assert bus.question == "What color is the bus?" and bus.answers == ("red",) * 10
    assert report_groups(bus) == ("other", "color")
    assert report_groups(dogs) == ("number", "count") and dogs.answers[-1] == "3"
    assert report_groups(sunny) == ("yes/no",) and sunny.question_id == "71"


def test_vqa_v2_official_layout_and_test_questions_without_answers(tmp_path, our_log):
    root = v2_folder(tmp_path / "VQA", layout_subfolders=True, image_dir="Images/mscoco/val2014")
    (root / "Questions" / "v2_OpenEnded_mscoco_test-dev2015_questions.json").write_text('{"questions": []}')
    data = read_vqa(root)
    assert data.splits() == {"val": 3} and data.missing_images() == 0
    assert data.questions[0].image == (root / "Images/mscoco/val2014/COCO_val2014_000000000042.jpg").resolve()
    assert "skipped v2_OpenEnded_mscoco_test-dev2015_questions.json" in our_log.text


def test_vqa_v2_images_folder_option(tmp_path):
    root = v2_folder(tmp_path / "vqa2")
    data = read_vqa(root, images=tmp_path / "coco")
    assert data.questions[0].image == (tmp_path / "coco" / "val2014" / "COCO_val2014_000000000042.jpg").resolve()


def test_a_folder_with_no_vqa_data_says_what_was_looked_for(tmp_path):
    with pytest.raises(UserError, match="looked for vqa.jsonl and for VQA v2"):
        read_vqa(tmp_path)
    with pytest.raises(UserError, match="VQA data not found"):
        read_vqa(tmp_path / "nope")
