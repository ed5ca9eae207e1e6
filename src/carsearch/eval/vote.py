"""Weighted kNN vote (DINO's kNN protocol, Caron et al. 2021, arXiv:2104.14294): each neighbour votes for its
label with weight exp(cos / T). One vectorised vote serves search, classify, bench, training's validation
and the audit, so all of them break ties the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from carsearch.defaults import TEMPERATURE

_BATCH = 2048  # queries per step: the label-agreement array is (batch, k, k)


@dataclass(frozen=True)
class Votes:
    """The ranked votes of n queries: `labels` (n, m) str, best first, "" past the labels that got a vote;
    `shares` (n, m) float64, each row summing to 1 (0 where nothing voted). m = the k neighbours given."""

    labels: np.ndarray
    shares: np.ndarray

    @property
    def winner(self) -> np.ndarray:
        """(n,) the winning label of each query, "" when no neighbour voted."""
        return self.labels[:, 0] if self.labels.shape[1] else np.full(len(self.labels), "", dtype=object)

    @property
    def winner_share(self) -> np.ndarray:
        """(n,) the winning label's share of the vote (the classifier's confidence), 0 when none voted."""
        return self.shares[:, 0] if self.shares.shape[1] else np.zeros(len(self.shares))

    def share_of(self, labels: np.ndarray) -> np.ndarray:
        """(n,) the share of the vote that went to `labels[i]` (n,) in query i (0 for "" or no vote)."""
        labels = np.asarray(labels).astype(str)
        hit = (self.labels == labels[:, None]) & (labels[:, None] != "")
        return (self.shares * hit).sum(axis=1)

    def ranked(self, i: int) -> list[tuple[str, float]]:
        """Query i's vote as (label, share) pairs, best first."""
        return [
            (str(lab), float(s)) for lab, s in zip(self.labels[i], self.shares[i], strict=True) if lab != ""
        ]


def knn_votes(neighbour_labels: np.ndarray, sims: np.ndarray, temperature: float = TEMPERATURE) -> Votes:
    """The weighted vote of every query's neighbours at once.

    `neighbour_labels` (n, k) str: the label of each query's neighbours, nearest first; "" (unlabelled, or
    no neighbour found) abstains. `sims` (n, k): their cosine similarities. A label's share is the sum of
    its neighbours' weights exp(cos / T) over all voting neighbours'. Ties (equal shares up to 1e-9) go to
    the label whose nearest neighbour ranks first: the same input always gives the same answer.
    Raises ValueError for a temperature <= 0."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    names = np.asarray(neighbour_labels).astype(str)
    n, k = names.shape if names.ndim == 2 else (len(names), 0)
    labels = np.full((n, k), "", dtype=object)
    shares = np.zeros((n, k))
    if n == 0 or k == 0:
        return Votes(labels, shares)
    vocab, codes = np.unique(names, return_inverse=True)
    codes = codes.reshape(n, k)
    if vocab[0] == "":  # "" sorts first: its neighbours abstain
        codes = codes - 1
        vocab = vocab[1:]
    if len(vocab) == 0:
        return Votes(labels, shares)
    positions = np.arange(k)
    for start in range(0, n, _BATCH):
        c = codes[start : start + _BATCH]
        s = np.asarray(sims[start : start + _BATCH], dtype=np.float64)
        valid = c >= 0
        # Subtracting each row's best voting similarity leaves the shares unchanged, keeps exp() finite.
        top = np.where(valid, s, -np.inf).max(axis=1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        w = np.where(valid, np.exp((np.where(valid, s, 0.0) - top) / temperature), 0.0)
        same = (c[:, :, None] == c[:, None, :]) & valid[:, :, None] & valid[:, None, :]
        label_total = (same * w[:, None, :]).sum(axis=2)  # at each position, its label's whole weight
        first = valid & (same.argmax(axis=2) == positions)  # a label's nearest neighbour stands for it
        total = w.sum(axis=1, keepdims=True)
        share = label_total / np.where(total > 0, total, 1.0)
        # Best share first; equal shares (to 1e-9) by the label's first rank; other positions last.
        key = np.where(first, -np.round(share, 9), np.inf)
        order = np.lexsort((np.broadcast_to(positions, c.shape), key), axis=1)
        ranked_first = np.take_along_axis(first, order, axis=1)
        ranked_codes = np.take_along_axis(c, order, axis=1)
        rows = slice(start, start + len(c))
        labels[rows] = np.where(ranked_first, vocab[np.clip(ranked_codes, 0, None)], "")
        shares[rows] = np.where(ranked_first, np.take_along_axis(share, order, axis=1), 0.0)
    return Votes(labels, shares)


def neighbour_labels(labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(n, k) str: the label of each neighbour row (`rows` index `labels`; -1, none found, gives "")."""
    labels, rows = np.asarray(labels).astype(str), np.asarray(rows)
    if len(labels) == 0:
        return np.full(rows.shape, "", dtype=str)
    return np.where(rows >= 0, labels[np.clip(rows, 0, None)], "")


def vote(
    labels: Sequence[str], similarities: np.ndarray, temperature: float = TEMPERATURE
) -> list[tuple[str, float]]:
    """Labels ranked by vote share (shares sum to 1), for one query's neighbours, nearest first; "" abstains.
    The one-query form of `knn_votes` (same weights, same tie rule)."""
    sims = np.asarray(similarities, dtype=np.float64)
    names = np.asarray(list(labels), dtype=str).reshape(1, len(sims))
    return knn_votes(names, sims[None, :], temperature).ranked(0)


def ranked_votes(
    labels: np.ndarray, sims: np.ndarray, rows: np.ndarray, k: int, temperature: float = TEMPERATURE
) -> list[tuple[str, float]]:
    """One query's vote from its search result: `rows` index `labels` (-1 = no neighbour found there)."""
    rows, sims = np.asarray(rows)[:k], np.asarray(sims)[:k]
    return vote(neighbour_labels(labels, rows), sims, temperature)
