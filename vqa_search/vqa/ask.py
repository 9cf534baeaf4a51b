"""`ask IMAGE "question"`: a trained head's answers, and the evidence of the index's captions.

The two ways answer independently, and both are shown: the head picks from its fixed vocabulary
(fast, trained), the captions say what people wrote about this image or, when it is not indexed,
about its nearest indexed neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vqa_search.core.errors import UserError
from vqa_search.core.images import load_named_image
from vqa_search.vqa.captions import CaptionAnswer
from vqa_search.vqa.constants import DEFAULT_TOP_ANSWERS  # light: the CLI reads it too


@dataclass
class AskResult:
    image: Path
    question: str
    head_answers: list[dict] | None  # [{"answer", "probability"}], most probable first; None without a head
    captions: CaptionAnswer | None  # None without an index

    def to_json(self) -> dict:
        return {"image": str(self.image), "question": self.question, "head": self.head_answers,
                "captions": None if self.captions is None else self.captions.to_json()}

    def text(self) -> str:
        lines = [f"Q: {self.question}"]
        if self.head_answers is not None:
            answers = ", ".join(f"{item['answer']} ({item['probability']:.2f})" for item in self.head_answers)
            lines.append(f"head: {answers}")
        if self.captions is not None:
            lines.append(f"captions: {self.captions.answer or '(no short answer)'}")
            for position, item in enumerate(self.captions.evidence):
                source = "" if item.own else f"  (of a similar image, {item.image})"
                read = "  <- answer read here" if position == self.captions.answer_from else ""
                lines.append(f"  {item.score:.3f}  {item.caption}{source}{read}")
            if not self.captions.evidence:
                lines.append("  no captions found")
        return "\n".join(lines)


def ask(image: Path | str, question: str, index_dir: Path | str | None = None, head: Path | str | None = None,
        top: int = DEFAULT_TOP_ANSWERS) -> AskResult:
    """Caption evidence from the index at `index_dir` (default: found from the current folder upwards;
    with a head, no index is fine), and the head's `top` answers when a head file is given."""
    image, question = Path(image), question.strip()
    if not question:
        raise UserError("the question is empty")
    if head is not None and not Path(head).is_file():
        raise UserError(f"head file not found: {head} (train one with `vqa-search train vqa`)")
    load_named_image(image)  # before any model loads
    answerer = None
    if head is not None:
        from vqa_search.vqa.answerer import load_answerer

        answerer = load_answerer(head, index=index_dir)  # a regions head reads its region set there
    index = _open_index(index_dir, required=head is None)
    return ask_loaded(image, question, answerer=answerer, captions=_caption_answerer(index), top=top)


def ask_loaded(image: Path | str, question: str, answerer=None, captions=None, top: int = DEFAULT_TOP_ANSWERS,
               shown_as: str | Path | None = None) -> AskResult:
    """`ask` with everything already loaded (a server keeps them warm): an `Answerer` and/or a
    `CaptionAnswerer`, either may be None. `shown_as` is the name the result gives the image."""
    image, question = Path(image), question.strip()
    if not question:
        raise UserError("the question is empty")
    if top < 1:
        raise UserError(f"--top must be at least 1 (got {top})")
    load_named_image(image)
    head_answers = _head_answers(answerer, image.resolve(), question, top) if answerer is not None else None
    evidence = captions.answer(image, question) if captions is not None else None
    return AskResult(Path(shown_as) if shown_as is not None else image, question, head_answers, evidence)


def _caption_answerer(index):
    if index is None:
        return None
    from vqa_search.vqa.captions import CaptionAnswerer

    return CaptionAnswerer(index)


def _open_index(index_dir: Path | str | None, required: bool):
    from vqa_search.retrieval.searcher import Index, find_index

    if index_dir is None:
        try:
            index_dir = find_index()
        except UserError:
            if required:
                raise
            return None
    return Index.open(index_dir)


def _head_answers(answerer, image: Path, question: str, top: int) -> list[dict]:
    """A regions head reads the image's regions from its region set, or extracts them with the set's
    extractor for an image the index does not hold."""
    from vqa_search.vqa.features import image_features, question_vectors

    features = image_features(answerer.clip, answerer.local, [image], regions=answerer.regions)
    _, vectors = question_vectors(answerer.clip, [question])
    answers, probabilities = answerer.top_answers(features, [image], vectors, k=top)
    return [{"answer": answer, "probability": round(float(p), 4)} for answer, p in zip(answers[0], probabilities[0])]
