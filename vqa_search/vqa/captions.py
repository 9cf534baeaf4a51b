"""Answers from caption retrieval, with no training: what people wrote about the image, ranked by the question.

Evidence: the image's own captions when the index holds it (matched by path), otherwise the
captions of its `neighbours` nearest indexed images. They are ranked by cosine similarity between
the question's and the caption's CLIP embeddings (the index's own model and caption vectors).

A short answer is read from the evidence where the question's kind allows, by plain word rules:
- yes/no ("is there a red circle?"): "yes" when some evidence caption names the thing with all its
  modifiers just before it ("a small red circle"; plurals folded), else "no"; "a red square and a
  blue circle" is no red circle;
- colour ("what color is the small X?"): the colour word among the few words before X (with the
  question's other modifiers there too) in the best-ranked caption naming it; when none does, the
  first colour word of the best caption;
- number ("how many green X ..."): the number just before X ("two green dogs"; "a dog" counts 1)
  in the best-ranked caption naming it so; "0" when no evidence caption names it at all;
- "which X is Y?" with a one-word Y: the word naming a thing right after Y ("which shape is red?" and
  "a small red circle" give "circle");
- anything else: no short answer (the best caption is still shown).
Reading from the best caption that gives an answer, not only the best caption, helps because the
caption most similar to a question often restates the question without the detail asked for.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from vqa_search.core.encode import encode_images, encode_texts
from vqa_search.core.errors import UserError
from vqa_search.core.images import load_named_image

KINDS = ("yes/no", "color", "number", "other")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "grey",
          "tan", "silver", "gold", "beige")
NUMBERS = {"no": "0", "zero": "0", "a": "1", "an": "1", "one": "1", "single": "1", "two": "2", "three": "3",
           "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
           "several": None, "many": None}
YES_NO_STARTS = ("is", "are", "was", "were", "does", "do", "did", "can", "could", "has", "have", "will", "would",
                 "should")
STOP_WORDS = {"is", "are", "was", "were", "does", "do", "did", "can", "could", "has", "have", "there", "a", "an",
              "the", "any", "this", "that", "in", "on", "of", "picture", "image", "photo", "it", "what", "color",
              "colour", "how", "many", "which", "shape", "shapes", "be", "to", "at", "with", "and", "or", "its"}
SIZES = {"small", "large", "big", "little", "tiny"}
LOOKBACK = 3  # words before a noun that describe it, as in "two large red circles"


@dataclass
class Evidence:
    caption: str
    image: str  # path as the index stores it
    score: float  # cosine similarity of question and caption
    own: bool  # a caption of the asked image itself, not of a neighbour


@dataclass
class CaptionAnswer:
    question: str
    kind: str
    answer: str | None
    evidence: list[Evidence]  # best first
    answer_from: int | None  # position in `evidence` of the caption the answer was read from

    def to_json(self) -> dict:
        return asdict(self)


def question_kind(question: str) -> str:
    words = _words(question)
    if not words:
        return "other"
    if words[:2] in (["what", "color"], ["what", "colour"]) or "color" in words[:4] or "colour" in words[:4]:
        return "color"
    if words[:2] == ["how", "many"]:
        return "number"
    if words[0] in YES_NO_STARTS:
        return "yes/no"
    return "other"


def read_answer(question: str, captions: Sequence[str]) -> str | None:
    """The short answer the captions (best first) give to the question, or None."""
    return answer_and_source(question, captions)[0]


def answer_and_source(question: str, captions: Sequence[str]) -> tuple[str | None, int | None]:
    """The short answer, and the position of the caption it was read from (None: read from none,
    e.g. "no" because no caption names the thing). Without any caption there is no answer."""
    if not captions:
        return None, None
    kind = question_kind(question)
    subject = _content_words(question)
    if kind == "yes/no":
        noun = _noun(subject)
        modifiers = [word for word in subject if word != noun]
        for position, caption in enumerate(captions):
            if noun is None and set(subject) <= set(_singular(_words(caption))):  # "is it sunny?"
                return "yes", position
            if noun is not None and _mentions(caption, noun, modifiers):
                return "yes", position
        return "no", None
    if kind == "color":
        noun = _noun(subject)
        modifiers = [word for word in subject if word != noun and word not in COLORS]
        for position, caption in enumerate(captions):
            for window in _mentions(caption, noun, modifiers):
                if color := next((word for word in reversed(window) if word in COLORS), None):
                    return _gray(color), position
        first = [word for word in _words(captions[0]) if word in COLORS] if captions else []
        return (_gray(first[0]), 0) if first else (None, None)
    if kind == "number":
        phrase = _singular(_asked_phrase(question))
        noun = _noun(phrase)
        if noun is None:
            return None, None
        modifiers = [word for word in phrase if word != noun]
        mentioned = [(position, window) for position, caption in enumerate(captions)
                     for window in _mentions(caption, noun, modifiers)]
        if not mentioned:
            return "0", None
        for position, window in mentioned:
            count = next((word for word in reversed(window) if word.isdigit() or NUMBERS.get(word)), None)
            if count is not None:
                return (count if count.isdigit() else NUMBERS[count]), position
        return None, None
    which = re.fullmatch(r"which (\w+) (?:is|are) (\w+)", " ".join(_words(question)))
    if which:  # "which shape is red?": the thing named right after the attribute, as in "a small red circle"
        for position, caption in enumerate(captions):
            words = _words(caption)
            for at, word in enumerate(words[:-1]):
                if word == which.group(2):
                    following = [w for w in words[at + 1:at + 3] if w not in SIZES and w not in COLORS]
                    if following:
                        return _singular(following[:1])[0], position
    return None, None


def _gray(color: str) -> str:
    return "gray" if color == "grey" else color


class CaptionAnswerer:
    def __init__(self, index, evidence: int = 5, neighbours: int = 5):
        if not index.caption_texts:
            raise UserError(f"the index at {index.dir.path} has no captions: answers from captions need a "
                            "captioned collection (index a folder with a caption file)")
        self.index, self.evidence, self.neighbours = index, evidence, neighbours
        self.row_of = {(index.images_root / path).resolve(): row for row, path in enumerate(index.image_paths)}
        order = np.argsort(index.caption_image, kind="stable")
        bounds = np.searchsorted(index.caption_image[order], np.arange(len(index.image_paths) + 1))
        self.captions_of_image = [order[bounds[row]:bounds[row + 1]] for row in range(len(index.image_paths))]

    def answer(self, image: Path | str, question: str) -> CaptionAnswer:
        return self.answer_many([Path(image)], [question])[0]

    def answer_many(self, images: Sequence[Path | str], questions: Sequence[str],
                    skip_unreadable: bool = False) -> list[CaptionAnswer]:
        """One question embedding each, one image lookup per distinct image: thousands of questions at once.

        With `skip_unreadable` (benchmarks over partial downloads), a missing or unreadable image that
        is not indexed gives no evidence and no answer instead of an error.
        """
        questions = [question.strip() for question in questions]
        if any(not question for question in questions):
            raise UserError("the question is empty")
        distinct = list(dict.fromkeys(questions))
        question_vectors = encode_texts(self.index.clip, distinct)
        vector_of = dict(zip(distinct, question_vectors))
        caption_vectors = self.index.embeddings("captions")
        candidates: dict[Path, tuple[np.ndarray, bool]] = {}
        answers = []
        for image, question in zip(images, questions):
            image = Path(image).resolve()
            if image not in candidates:
                try:
                    candidates[image] = self._candidates(image)
                except UserError:
                    if not skip_unreadable:
                        raise
                    candidates[image] = np.zeros(0, dtype=np.int64), False
            ids, own = candidates[image]
            scores = np.asarray(caption_vectors[ids]) @ vector_of[question]
            evidence = [Evidence(self.index.caption_texts[ids[i]], self.index.image_paths[self.index.caption_image[ids[i]]],
                                 round(float(scores[i]), 4), own)
                        for i in np.argsort(-scores, kind="stable")[: self.evidence]]
            answer, source = answer_and_source(question, [item.caption for item in evidence])
            answers.append(CaptionAnswer(question, question_kind(question), answer, evidence, source))
        return answers

    def _candidates(self, image: Path) -> tuple[np.ndarray, bool]:
        """Caption ids (sorted, for reading the vectors in order): the image's own when indexed and
        captioned, else its nearest indexed images'."""
        row = self.row_of.get(image)
        if row is not None and len(self.captions_of_image[row]):
            return np.sort(self.captions_of_image[row]), True
        hits = self.index.search_vector(encode_images(self.index.clip, [load_named_image(image)]), str(image),
                                        k=self.neighbours + 1).results
        rows = [hit.image_id for hit in hits if hit.image_id != row][: self.neighbours]
        return np.sort(np.concatenate([self.captions_of_image[r] for r in rows] or [np.zeros(0, dtype=np.int64)])), False


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _singular(words: list[str]) -> list[str]:
    """Plurals folded the simple way: 'circles' -> 'circle', 'boxes' -> 'box', 'dress' stays."""
    folded = []
    for word in words:
        if len(word) > 3 and word.endswith(("ches", "shes", "xes", "sses")):
            word = word[:-2]
        elif len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        folded.append(word)
    return folded


def _content_words(question: str) -> list[str]:
    return [word for word in _singular(_words(question)) if word not in STOP_WORDS]


def _asked_phrase(question: str) -> list[str]:
    """The words between 'how many' and the verb: 'how many green shapes are there?' -> ['green', 'shapes']."""
    words = _words(question)[2:]
    end = next((i for i, word in enumerate(words) if word in YES_NO_STARTS or word in ("there", "in", "on")), len(words))
    return words[:end]


def _noun(subject: list[str]) -> str | None:
    """The thing asked about: the last content word that is not a colour or a size ('the small red circle')."""
    nouns = [word for word in subject if word not in COLORS and word not in SIZES and not word.isdigit()]
    return nouns[-1] if nouns else None


def _mentions(caption: str, noun: str | None, modifiers: list[str]) -> list[list[str]]:
    """For each place the caption names `noun` with all `modifiers` among the few words before it
    ("a small red circle" for 'small red circle'), those words before it, nearest last."""
    if noun is None:
        return []
    words = _words(caption)
    folded = _singular(words)
    windows = []
    for position, word in enumerate(folded):
        window = words[max(0, position - LOOKBACK):position]
        if word == noun and set(modifiers) <= set(_singular(window)):
            windows.append(window)
    return windows
