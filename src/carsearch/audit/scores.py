"""Per-photo audit scores from each photo's k nearest neighbours in the collection (itself left out).

- label quality: the share of the weighted kNN vote (the classifier's own vote) that goes to the photo's
  label; the mislabel score is 1 minus it (cleanlab's "self-confidence", with kNN vote probabilities);
- outlier score: similarity to the k-th neighbour; the lowest are photos like no other.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
from scipy.sparse import coo_matrix

from carsearch import defaults
from carsearch.eval.neighbors import drop_self
from carsearch.eval.vote import knn_votes, neighbour_labels


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
    # Per row: the neighbours can judge its label: some labelled neighbour voted, and its class has at
    # least AUDIT_MIN_CLASS photos (a singleton or a rare class finds no other example near it anyway).
    judgeable: np.ndarray | None = None

    @property
    def mislabel_score(self) -> np.ndarray:
        return 1.0 - self.own_share

    @property
    def flagged(self) -> np.ndarray:
        """Likely mislabelled: the photo's own label gets (almost) none of its neighbours' vote, among
        photos that can be judged (too few examples of a class is not evidence against its label)."""
        flagged = self.mislabel_score >= defaults.AUDIT_MISLABEL_FLAG
        return flagged if self.judgeable is None else flagged & self.judgeable

    @property
    def too_few_examples(self) -> np.ndarray:
        """Labelled rows the vote cannot judge (see `judgeable`)."""
        return np.zeros(len(self.own_share), bool) if self.judgeable is None else ~self.judgeable


def label_quality(
    labels: np.ndarray,
    nb: Neighbours,
    k: int = defaults.AUDIT_VOTE_K,
    temperature: float = defaults.TEMPERATURE,
    with_probs: bool = False,
) -> LabelQuality:
    """The classifier's weighted kNN vote (`eval.vote.knn_votes`: weight exp(cos / T), unlabelled
    neighbours abstain, ties to the label ranked first) of every row's neighbours; unlabelled rows score 0
    and vote for "". Raises ValueError for a temperature <= 0."""
    labels = np.asarray(labels).astype(str)
    names, codes = np.unique(labels, return_inverse=True)
    votes = knn_votes(neighbour_labels(labels, nb.rows[:, :k]), nb.sims[:, :k], temperature)
    has_vote = (votes.winner != "") & (labels != "")
    own = np.where(has_vote, votes.share_of(labels), 0.0)
    voted = np.where(has_vote, votes.winner, "").astype(object)
    voted_share = np.where(has_vote, votes.winner_share, 0.0)
    probs = classes = None
    if with_probs:
        classes = names[names != ""]
        got = votes.labels != ""
        r, c = np.nonzero(got)
        col = np.searchsorted(classes, votes.labels[r, c].astype(str))
        probs = coo_matrix((votes.shares[r, c], (r, col)), shape=(len(labels), len(classes))).toarray()
        probs[~has_vote] = 0.0
    class_size = np.bincount(codes, minlength=len(names))[codes]
    judgeable = (labels == "") | (has_vote & (class_size >= defaults.AUDIT_MIN_CLASS))
    return LabelQuality(own, voted, voted_share, probs, classes, judgeable)


def outlier_scores(nb: Neighbours, k: int = defaults.AUDIT_OUTLIER_K) -> np.ndarray:
    """Similarity to the k-th neighbour (or the farthest found, in a smaller set): low = unlike any other."""
    kth = nb.sims[:, min(k, nb.sims.shape[1]) - 1].copy()
    return np.where(np.isfinite(kth), kth, -1.0)


def outlier_fence(scores: np.ndarray, iqr_factor: float = defaults.AUDIT_OUTLIER_IQR) -> float:
    """Tukey's far-out fence below the scores: Q1 - factor x IQR."""
    if len(scores) == 0:
        return -1.0
    q1, q3 = np.percentile(scores, [25, 75])
    return float(q1 - iqr_factor * (q3 - q1))
