"""Per-photo audit scores from each photo's k nearest neighbours in the collection (itself left out).

- label quality: the share of the weighted kNN vote (the classifier's own vote) that goes to the photo's
  label; the mislabel score is 1 minus it (cleanlab's "self-confidence", with kNN vote probabilities);
- outlier score: similarity to the k-th neighbour; the lowest are photos like no other.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from carsearch import defaults
from carsearch.eval.neighbors import drop_self
from carsearch.eval.vote import ranked_votes


@dataclass
class Neighbours:
    """Each row's k nearest other rows: similarities (n, k) best first, rows (n, k), -1 where missing."""

    sims: np.ndarray
    rows: np.ndarray


def neighbours(index: faiss.Index, vectors: np.ndarray, k: int, batch: int = 4096) -> Neighbours:
    """k nearest neighbours of every indexed vector among the others, batch by batch."""
    x = np.ascontiguousarray(vectors, np.float32)
    sims, rows = [], []
    for start in range(0, len(x), batch):
        s, r = index.search(x[start : start + batch], k + 1)
        s, r = drop_self(s, r, np.arange(start, start + len(s)), k)
        sims.append(s)
        rows.append(r)
    if not sims:
        return Neighbours(np.zeros((0, k)), np.zeros((0, k), np.int64))
    return Neighbours(np.concatenate(sims), np.concatenate(rows))


@dataclass
class LabelQuality:
    """Per row: the vote share of its own label, and the label the neighbours vote for (with its share)."""

    own_share: np.ndarray
    voted: np.ndarray
    voted_share: np.ndarray
    probs: np.ndarray | None = None  # (n, classes) vote shares, columns = `classes` (for cleanlab)
    classes: np.ndarray | None = None

    @property
    def mislabel_score(self) -> np.ndarray:
        return 1.0 - self.own_share

    @property
    def flagged(self) -> np.ndarray:
        """Likely mislabelled: the neighbours' vote goes to another label, by a majority."""
        return (self.voted_share >= 0.5) & (self.own_share < self.voted_share)


def label_quality(
    labels: np.ndarray,
    nb: Neighbours,
    k: int = defaults.AUDIT_K,
    temperature: float = defaults.TEMPERATURE,
    with_probs: bool = False,
) -> LabelQuality:
    """The weighted kNN vote of each labelled row's neighbours (unlabelled rows score 0 and vote for "")."""
    n = len(labels)
    own, voted, voted_share = np.zeros(n), np.full(n, "", dtype=object), np.zeros(n)
    classes = np.unique(labels[labels != ""]) if with_probs else None
    col = {c: i for i, c in enumerate(classes)} if classes is not None else {}
    probs = np.zeros((n, len(col))) if with_probs else None
    for i in range(n):
        if not labels[i]:
            continue
        votes = ranked_votes(labels, nb.sims[i], nb.rows[i], k, temperature)
        shares = dict(votes)
        own[i] = shares.get(labels[i], 0.0)
        if votes:
            voted[i], voted_share[i] = votes[0]
        if probs is not None:
            for label, share in votes:
                probs[i, col[label]] = share
    return LabelQuality(own, voted, voted_share, probs, classes)


def outlier_scores(nb: Neighbours) -> np.ndarray:
    """Similarity to the k-th neighbour (the farthest kept): low = unlike any other photo."""
    kth = nb.sims[:, -1].copy()
    return np.where(np.isfinite(kth), kth, -1.0)


def outlier_fence(scores: np.ndarray, iqr_factor: float = defaults.AUDIT_OUTLIER_IQR) -> float:
    """Tukey's far-out fence below the scores: Q1 - factor x IQR."""
    if len(scores) == 0:
        return -1.0
    q1, q3 = np.percentile(scores, [25, 75])
    return float(q1 - iqr_factor * (q3 - q1))
