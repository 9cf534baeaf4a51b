"""VQA questions from two formats into one list: VQA v2 as distributed, and simple JSON lines.

- JSON lines (what `make-shapes` writes as vqa.jsonl): one object per line,
  {"image": "path", "question": "...", "answers": ["...", ...], "type": "yes/no|number|other"}, with
  optional "answer_type", "split" and "question_id". `type` may also name a finer category (the
  shapes world writes color / count / shape with `answer_type` beside it). Image paths are relative to
  the file's folder (or `--images`).
- VQA v2: v2_OpenEnded_mscoco_{train2014,val2014}_questions.json with v2_mscoco_{...}_annotations.json
  (in the folder, or its Questions/ and Annotations/ subfolders as in GT-Vision-Lab/VQA), images at
  {images}/{subtype}/COCO_{subtype}_{image_id:012d}.jpg, where {images} defaults to the folder (or
  its Images/mscoco/, the official layout). train2014 is the train split and val2014 the val split;
  question files without annotations (test2015, test-dev2015) are skipped with a note.

Reports count each question under its answer type and, when finer, its category: VQA v2's
"what color ..." questions are "color", "how many ..." are "count".
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from vqa_search.core.errors import UserError

log = logging.getLogger("vqa_search")

ANSWER_TYPES = ("yes/no", "number", "other")
JSONL_NAME = "vqa.jsonl"
V2_SUBTYPES = {"train2014": "train", "val2014": "val"}
V2_QUESTIONS = "v2_OpenEnded_mscoco_{}_questions.json"
V2_ANNOTATIONS = "v2_mscoco_{}_annotations.json"
V2_OFFICIAL_IMAGES = Path("Images", "mscoco")
V2_QUESTION_TYPE_CATEGORIES = (("what color", "color"), ("how many", "count"))


@dataclass(frozen=True)
class VqaQuestion:
    image: Path  # absolute
    question: str
    answers: tuple[str, ...]  # as the humans gave them
    answer_type: str  # yes/no | number | other
    category: str  # the finer type reports show: color, count, shape, ... or the answer type
    split: str | None
    question_id: str


@dataclass
class VqaData:
    root: Path
    questions: list[VqaQuestion]
    source: str  # jsonl | vqa-v2

    def split(self, name: str) -> list[VqaQuestion]:
        chosen = [question for question in self.questions if question.split == name]
        if not chosen:
            found = ", ".join(f"{split} ({count})" for split, count in self.splits().items()) or "none"
            raise UserError(f"no {name!r} questions in {self.root}; splits found: {found}")
        return chosen

    def splits(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for question in self.questions:
            label = question.split or "no split"
            counts[label] = counts.get(label, 0) + 1
        return counts

    def missing_images(self) -> int:
        """Distinct images the questions name that are not on disk."""
        return len(_absent_images(self.questions))


def _absent_images(questions: list[VqaQuestion]) -> list[Path]:
    return [image for image in dict.fromkeys(question.image for question in questions) if not image.is_file()]


def report_groups(question: VqaQuestion) -> tuple[str, ...]:
    """The groups a question's accuracy is reported in: its answer type, and its finer category if any."""
    if question.category == question.answer_type:
        return (question.answer_type,)
    return question.answer_type, question.category


def read_vqa(path: Path | str, images: Path | str | None = None) -> VqaData:
    """JSON lines (a .jsonl file, or a folder holding vqa.jsonl) or a VQA v2 folder."""
    path = Path(path).expanduser()
    images = None if images is None else Path(images).expanduser()
    if not path.exists():
        raise UserError(f"VQA data not found: {path}")
    if path.is_file():
        data = _read_jsonl(path, images)
    elif (path / JSONL_NAME).is_file():
        data = _read_jsonl(path / JSONL_NAME, images)
    else:
        data = _read_v2(path, images)
    if not data.questions:
        raise UserError(f"no questions in {path}")
    if absent := _absent_images(data.questions):
        log.warning("%d images named by the questions are not on disk (e.g. %s); their questions count as unanswered",
                    len(absent), absent[0])
    return data


def _read_jsonl(path: Path, images: Path | None) -> VqaData:
    base = (images or path.parent).resolve()
    questions = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                questions.append(_jsonl_question(json.loads(line), base, number))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise UserError(f"{path}, line {number}: not a VQA record ({_describe(error)}); expected "
                                '{"image", "question", "answers", "type"}') from None
    return VqaData(path.parent.resolve(), questions, "jsonl")


