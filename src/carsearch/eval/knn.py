"""kNN classification metrics over a search result: the ranked weighted vote and the raw neighbours."""

from __future__ import annotations

import numpy as np

from carsearch.defaults import K_VOTE, TEMPERATURE
from carsearch.eval.vote import knn_votes, neighbour_labels


def knn_metrics(
    gallery_labels: np.ndarray,
    query_labels: np.ndarray,
    sims: np.ndarray,
    rows: np.ndarray,
    k: int = K_VOTE,
    temperature: float = TEMPERATURE,
) -> dict[str, float]:
    """top-1 / top-5 of the ranked weighted vote, hit@1 / hit@5 of the raw neighbours (shares of queries).

    `gallery_labels` (N,) str; `query_labels` (n,) str; `sims`, `rows` (n, >= k): each query's search
    result, nearest first, `rows` indexing `gallery_labels` (-1: no neighbour found there)."""
    rows = np.asarray(rows)[:, :k]
    votes = knn_votes(neighbour_labels(gallery_labels, rows), np.asarray(sims)[:, :k], temperature)
    truth = np.asarray(query_labels).astype(str)[:, None]
    # The raw neighbours: the first found ones (rows -1 are none), unlabelled included.
    found = rows >= 0
    order = np.argsort(~found, axis=1, kind="stable")[:, :5]
    labels = np.asarray(gallery_labels).astype(str)
    first5 = np.where(
        np.take_along_axis(found, order, axis=1),
        labels[np.clip(np.take_along_axis(rows, order, axis=1), 0, None)] if len(labels) else "",
        "\0",  # matches no query label
    )
    n = max(1, len(query_labels))
    return {
        "top1": float((votes.labels[:, :1] == truth).any(axis=1).sum() / n),
        "top5": float((votes.labels[:, :5] == truth).any(axis=1).sum() / n),
        "hit1": float((first5[:, :1] == truth).any(axis=1).sum() / n),
        "hit5": float((first5 == truth).any(axis=1).sum() / n),
        "queries": len(query_labels),
    }


def vote_details(
    gallery_labels: np.ndarray,
    sims: np.ndarray,
    rows: np.ndarray,
    k: int = K_VOTE,
    temperature: float = TEMPERATURE,
) -> tuple[list[str | None], np.ndarray]:
    """The winning label of each query's vote (None when no neighbour voted) and its vote share (n,)
    float64 (the classifier's confidence)."""
    votes = knn_votes(
        neighbour_labels(gallery_labels, np.asarray(rows)[:, :k]), np.asarray(sims)[:, :k], temperature
    )
    return [str(w) if w else None for w in votes.winner], votes.winner_share
