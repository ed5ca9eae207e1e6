"""Weighted kNN vote (DINO's kNN protocol): each neighbour votes for its label with weight exp(cos / T)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from carsearch.defaults import TEMPERATURE


def vote(
    labels: Sequence[str], similarities: np.ndarray, temperature: float = TEMPERATURE
) -> list[tuple[str, float]]:
    """Labels ranked by vote share (shares sum to 1), for one query's neighbours, nearest first.

    Unlabeled neighbours ("") do not vote. Ties (equal shares up to float noise) go to the label whose
    nearest neighbour ranks first, then to the alphabetically first label: the same input always gives
    the same answer.
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    sims = np.asarray(similarities, dtype=np.float64)
    if len(sims) == 0:
        return []
    # Subtracting the max leaves the shares unchanged and keeps exp() finite for any T.
    weights = np.exp((sims - sims.max()) / temperature)
    totals: dict[str, float] = {}
    first: dict[str, int] = {}
    for rank, (label, w) in enumerate(zip(labels, weights, strict=True)):
        if not label:
            continue
        totals[label] = totals.get(label, 0.0) + float(w)
        first.setdefault(label, rank)
    norm = sum(totals.values())
    if norm == 0:
        return []
    shares = {label: t / norm for label, t in totals.items()}
    ranked = sorted(shares, key=lambda lab: (-round(shares[lab], 9), first[lab], lab))
    return [(label, shares[label]) for label in ranked]


def ranked_votes(
    labels: np.ndarray, sims: np.ndarray, rows: np.ndarray, k: int, temperature: float = TEMPERATURE
) -> list[tuple[str, float]]:
    """One query's vote from its search result: `rows` index `labels` (-1 = no neighbour found there)."""
    rows, sims = np.asarray(rows)[:k], np.asarray(sims)[:k]
    ok = rows >= 0
    return vote([str(lab) for lab in labels[rows[ok]]], sims[ok], temperature)
