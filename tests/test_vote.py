"""The weighted kNN vote against hand-computed votes, ties included."""

import math

import numpy as np
import pytest

from carsearch.eval.vote import knn_votes, vote


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


def _oracle(labels: list[str], sims: list[float], t: float) -> list[tuple[str, float]]:
    """The vote written the plain way, independently of eval.vote: per label the sum of exp(cos / T),
    divided by the sum over voting neighbours; best share first, equal shares by the label's first rank."""
    weights = [math.exp(s / t) for s in sims]
    totals: dict[str, float] = {}
    first: dict[str, int] = {}
    for rank, (lab, w) in enumerate(zip(labels, weights, strict=True)):
        if lab:
            totals[lab] = totals.get(lab, 0.0) + w
            first.setdefault(lab, rank)
    norm = sum(totals.values())
    order = sorted(totals, key=lambda lab: (-round(totals[lab] / norm, 9), first[lab]))
    return [(lab, totals[lab] / norm) for lab in order]


def test_vectorised_vote_equals_an_independent_oracle() -> None:
    """knn_votes over thousands of queries (more than one batch) against the plain-Python vote: random
    labels with abstentions, repeated similarities (ties), and a row where nothing votes."""
    rng = np.random.default_rng(3)
    n, k, t = 2500, 12, 0.07
    labels = rng.choice(["", "a", "b", "c", "d", "e"], size=(n, k), p=[0.15, 0.3, 0.2, 0.15, 0.1, 0.1])
    sims = np.sort(rng.choice(np.linspace(0.3, 0.9, 7), size=(n, k)), axis=1)[:, ::-1]  # many equal
    labels[5] = ""
    votes = knn_votes(labels, sims, t)
    for i in range(n):
        want = _oracle(list(labels[i]), list(sims[i]), t)
        got = votes.ranked(i)
        assert [lab for lab, _ in got] == [lab for lab, _ in want], i
        assert [s for _, s in got] == pytest.approx([s for _, s in want], rel=1e-9)
    assert votes.winner[5] == "" and votes.winner_share[5] == 0
    own = labels[:, 0]
    assert votes.share_of(own) == pytest.approx([dict(votes.ranked(i)).get(own[i], 0.0) for i in range(n)])