def _jsonl_question(record: dict, base: Path, number: int) -> VqaQuestion:
    answers = record["answers"]
    if isinstance(answers, str) or not answers or not all(isinstance(answer, str) for answer in answers):
        raise ValueError("answers must be a non-empty list of strings")
    category = str(record["type"])
    answer_type = record.get("answer_type", category)
    if answer_type not in ANSWER_TYPES:
        hint = "" if "answer_type" in record else "; give answer_type"
        raise ValueError(f"answer type {answer_type!r} is none of {', '.join(ANSWER_TYPES)}{hint}")
    return VqaQuestion(
        image=base / record["image"], question=str(record["question"]), answers=tuple(answers),
        answer_type=answer_type, category=category, split=record.get("split"),
        question_id=str(record.get("question_id", number)),
    )


def _describe(error: Exception) -> str:
    return f"missing {error}" if isinstance(error, KeyError) else str(error).splitlines()[0]


def _read_v2(folder: Path, images: Path | None) -> VqaData:
    questions = []
    for subtype in _v2_subtypes(folder):
        question_file = _find(folder, "Questions", V2_QUESTIONS.format(subtype))
        annotation_file = _find(folder, "Annotations", V2_ANNOTATIONS.format(subtype))
        if annotation_file is None or subtype not in V2_SUBTYPES:
            log.info("skipped %s: only train2014 and val2014 have answers to score", question_file.name)
            continue
        questions += _v2_questions(question_file, annotation_file, _v2_image_dir(folder, images, subtype),
                                   subtype, V2_SUBTYPES[subtype])
    if not questions:
        raise UserError(f"no VQA data in {folder}: looked for {JSONL_NAME} and for VQA v2's "
                        f"{V2_QUESTIONS.format('train2014')} + {V2_ANNOTATIONS.format('train2014')} (or val2014), "
                        "in the folder or its Questions/ and Annotations/ subfolders")
    return VqaData(folder.resolve(), questions, "vqa-v2")


def _v2_subtypes(folder: Path) -> list[str]:
    """The subtypes (train2014, val2014, test-dev2015, ...) that have a questions file."""
    pattern, (prefix, suffix) = V2_QUESTIONS.format("*"), V2_QUESTIONS.split("{}")
    names = {path.name for path in [*folder.glob(pattern), *(folder / "Questions").glob(pattern)]}
    return sorted(name[len(prefix):-len(suffix)] for name in names)


def _v2_image_dir(folder: Path, images: Path | None, subtype: str) -> Path:
    """{images}/{subtype}; without --images, the folder's {subtype}/ or else the official Images/mscoco/{subtype}/."""
    if images is not None:
        return images.resolve() / subtype
    for candidate in (folder / subtype, folder / V2_OFFICIAL_IMAGES / subtype):
        if candidate.is_dir():
            return candidate.resolve()
    return (folder / subtype).resolve()


def _find(folder: Path, subfolder: str, name: str) -> Path | None:
    for candidate in (folder / name, folder / subfolder / name):
        if candidate.is_file():
            return candidate
    return None


def _v2_questions(question_file: Path, annotation_file: Path, image_dir: Path, subtype: str,
                  split: str) -> list[VqaQuestion]:
    try:
        asked = json.loads(question_file.read_text(encoding="utf-8"))["questions"]
        annotations = json.loads(annotation_file.read_text(encoding="utf-8"))["annotations"]
        text = {item["question_id"]: item["question"] for item in asked}
        return [
            VqaQuestion(
                image=image_dir / f"COCO_{subtype}_{item['image_id']:012d}.jpg",
                question=text[item["question_id"]],
                answers=tuple(answer["answer"] for answer in item["answers"]),
                answer_type=item["answer_type"],
                category=_v2_category(item["question_type"], item["answer_type"]),
                split=split,
                question_id=str(item["question_id"]),
            )
            for item in annotations
        ]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise UserError(f"{question_file.name} / {annotation_file.name}: not VQA v2 files ({_describe(error)})") from None


def _v2_category(question_type: str, answer_type: str) -> str:
    for prefix, category in V2_QUESTION_TYPE_CATEGORIES:
        if question_type.startswith(prefix):
            return category
    return answer_type
