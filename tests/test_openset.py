"""Open-set scores and metrics against direct computations."""

import numpy as np
import pytest

from carsearch.eval.openset import auroc, fpr_at_tpr, kth_similarity, threshold_for_tpr


def _auroc_pairs(known: np.ndarray, unknown: np.ndarray) -> float:
    wins = sum((k > u) + 0.5 * (k == u) for k in known for u in unknown)
    return wins / (len(known) * len(unknown))


def test_auroc_matches_pairwise_count_with_ties() -> None:
    rng = np.random.default_rng(1)
    known = np.round(rng.normal(0.6, 0.1, 80), 2)  # rounding makes ties
    unknown = np.round(rng.normal(0.5, 0.1, 60), 2)
    assert auroc(known, unknown) == pytest.approx(_auroc_pairs(known, unknown), abs=1e-12)
    assert auroc(np.array([1.0, 2.0]), np.array([0.0])) == 1.0
    assert auroc(np.array([0.0]), np.array([1.0, 2.0])) == 0.0


def test_threshold_keeps_the_target_share() -> None:
    scores = np.linspace(0, 1, 101)
    t = threshold_for_tpr(scores, 0.95)
    assert np.mean(scores >= t) >= 0.95
    assert np.mean(scores >= t + 1e-9) < 0.95  # the largest such threshold
    assert threshold_for_tpr(scores, 1.0) == 0.0


def test_fpr_at_tpr_direct() -> None:
    known = np.arange(100) / 100  # threshold for 95% TPR is 0.05
    unknown = np.array([0.0, 0.04, 0.05, 0.5])
    assert fpr_at_tpr(known, unknown, 0.95) == pytest.approx(0.5)


def test_kth_similarity() -> None:
    sims = np.array([[0.9, 0.8, 0.7], [0.5, 0.4, -np.inf]])
    assert kth_similarity(sims, 1).tolist() == [0.9, 0.5]
    assert kth_similarity(sims, 3).tolist() == [0.7, -np.inf]
    assert kth_similarity(sims, 4).tolist() == [-np.inf, -np.inf]
