"""Accuracy of answers to a split's questions: the official VQA accuracy, by question type, and exact match.

Shared by training (val after every epoch) and `bench vqa`, so the number that picks the kept epoch
is the number the benchmark reports.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from vqa_search.vqa.answers import exact_match, vqa_accuracy
from vqa_search.vqa.data import VqaQuestion, report_groups


def accuracy_report(questions: Sequence[VqaQuestion], predictions: Sequence[str | None]) -> dict:
    """In percent: official VQA accuracy overall and per report group, exact match, and the counts.

    A missing prediction (None: no answer could be read) scores 0, so every mode is judged on all
    questions alike.
    """
    if len(questions) != len(predictions):
        raise ValueError(f"{len(questions)} questions but {len(predictions)} predictions")
    scores = np.array([vqa_accuracy(p, q.answers) if p is not None else 0.0 for q, p in zip(questions, predictions)])
    exact = np.array([p is not None and exact_match(p, q.answers) for q, p in zip(questions, predictions)])
    groups: dict[str, list[int]] = defaultdict(list)
    for position, question in enumerate(questions):
        for group in report_groups(question):
            groups[group].append(position)
    return {
        "overall": _percent(scores),
        "by_type": {group: _percent(scores[positions]) for group, positions in sorted(groups.items())},
        "exact_match": _percent(exact),
        "answered": _percent(np.array([p is not None for p in predictions])),
        "questions": len(questions),
        "questions_by_type": {group: len(positions) for group, positions in sorted(groups.items())},
    }


def _percent(values: np.ndarray) -> float:
    return round(100 * float(values.mean()), 2) if len(values) else 0.0
