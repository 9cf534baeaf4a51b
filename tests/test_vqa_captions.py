"""Answers from captions: the word rules, and the evidence an index gives for indexed and unindexed images."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import COLOURS, tiny_config, write_photo
from vqa_search.core.encode import encode_texts
from vqa_search.core.errors import UserError
from vqa_search.indexer.build import BuildConfig, build_index
from vqa_search.retrieval.searcher import Index
from vqa_search.vqa.captions import CaptionAnswerer, answer_and_source, question_kind, read_answer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("question, kind", [
    ("is there a red circle?", "yes/no"),
    ("Are the dogs running?", "yes/no"),
    ("what color is the dog's collar?", "color"),
    ("What colour are the flowers?", "color"),
    ("how many people are on the bench?", "number"),
    ("which shape is red?", "other"),
    ("where is the cat?", "other"),
])
def test_question_kind(question, kind):
    assert question_kind(question) == kind


@pytest.mark.parametrize("question, captions, answer", [
    ("is there a red circle?", ["a blue square", "two red circles on grass"], "yes"),  # any caption, plurals folded
    ("is there a red circle?", ["a red square and a blue circle"], "no"),
    ("what color is the dog?", ["a man with a dog", "a brown dog and a black cat"], "brown"),
    ("what color is the car?", ["a grey car"], "gray"),
    ("what color is the bus?", ["a white van near a red sign"], "white"),  # nobody names the bus: first colour
    ("how many dogs are there?", ["two dogs play in the snow"], "2"),
    ("how many dogs are there?", ["a dog runs"], "1"),
    ("how many cats are there?", ["two dogs play"], "0"),  # not mentioned at all
    ("how many green shapes are there?", ["three shapes: a red circle", "two green shapes: a star"], "2"),
    ("which shape is red?", ["a small red circle and a blue star"], "circle"),
    ("where is the cat?", ["a cat on a mat"], None),
])
def test_read_answer(question, captions, answer):
    assert read_answer(question, captions) == answer


def test_the_answer_names_the_caption_it_was_read_from():
    assert answer_and_source("what color is the square?", ["a blue triangle", "a white square"]) == ("white", 1)
    assert answer_and_source("is there a red star?", ["a blue star", "a red star"]) == ("yes", 1)
    assert answer_and_source("is there a red star?", ["a blue star"]) == ("no", None)
    assert answer_and_source("how many cats are there?", ["two dogs"]) == ("0", None)


@pytest.fixture
def indexed(photos):
    build_index(photos, BuildConfig(**tiny_config()))
    return Index.open(photos)


def test_an_indexed_image_gets_its_own_captions_ranked_by_similarity(indexed, photos):
    image = photos / "Images" / "photo_2.png"
    answer = CaptionAnswerer(indexed).answer(image, "what number is in the picture?")
    own = indexed.captions_of[indexed.image_paths.index("photo_2.png")]
    assert sorted(item.caption for item in answer.evidence) == sorted(own)
    assert all(item.own and item.image == "photo_2.png" for item in answer.evidence)
    question = encode_texts(indexed.clip, ["what number is in the picture?"])[0]
    expected = encode_texts(indexed.clip, [item.caption for item in answer.evidence]) @ question
    np.testing.assert_allclose([item.score for item in answer.evidence], expected, atol=1e-4)
    assert [item.score for item in answer.evidence] == sorted((item.score for item in answer.evidence), reverse=True)


def test_an_unindexed_image_gets_its_neighbours_captions(indexed, tmp_path):
    outside = write_photo(tmp_path / "new.png", COLOURS[2])
    answer = CaptionAnswerer(indexed, evidence=10, neighbours=2).answer(outside, "is there a picture?")
    assert answer.evidence and not any(item.own for item in answer.evidence)
    assert len({item.image for item in answer.evidence}) == 2 and len(answer.evidence) == 4
    assert answer.kind == "yes/no" and answer.answer == "yes"  # "a picture, number ..." holds every content word


def test_many_questions_at_once_equal_one_by_one(indexed, photos, tmp_path):
    answerer = CaptionAnswerer(indexed)
    outside = write_photo(tmp_path / "new.png", COLOURS[8])
    images = [photos / "Images" / "photo_0.png", outside, photos / "Images" / "photo_0.png"]
    questions = ["is there a picture?", "what color is it?", "how many pictures are there?"]
    assert answerer.answer_many(images, questions) == [answerer.answer(i, q) for i, q in zip(images, questions)]


def test_user_errors(indexed, photos, tmp_path):
    answerer = CaptionAnswerer(indexed)
    with pytest.raises(UserError, match="question is empty"):
        answerer.answer(photos / "Images" / "photo_0.png", "  ")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image"):
        answerer.answer(broken, "is it?")
    with pytest.raises(UserError, match="image not found"):
        answerer.answer(tmp_path / "nothing.png", "is it?")
    skipped = answerer.answer_many([broken, photos / "Images" / "photo_0.png"], ["is it?", "is it?"],
                                   skip_unreadable=True)
    assert (skipped[0].answer, skipped[0].evidence) == (None, []) and skipped[1].evidence


def test_an_index_without_captions_is_refused(tmp_path):
    folder = tmp_path / "plain"
    write_photo(folder / "a.png", COLOURS[0])
    build_index(folder, BuildConfig(**tiny_config()))
    with pytest.raises(UserError, match="has no captions"):
        CaptionAnswerer(Index.open(folder))
