"""`bench vqa`: official VQA accuracy of a head, of caption answers, and of the majority answer, on one split.

Every mode is scored on the same questions with `evaluate.accuracy_report`. A question whose image
cannot be read, or for which no caption yields an answer, counts as wrong rather than being left
out, so modes stay comparable. The majority baseline answers each question with the commonest train
answer of its question type (of the evaluated split when there is no train split): what a model that
never looks at the image would get from the type alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vqa_search.core.errors import UserError
from vqa_search.core.threads import default_workers
from vqa_search.vqa.answers import majority_answers
from vqa_search.vqa.data import VqaQuestion, read_vqa
from vqa_search.vqa.evaluate import accuracy_report

MODES = ("head", "captions", "both")


@dataclass
class VqaBenchConfig:
    head: Path | None = None
    split: str = "val"
    mode: str = "head"
    index: Path | None = None  # captions mode (default: the data folder's index); a regions head's region set
                               # (default: the index it was trained with)
    images: Path | None = None
    train_split: str = "train"  # where the majority answers come from
    batch_size: int = 64
    workers: int = field(default_factory=default_workers)
    progress: bool = True


def run_vqa_bench(data_path: Path | str, config: VqaBenchConfig = VqaBenchConfig()) -> dict:
    """{"split", "questions", "majority": report, "head": report, "captions": report} (modes asked for)."""
    if config.mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)} (got {config.mode!r})")
    if config.mode in ("head", "both") and config.head is None:
        raise UserError("--mode head needs --head HEAD (train one with `vqa-search train vqa`)")
    data = read_vqa(data_path, images=config.images)
    questions = data.split(config.split)
    train = [question for question in data.questions if question.split == config.train_split] or questions
    results = {"split": config.split, "questions": len(questions),
               "majority": accuracy_report(questions, majority_predictions(train, questions))}
    if config.mode in ("head", "both"):
        results["head"] = accuracy_report(questions, head_predictions(config.head, questions, config))
    if config.mode in ("captions", "both"):
        results["captions"] = accuracy_report(questions, caption_predictions(data.root, questions, config))
    return results


def majority_predictions(train: list[VqaQuestion], questions: list[VqaQuestion]) -> list[str]:
    commonest = majority_answers((question.category, question.answers) for question in train)
    return [commonest.get(question.category, commonest[None]) for question in questions]


def head_predictions(head: Path, questions: list[VqaQuestion], config: VqaBenchConfig) -> list[str | None]:
    from vqa_search.vqa.answerer import load_answerer
    from vqa_search.vqa.features import image_features, question_vectors

    answerer = load_answerer(head, index=config.index)
    features = image_features(answerer.clip, answerer.local, [question.image for question in questions],
                              config.batch_size, config.workers, config.progress, answerer.regions)
    readable = [question for question in questions if question.image in features.rows]
    rows, vectors = question_vectors(answerer.clip, [question.question for question in readable])
    answers, _ = answerer.top_answers(features, [question.image for question in readable],
                                      vectors[[rows[question.question] for question in readable]])
    predicted = {id(question): top[0] for question, top in zip(readable, answers)}
    return [predicted.get(id(question)) for question in questions]


def caption_predictions(root: Path, questions: list[VqaQuestion], config: VqaBenchConfig) -> list[str | None]:
    from vqa_search.core.store import DEFAULT_DIR_NAME
    from vqa_search.retrieval.searcher import Index
    from vqa_search.vqa.captions import CaptionAnswerer

    index = Index.open(config.index or root / DEFAULT_DIR_NAME)
    answers = CaptionAnswerer(index).answer_many([question.image for question in questions],
                                                 [question.question for question in questions], skip_unreadable=True)
    return [answer.answer for answer in answers]


def accuracy_table(results: dict) -> str:
    """The modes as rows, overall / exact match / each question type as columns, in percent."""
    rows = [name for name in ("head", "captions", "majority") if name in results]
    groups = list(results["majority"]["by_type"])
    header = ["", "overall", "exact", *groups]
    lines = [f"{results['questions']} questions of the {results['split']} split; official VQA accuracy (%)",
             "  ".join(f"{cell:>10}" for cell in header)]
    for name in rows:
        report = results[name]
        cells = [name, report["overall"], report["exact_match"], *(report["by_type"].get(g, 0.0) for g in groups)]
        lines.append("  ".join(f"{cell:>10.1f}" if isinstance(cell, float) else f"{cell:>10}" for cell in cells))
    return "\n".join(lines)
