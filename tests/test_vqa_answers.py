"""Answer normalisation, the official VQA accuracy, soft scores and the answer vocabulary, by hand-computed cases."""

from __future__ import annotations

import pytest

from vqa_search.vqa.answers import (AnswerVocab, answer_scores, exact_match, majority_answers, normalize_answer,
                                    vqa_accuracy)


@pytest.mark.parametrize("raw, normalised", [
    ("Two", "2"),
    ("none", "0"),
    ("a dog", "dog"),
    ("The Red Ball", "red ball"),
    ("dont", "don't"),
    ("yes!", "yes"),
    ("yes.", "yes"),
    ("10.5", "10.5"),  # a period before a digit stays
    ("1,000", "1000"),  # a comma between digits: all punctuation is dropped, not spaced
    ("Yes, two dogs!", "yes 2 dogs"),  # "," next to a space is dropped, a lone "!" becomes a space
    ("black/white", "black white"),  # punctuation without a space beside it becomes a space
    ("black / white", "black white"),
    ("  tennis\tracket\n", "tennis racket"),
])
def test_normalisation_follows_the_official_script(raw, normalised):
    assert normalize_answer(raw) == normalised


def humans(yes: int, other: str = "no", total: int = 10) -> list[str]:
    return ["yes"] * yes + [other] * (total - yes)


@pytest.mark.parametrize("matching, expected", [
    (0, 0.0),
    (1, 0.3),  # 9 subsets keep the one "yes": 1/3 each; the subset without it: 0 -> 9 * (1/3) / 10
    (2, 0.6),  # 8 subsets with both: 2/3; 2 subsets with one: 1/3 -> (8 * 2/3 + 2 * 1/3) / 10
    (3, 0.9),  # 7 subsets with all three: 1; 3 with two: 2/3 -> (7 + 3 * 2/3) / 10
    (4, 1.0),  # every subset keeps at least three
    (10, 1.0),
])
def test_accuracy_averages_the_ten_leave_one_out_subsets(matching, expected):
    assert vqa_accuracy("yes", humans(matching)) == pytest.approx(expected)


def test_prediction_is_normalised_before_matching():
    assert vqa_accuracy("Yes.", humans(4)) == 1.0
    assert vqa_accuracy("two", ["2"] * 10) == 1.0


def test_human_answers_get_punctuation_only_when_they_disagree():
    # the script processes only punctuation of the humans' answers, and only when they differ
    assert vqa_accuracy("t shirt", ["t-shirt"] * 3 + ["shirt"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("t shirt", ["t-shirt"] * 10) == 0.0
    # and never their number words: a digit cannot match a spelled-out human answer
    assert vqa_accuracy("2", ["two", "two", "two", "2"] + ["3"] * 6) == pytest.approx(0.3)


def test_a_single_human_answer_is_an_exact_match():
    assert vqa_accuracy("cat", ["cat"]) == 1.0
    assert vqa_accuracy("dog", ["cat"]) == 0.0


def test_soft_scores_are_the_accuracy_each_answer_would_get():
    answers = ["red"] * 5 + ["dark red"] * 2 + ["maroon"] + ["Red"] * 2
    scores = answer_scores(answers)
    assert set(scores) == {"red", "dark red", "maroon"}
    for answer, score in scores.items():
        assert score == pytest.approx(vqa_accuracy(answer, answers))
    assert scores["dark red"] == pytest.approx(0.6)


def test_exact_match_is_the_modal_human_answer():
    assert exact_match("yes", humans(6))
    assert not exact_match("yes", humans(4))
    assert exact_match("Two", ["2", "2", "3"])
    assert exact_match("cat", ["cat", "dog"]) and not exact_match("dog", ["cat", "dog"])  # a tie: the first


def test_vocabulary_keeps_the_most_frequent_answers_with_ties_by_text():
    vocab = AnswerVocab.build([["yes"] * 3 + ["no"] * 3, ["Two"] * 2 + ["blue"] * 2, ["cat"]], size=4)
    assert vocab.answers == ["no", "yes", "2", "blue"]
    assert vocab.index["2"] == 2
    assert AnswerVocab.from_json(vocab.to_json()).answers == vocab.answers


def test_soft_targets_drop_answers_outside_the_vocabulary():
    vocab = AnswerVocab(["yes", "no", "2"])
    positions, scores = vocab.soft_targets(["yes"] * 3 + ["maybe"] * 7)
    assert positions == [0]
    assert scores == [pytest.approx(0.9)]
    assert vocab.soft_targets(["maybe"] * 10) == ([], [])


def test_majority_answers_per_category_and_overall():
    questions = [("color", ["red"] * 10), ("color", ["blue"] * 10), ("color", ["red"] * 10),
                 ("count", ["2"] * 10), ("yes/no", ["yes"] * 10), ("yes/no", ["yes"] * 10)]
    assert majority_answers(questions) == {None: "red", "color": "red", "count": "2", "yes/no": "yes"}
