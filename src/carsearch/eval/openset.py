"""Open-set scoring: a query far from every indexed image is "unknown" (Sun et al. 2022, kNN OOD).

Score = cosine similarity to the k-th nearest indexed image; the threshold keeps a chosen share (95%)
of queries of known classes. An answer that is not rejected can still be uncertain: its vote share is
below the share that the same share of right answers reach (`uncertain_threshold`).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import mannwhitneyu

from carsearch.defaults import K_VOTE, TEMPERATURE, TPR
from carsearch.eval.neighbors import drop_self, sample_queries
from carsearch.eval.vote import ranked_votes


def kth_similarity(similarities: np.ndarray, k: int) -> np.ndarray:
    """Per row, the similarity of the k-th neighbour (1-based); -inf where fewer than k were found."""
    sims = np.atleast_2d(similarities)
    if sims.shape[1] < k:
        return np.full(len(sims), -np.inf)
    col = sims[:, k - 1].astype(np.float64)
    return np.where(np.isfinite(col), col, -np.inf)


def threshold_for_tpr(known_scores: np.ndarray, tpr: float = TPR) -> float:
    """The largest threshold that keeps at least `tpr` of the known queries (score >= threshold)."""
    s = np.sort(np.asarray(known_scores, dtype=np.float64))
    if len(s) == 0:
        raise ValueError("no scores to calibrate on")
    if not 0 < tpr <= 1:
        raise ValueError("tpr must be in (0, 1]")
    drop = int(np.floor((1 - tpr) * len(s) + 1e-9))
    return float(s[min(drop, len(s) - 1)])


def calibrated(scores: np.ndarray, tpr: float, method: str, unknown: np.ndarray | None = None) -> dict:
    """The threshold keeping `tpr` of `scores` (known queries, higher = known), what it kept, and the share
    of `unknown` scores it still accepts: what index.json records of a calibration."""
    threshold = threshold_for_tpr(scores, tpr)
    out = {
        "threshold": round(threshold, 6),
        "tpr_target": tpr,
        "tpr": round(float(np.mean(scores >= threshold)), 4),
        "queries": len(scores),
        "method": method,
    }
    if unknown is not None and len(unknown):
        out["unknown_queries"] = len(unknown)
        out["fpr"] = round(float(np.mean(unknown >= threshold)), 4)
    return out


def auroc(known_scores: np.ndarray, unknown_scores: np.ndarray) -> float:
    """P(score of a known query > score of an unknown one), ties counting one half: the Mann-Whitney U of
    the known scores over the product of the two counts (scipy's; NaN when either side is empty)."""
    k = np.asarray(known_scores, dtype=np.float64)
    u = np.asarray(unknown_scores, dtype=np.float64)
    if len(k) == 0 or len(u) == 0:
        return float("nan")
    return float(mannwhitneyu(k, u).statistic / (len(k) * len(u)))


def fpr_at_tpr(known_scores: np.ndarray, unknown_scores: np.ndarray, tpr: float = TPR) -> float:
    """Share of unknown queries still accepted at the threshold that keeps `tpr` of the known ones."""
    t = threshold_for_tpr(known_scores, tpr)
    u = np.asarray(unknown_scores, dtype=np.float64)
    return float(np.mean(u >= t)) if len(u) else float("nan")


def leave_one_out_scores(
    index, vectors: np.ndarray, ids: np.ndarray, k: int, sample: int, seed: int
) -> np.ndarray:
    """Open-set scores of collection images searched against the collection without themselves.

    `index` is anything with faiss's `search(queries, k) -> (similarities, ids)`."""
    q = sample_queries(len(ids), sample, seed)
    kept, _ = leave_one_out_neighbors(index, vectors[q], ids[q], k)
    return kth_similarity(kept, k)


def leave_one_out_neighbors(
    index, vectors: np.ndarray, ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities (n, k) float32, ids (n, k) int64) of indexed images `vectors` (n, d) float32 with ids
    `ids` (n,), each searched without itself."""
    sims, found = index.search(np.ascontiguousarray(vectors, dtype=np.float32), k + 1)
    return drop_self(sims, found, ids, k)


def uncertain_threshold(
    sims: np.ndarray, found: np.ndarray, truth: np.ndarray, gallery, tpr: float = TPR
) -> dict | None:
    """The vote share under which a (not rejected) answer is called uncertain, set like the open-set
    threshold: as low as the share of `tpr` of the right answers of held-out images of known classes.

    `sims`, `found` (n, >= K_VOTE): each held-out image's neighbours without itself; `truth` (n,) its class
    label. The vote is the classifier's (k K_VOTE, temperature TEMPERATURE, class level). None when fewer
    than two held-out images were labelled and answered right."""
    labels = gallery.level("class")
    shares, right = [], []
    for s, f, t in zip(sims, found, truth, strict=True):
        ranked = ranked_votes(labels, s, gallery.rows(f), K_VOTE, TEMPERATURE)
        if ranked and t:
            shares.append(ranked[0][1])
            right.append(ranked[0][0] == t)
    shares_a, right_a = np.array(shares), np.array(right, bool)
    if right_a.sum() < 2:
        return None
    threshold = threshold_for_tpr(shares_a[right_a], tpr)
    return {
        "share_threshold": round(threshold, 6),
        "k": K_VOTE,
        "temperature": TEMPERATURE,
        "queries": len(shares_a),
        "accuracy": round(float(right_a.mean()), 4),
        # Of the held-out answers: the right ones called uncertain (1 - tpr by construction) and the wrong.
        "right_flagged": round(float(np.mean(shares_a[right_a] < threshold)), 4),
        "wrong_flagged": round(float(np.mean(shares_a[~right_a] < threshold)), 4)
        if (~right_a).any()
        else None,
    }
