"""Answers as the official VQA evaluation sees them: normalisation, accuracy, soft scores, the vocabulary.

The rules follow the official evaluation script (GT-Vision-Lab/VQA, PythonEvaluationTools/
vqaEvaluation/vqaEval.py, in the form EvalAI runs it):
- a predicted answer: newlines and tabs to spaces, stripped, punctuation processed, then lower case,
  number words to digits ("two" -> "2", "none" -> "0"), articles dropped, contractions restored;
- the humans' answers: punctuation processed, and only when they are not all the same (the script
  never maps their number words or articles; the released annotations are already normalised);
- accuracy: for each of the n humans, min(#other humans who gave the prediction / 3, 1), averaged
  over the n leave-one-out subsets (n = 10 in VQA v2). With one human answer there is no "other":
  the prediction then scores 1 when it equals that answer (a plain exact match).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

DEFAULT_VOCAB_SIZE = 3129  # the VQA v2 answer vocabulary of the bottom-up attention recipe
HUMANS_FOR_FULL_CREDIT = 3

_PUNCTUATION = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the script's look-behind is a look-ahead
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}


def process_punctuation(text: str) -> str:
    """Punctuation next to a space (or anywhere, when a comma sits between digits) goes; elsewhere it
    becomes a space; a period goes unless a digit follows ("10.5" stays)."""
    strip_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if strip_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def process_digits_and_articles(text: str) -> str:
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """What the official script compares a predicted answer as."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digits_and_articles(process_punctuation(text))


def human_answers(answers: Sequence[str]) -> list[str]:
    """The humans' answers as the official script compares them."""
    answers = [answer.replace("\n", " ").replace("\t", " ").strip() for answer in answers]
    if len(set(answers)) > 1:
        answers = [process_punctuation(answer) for answer in answers]
    return answers


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official accuracy of one predicted answer, in [0, 1]."""
    return _accuracy_of(normalize_answer(prediction), human_answers(answers))


def answer_scores(answers: Sequence[str]) -> dict[str, float]:
    """The accuracy each distinct normalised human answer would earn: the soft targets for training."""
    humans = human_answers(answers)
    candidates = dict.fromkeys(normalize_answer(answer) for answer in answers)
    return {candidate: _accuracy_of(candidate, humans) for candidate in candidates if candidate}


def _accuracy_of(normalised: str, humans: list[str]) -> float:
    if len(humans) == 1:
        return float(normalised == humans[0])
    matches = sum(human == normalised for human in humans)
    # leaving out a human who gave the answer leaves matches - 1 others; leaving out anyone else, matches
    per_subset = [min((matches - (human == normalised)) / HUMANS_FOR_FULL_CREDIT, 1.0) for human in humans]
    return sum(per_subset) / len(per_subset)


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """The prediction equals the humans' most common normalised answer (the first of a tie)."""
    return normalize_answer(prediction) == modal_answer(answers)


def modal_answer(answers: Sequence[str]) -> str:
    counts = Counter(normalize_answer(answer) for answer in answers)
    return max(counts, key=counts.__getitem__)  # max keeps the first of equal counts, in order of appearance


@dataclass
class AnswerVocab:
    """The answers a head can give: the most frequent normalised human answers of the train split."""

    answers: list[str]
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self):
        self.index = {answer: position for position, answer in enumerate(self.answers)}

    @classmethod
    def build(cls, answer_lists: Iterable[Sequence[str]], size: int = DEFAULT_VOCAB_SIZE) -> "AnswerVocab":
        """Every human answer counts once; ties go alphabetically, so the same data gives the same vocabulary."""
        counts = Counter(normalize_answer(answer) for answers in answer_lists for answer in answers)
        counts.pop("", None)
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        return cls([answer for answer, _ in ranked[:size]])

    def soft_targets(self, answers: Sequence[str]) -> tuple[list[int], list[float]]:
        """Vocabulary positions of the answers the humans gave, with their soft scores; others dropped."""
        scored = [(self.index[answer], score) for answer, score in answer_scores(answers).items()
                  if answer in self.index and score > 0]
        return [position for position, _ in scored], [score for _, score in scored]

    def to_json(self) -> list[str]:
        return list(self.answers)

    @classmethod
    def from_json(cls, data: list[str]) -> "AnswerVocab":
        return cls(list(data))


def majority_answers(categories_and_answers: Iterable[tuple[str, Sequence[str]]]) -> dict[str | None, str]:
    """The commonest modal answer per question category, and overall under the key None."""
    per_category: dict[str, Counter] = {}
    overall: Counter = Counter()
    for category, answers in categories_and_answers:
        answer = modal_answer(answers)
        per_category.setdefault(category, Counter())[answer] += 1
        overall[answer] += 1
    return {None: _commonest(overall), **{category: _commonest(counts) for category, counts in per_category.items()}}


def _commonest(counts: Counter) -> str:
    return min(counts.items(), key=lambda item: (-item[1], item[0]))[0] if counts else ""
