"""Recall against exact search, and the cheapest search parameter that reaches a recall target."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import faiss
import numpy as np

from carsearch.defaults import TARGET_RECALL, TUNE_K, TUNE_QUERIES
from carsearch.eval.neighbors import drop_self, exact_search, recall_at_k, sample_queries
from carsearch.index.factory import set_search_params, tunable


@dataclass
class TuneResult:
    params: str  # "efSearch=64", "nprobe=16" or "" (exact)
    recall: float  # recall@k measured with `params`
    reached: bool  # whether `recall` >= target
    k: int
    queries: int
    curve: list[tuple[int, float]] = field(default_factory=list)  # (parameter value, recall@k)

    def to_json(self, target: float) -> dict:
        return {
            "k": self.k,
            "target": target,
            "measured": round(self.recall, 4),
            "reached": self.reached,
            "queries": self.queries,
            "params": self.params,
            "curve": [[v, round(r, 4)] for v, r in self.curve],
            "method": "collection vectors as queries (each one's own id left out), "
            "exact inner product as truth",
        }


def cheapest_reaching(
    values: Sequence[int], recall_of: Callable[[int], float], target: float
) -> tuple[int, list[tuple[int, float]]]:
    """Walk a search knob's `values` cheapest first, measuring `recall_of(value)`, until one reaches
    `target`: (that value, or where none does the one with the best recall, the cheaper of equals; the
    (value, recall) curve measured). The one sweep behind index tuning and the bench's peers."""
    curve: list[tuple[int, float]] = []
    for value in values:
        curve.append((value, recall_of(value)))
        if curve[-1][1] >= target:
            return value, curve
    return max(curve, key=lambda vr: (vr[1], -vr[0]))[0], curve


def tune(
    index: faiss.Index,
    vectors: np.ndarray,
    ids: np.ndarray,
    target: float = TARGET_RECALL,
    k: int = TUNE_K,
    sample: int = TUNE_QUERIES,
    seed: int = 0,
) -> TuneResult:
    """Set on `index` the cheapest value of its search parameter whose recall@k reaches `target`.

    If no value reaches it (product quantisation loses information), the best value is kept and
    `reached` is False.
    """
    q = sample_queries(len(ids), sample, seed)
    queries, self_ids = vectors[q], ids[q]
    truth = drop_self(*exact_search(vectors, ids, queries, k + 1), self_ids, k)[1]
    return tune_with_truth(index, queries, self_ids, truth, target, k)


def tune_with_truth(
    index: faiss.Index,
    queries: np.ndarray,
    self_ids: np.ndarray,
    truth: np.ndarray,
    target: float = TARGET_RECALL,
    k: int = TUNE_K,
) -> TuneResult:
    """`tune` with the exact neighbours of the sampled collection queries given (each one's own id left
    out), e.g. computed shard by shard by a streaming build."""
    knob = tunable(index)

    def measure() -> float:
        return recall_at_k(drop_self(*index.search(queries, k + 1), self_ids, k)[1], truth, k)

    if knob.name is None:
        r = measure()
        return TuneResult("", r, r >= target, k, len(queries))

    def recall_with(value: int) -> float:
        set_search_params(index, f"{knob.name}={value}")
        return measure()

    chosen, curve = cheapest_reaching(knob.values, recall_with, target)
    recall = dict(curve)[chosen]
    set_search_params(index, f"{knob.name}={chosen}")
    return TuneResult(f"{knob.name}={chosen}", recall, recall >= target, k, len(queries), curve)
