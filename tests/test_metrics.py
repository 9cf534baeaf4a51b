"""Recall@K: the vectorised ranks against a naive sort-and-scan, and cases whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vqa_search.retrieval.metrics import chance_recall, first_correct_ranks, recall_at, recall_curve, summarize


def naive_ranks(scores, query_labels, item_labels) -> list[int]:
    """Sort each row by score, wrong items first among equals (ties count against the model)."""
    ranks = []
    for row, label in zip(scores, query_labels):
        order = sorted(range(len(row)), key=lambda j: (-row[j], item_labels[j] == label))
        ranks.append(next(position for position, j in enumerate(order, 1) if item_labels[j] == label))
    return ranks


def karpathy_gallery(rng, n_images: int, captions_per_image: int = 5, dim: int = 8, decimals: int | None = None):
    images = rng.normal(size=(n_images, dim))
    caption_image = np.repeat(np.arange(n_images), captions_per_image)
    captions = images[caption_image] + rng.normal(scale=1.5, size=(len(caption_image), dim))
    scores = captions @ images.T
    if decimals is not None:  # coarse scores: many exact ties, the case a sort-based metric gets wrong
        scores = np.round(scores, decimals)
    return scores, caption_image, np.arange(n_images)


@pytest.mark.parametrize("seed, decimals", [(0, None), (1, None), (2, 0), (3, 1)])
def test_text_to_image_ranks_match_the_naive_loop(seed, decimals):
    scores, caption_image, image_ids = karpathy_gallery(np.random.default_rng(seed), 40, decimals=decimals)
    assert first_correct_ranks(scores, caption_image, image_ids).tolist() == naive_ranks(scores, caption_image, image_ids)


@pytest.mark.parametrize("seed, decimals", [(4, None), (5, 0), (6, 1)])
def test_image_to_text_ranks_match_the_naive_loop(seed, decimals):
    scores, caption_image, image_ids = karpathy_gallery(np.random.default_rng(seed), 40, decimals=decimals)
    image_scores = scores.T
    assert (first_correct_ranks(image_scores, image_ids, caption_image).tolist()
            == naive_ranks(image_scores, image_ids, caption_image))


def test_chunked_rows_give_the_same_ranks(monkeypatch):
    scores, caption_image, image_ids = karpathy_gallery(np.random.default_rng(7), 30)
    whole = first_correct_ranks(scores, caption_image, image_ids)
    monkeypatch.setattr("vqa_search.retrieval.metrics.ROWS_PER_CHUNK", 7)
    assert first_correct_ranks(scores, caption_image, image_ids).tolist() == whole.tolist()


def test_hand_made_ranks():
    scores = np.array([
        [0.9, 0.1, 0.5],  # correct item 0 scores highest: rank 1
        [0.9, 0.1, 0.5],  # correct item 1 scores lowest: rank 3
        [0.5, 0.7, 0.5],  # correct item 2 ties with item 0 below item 1: both wrong ones come first, rank 3
        [0.2, 0.2, 0.2],  # all equal: worst rank, never the best
    ])
    assert first_correct_ranks(scores, [0, 1, 2, 0], [0, 1, 2]).tolist() == [1, 3, 3, 3]


def test_several_correct_items_rank_the_best_one():
    scores = np.array([[0.1, 0.8, 0.3, 0.6, 0.9]])  # correct: items 1 and 3; item 4 is wrong and first
    assert first_correct_ranks(scores, [7], [7, 7, 0, 7, 0]).tolist() == [2]


def test_query_without_a_correct_item_is_an_error():
    with pytest.raises(ValueError, match="at least one correct item"):
        first_correct_ranks(np.zeros((1, 2)), [5], [0, 1])


def test_summary_and_curve_of_known_ranks():
    ranks = np.array([1, 1, 2, 6, 11, 60])
    summary = summarize(ranks)
    assert summary == pytest.approx({"R@1": 100 * 2 / 6, "R@5": 100 * 3 / 6, "R@10": 100 * 4 / 6,
                                     "median_rank": 4.0, "mean_rank": 81 / 6})
    curve = recall_curve(ranks, max_k=12)
    assert len(curve) == 12
    assert curve == pytest.approx([recall_at(ranks, k) for k in range(1, 13)])


def test_chance_recall_matches_the_hypergeometric_formula():
    # One correct image among 100: R@5 = 5%. Five correct captions among 500: 1 - C(495, 10) / C(500, 10).
    assert chance_recall(np.ones(3), 100, 5) == pytest.approx(5.0)
    expected = 100 * (1 - math.comb(495, 10) / math.comb(500, 10))
    assert chance_recall(np.full(4, 5), 500, 10) == pytest.approx(expected)
    assert chance_recall(np.ones(2), 3, 10) == pytest.approx(100.0)


def test_random_scores_land_near_chance():
    rng = np.random.default_rng(8)
    n_images = 200
    caption_image = np.repeat(np.arange(n_images), 5)
    ranks = first_correct_ranks(rng.random((len(caption_image), n_images)), caption_image, np.arange(n_images))
    assert recall_at(ranks, 10) == pytest.approx(chance_recall(np.ones(len(ranks)), n_images, 10), abs=1.5)
