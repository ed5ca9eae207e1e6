"""The weighted kNN vote against hand-computed votes, ties included."""

import math

import numpy as np
import pytest

from carsearch.eval.vote import vote


def test_hand_computed_vote() -> None:
    labels = ["a", "b", "a", "c"]
    sims = np.array([0.9, 0.8, 0.7, 0.6])
    t = 0.1
    w = {"a": math.exp(0.9 / t) + math.exp(0.7 / t), "b": math.exp(0.8 / t), "c": math.exp(0.6 / t)}
    total = sum(w.values())
    got = vote(labels, sims, t)
    assert [lab for lab, _ in got] == ["a", "b", "c"]
    for lab, share in got:
        assert share == pytest.approx(w[lab] / total, rel=1e-9)


def test_many_far_neighbours_can_outvote_one_near() -> None:
    # With T large, weights are nearly equal: three "b" beat one "a" even though "a" is nearest.
    assert vote(["a", "b", "b", "b"], np.array([0.9, 0.5, 0.5, 0.5]), temperature=10.0)[0][0] == "b"
    # With T small, the nearest dominates.
    assert vote(["a", "b", "b", "b"], np.array([0.9, 0.5, 0.5, 0.5]), temperature=0.01)[0][0] == "a"


def test_exact_tie_goes_to_the_nearest_label_then_alphabet() -> None:
    # "b" and "a" each get exactly one neighbour at the same similarity: "b" ranks first in the list.
    got = vote(["b", "a"], np.array([0.5, 0.5]), 0.07)
    assert [lab for lab, _ in got] == ["b", "a"]
    assert got[0][1] == pytest.approx(0.5)
    # Two neighbours each, same sums: "z" has the nearer neighbour, so "z" wins.
    got = vote(["z", "a", "a", "z"], np.array([0.8, 0.8, 0.6, 0.6]), 0.07)
    assert [lab for lab, _ in got] == ["z", "a"]
    # Float noise does not break the tie rule: shares equal to 1e-12 count as equal.
    got = vote(["y", "x"], np.array([0.5, 0.5 + 1e-13]), 0.07)
    assert [lab for lab, _ in got] == ["y", "x"]


def test_unlabeled_neighbours_do_not_vote_and_empty_input() -> None:
    got = vote(["", "a", ""], np.array([0.99, 0.1, 0.98]), 0.07)
    assert got == [("a", pytest.approx(1.0))]
    assert vote([], np.array([]), 0.07) == []
    assert vote(["", ""], np.array([0.5, 0.4]), 0.07) == []


def test_shares_sum_to_one_and_are_stable_for_large_similarities() -> None:
    rng = np.random.default_rng(0)
    labels = list(rng.choice(list("abcdefg"), 20))
    sims = np.sort(rng.uniform(-1, 1, 20))[::-1]
    got = vote(labels, sims, 0.001)  # exp(1/0.001) would overflow without the max shift
    assert sum(s for _, s in got) == pytest.approx(1.0)
    assert all(np.isfinite(s) for _, s in got)


def test_bad_temperature() -> None:
    with pytest.raises(ValueError):
        vote(["a"], np.array([0.5]), 0.0)
