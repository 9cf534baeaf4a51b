"""Recall@K on the Karpathy protocol, vectorised, with ties ranked against the model.

A query is correct for a gallery item when the two share a label: for text->image the label of a
caption is its image and the label of an image is itself; image->text swaps the roles, and an image
then has as many correct items as it has captions. The rank of a query is the 1-based position of
its best-scored correct item.

Ties are ranked pessimistically: every wrong item scoring at least as high as the best correct one
comes first. A model that scores everything equal therefore gets the worst rank, never the best,
and the result does not depend on the order of the gallery.
"""

from __future__ import annotations

import numpy as np

CURVE_MAX_K = 50
ROWS_PER_CHUNK = 1024  # bounds memory: COCO's 25,000 x 5,000 scores are compared a slice at a time


def first_correct_ranks(scores: np.ndarray, query_labels: np.ndarray, item_labels: np.ndarray) -> np.ndarray:
    """Rank of each query's best-scored correct item; `scores` is queries x gallery items."""
    scores = np.asarray(scores)
    query_labels, item_labels = np.asarray(query_labels), np.asarray(item_labels)
    if scores.shape != (len(query_labels), len(item_labels)):
        raise ValueError(f"scores {scores.shape} do not match {len(query_labels)} queries x {len(item_labels)} items")
    ranks = np.empty(len(query_labels), dtype=np.int64)
    for start in range(0, len(query_labels), ROWS_PER_CHUNK):
        rows = slice(start, start + ROWS_PER_CHUNK)
        block = scores[rows]
        correct = query_labels[rows, None] == item_labels[None, :]
        if not correct.any(axis=1).all():
            raise ValueError("every query needs at least one correct item in the gallery")
        best_correct = np.where(correct, block, -np.inf).max(axis=1)
        ranks[rows] = 1 + ((block >= best_correct[:, None]) & ~correct).sum(axis=1)
    return ranks


def recall_at(ranks: np.ndarray, k: int) -> float:
    """Percentage of queries whose first correct item is in the top k."""
    return 100.0 * float(np.mean(ranks <= k))


def summarize(ranks: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """R@K in percent, median and mean rank: the columns of every retrieval paper's table."""
    summary = {f"R@{k}": recall_at(ranks, k) for k in ks}
    summary["median_rank"] = float(np.median(ranks))
    summary["mean_rank"] = float(np.mean(ranks))
    return summary


def recall_curve(ranks: np.ndarray, max_k: int = CURVE_MAX_K) -> list[float]:
    """R@1 .. R@max_k in percent, for plotting."""
    counts = np.bincount(np.minimum(ranks, max_k + 1), minlength=max_k + 2)
    return (100.0 * np.cumsum(counts)[1 : max_k + 1] / len(ranks)).tolist()


def chance_recall(correct_per_query: np.ndarray, gallery_size: int, k: int) -> float:
    """Expected R@k in percent of a random ordering: 1 - P(all k picks wrong), averaged over queries."""
    correct_per_query = np.asarray(correct_per_query, dtype=np.float64)
    all_wrong = np.ones_like(correct_per_query)
    for drawn in range(min(k, gallery_size)):
        all_wrong *= np.clip(gallery_size - correct_per_query - drawn, 0, None) / (gallery_size - drawn)
    return 100.0 * float(np.mean(1.0 - all_wrong))
