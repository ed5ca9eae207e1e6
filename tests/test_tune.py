"""Recall measurement and parameter tuning against a brute-force numpy oracle."""

import numpy as np

from carsearch.eval.neighbors import drop_self, exact_search, recall_at_k
from carsearch.index.factory import make_index, train_and_add
from carsearch.index.tune import tune


def _data(n: int = 4000, d: int = 48) -> np.ndarray:
    # Clustered data, like embeddings: 40 centres with noise.
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((40, d))
    x = centres[rng.integers(0, 40, n)] + 0.6 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_exact_search_equals_numpy() -> None:
    x = _data(500)
    ids = np.arange(500) + 10
    sims, found = exact_search(x, ids, x[:30], 5)
    oracle = np.argsort(-(x[:30] @ x.T), axis=1)[:, :5] + 10
    assert (found == oracle).all()
    assert np.allclose(sims, np.sort(x[:30] @ x.T, axis=1)[:, ::-1][:, :5], atol=1e-5)


def test_recall_and_drop_self() -> None:
    truth = np.array([[1, 2, 3], [4, 5, 6]])
    found = np.array([[1, 9, 3], [-1, -1, -1]])
    assert recall_at_k(found, truth, 3) == (2 + 0) / 6
    found = np.array([[7, 1, 2], [3, 7, 4]])
    assert drop_self(np.zeros(found.shape), found, np.array([7, 7]), 2)[1].tolist() == [[1, 2], [3, 4]]


def test_tuning_reaches_the_target_with_the_cheapest_value() -> None:
    x = _data()
    ids = np.arange(len(x))
    index = make_index("IVF64,Flat", x.shape[1])
    train_and_add(index, x, ids)
    result = tune(index, x, ids, target=0.9, sample=300)
    assert result.reached and result.recall >= 0.9
    values = [v for v, _ in result.curve]
    assert result.params == f"nprobe={values[-1]}"
    assert all(r < 0.9 for _, r in result.curve[:-1])  # every cheaper value missed the target
    # Independent check with the numpy oracle on other queries.
    q = x[-200:]
    _, found = index.search(q, 10)
    oracle = np.argsort(-(q @ x.T), axis=1)[:, :10]
    assert recall_at_k(found, oracle, 10) >= 0.85
