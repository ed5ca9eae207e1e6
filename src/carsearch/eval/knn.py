"""kNN classification metrics over a search result: the ranked weighted vote and the raw neighbours."""

from __future__ import annotations

import numpy as np

from carsearch.defaults import K_VOTE, TEMPERATURE
from carsearch.eval.vote import ranked_votes


def knn_metrics(
    gallery_labels: np.ndarray,
    query_labels: np.ndarray,
    sims: np.ndarray,
    rows: np.ndarray,
    k: int = K_VOTE,
    temperature: float = TEMPERATURE,
) -> dict[str, float]:
    """top-1 / top-5 of the ranked weighted vote, hit@1 / hit@5 of the raw neighbours."""
    top1 = top5 = hit1 = hit5 = 0
    for truth, s, r in zip(query_labels, sims, rows, strict=True):
        neigh = gallery_labels[r[:k][r[:k] >= 0]]
        ranked = [lab for lab, _ in ranked_votes(gallery_labels, s, r, k, temperature)]
        top1 += bool(ranked) and ranked[0] == truth
        top5 += truth in ranked[:5]
        hit1 += len(neigh) > 0 and neigh[0] == truth
        hit5 += truth in set(neigh[:5])
    n = max(1, len(query_labels))
    return {
        "top1": top1 / n,
        "top5": top5 / n,
        "hit1": hit1 / n,
        "hit5": hit5 / n,
        "queries": len(query_labels),
    }


def vote_details(
    gallery_labels: np.ndarray,
    sims: np.ndarray,
    rows: np.ndarray,
    k: int = K_VOTE,
    temperature: float = TEMPERATURE,
) -> tuple[list[str | None], np.ndarray]:
    """The winning label of each query's vote and its vote share (the classifier's confidence)."""
    preds, conf = [], []
    for s, r in zip(sims, rows, strict=True):
        ranked = ranked_votes(gallery_labels, s, r, k, temperature)
        preds.append(ranked[0][0] if ranked else None)
        conf.append(ranked[0][1] if ranked else 0.0)
    return preds, np.array(conf)
