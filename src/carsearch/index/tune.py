"""Recall against exact search, and the cheapest search parameter that reaches a recall target."""

from __future__ import annotations

from dataclasses import dataclass, field

import faiss
import numpy as np

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


def exact_search(
    vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The oracle: exhaustive inner-product search (similarities, ids), best first."""
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    flat.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.asarray(ids, np.int64))
    return flat.search(np.ascontiguousarray(queries, np.float32), min(k, len(ids)))


def drop_self(found: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """Each row without the query's own id, cut to k (rows padded with -1 if short)."""
    out = np.full((len(found), k), -1, dtype=np.int64)
    for i, (row, me) in enumerate(zip(found, self_ids, strict=True)):
        kept = row[row != me][:k]
        out[i, : len(kept)] = kept
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean over queries of |found[:k] ∩ truth[:k]| / k (faiss's "k-recall@k"); -1 entries never match."""
    hits = 0
    for f, t in zip(found[:, :k], truth[:, :k], strict=True):
        hits += len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist()))
    denom = sum(min(k, int((t >= 0).sum())) for t in truth[:, :k])
    return hits / denom if denom else 1.0


def sample_queries(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(size, n), replace=False))


def tune(
    index: faiss.Index,
    vectors: np.ndarray,
    ids: np.ndarray,
    target: float = 0.95,
    k: int = 10,
    sample: int = 1000,
    seed: int = 0,
) -> TuneResult:
    """Set on `index` the cheapest value of its search parameter whose recall@k reaches `target`.

    If no value reaches it (product quantisation loses information), the best value is kept and
    `reached` is False.
    """
    q = sample_queries(len(ids), sample, seed)
    queries, self_ids = vectors[q], ids[q]
    truth = drop_self(exact_search(vectors, ids, queries, k + 1)[1], self_ids, k)
    knob = tunable(index)

    def measure() -> float:
        return recall_at_k(drop_self(index.search(queries, k + 1)[1], self_ids, k), truth, k)

    if knob.name is None:
        r = measure()
        return TuneResult("", r, r >= target, k, len(q))
    curve: list[tuple[int, float]] = []
    for value in knob.values:
        set_search_params(index, f"{knob.name}={value}")
        curve.append((value, measure()))
        if curve[-1][1] >= target:
            break
    best_value = max(curve, key=lambda vr: (vr[1], -vr[0]))[0]
    chosen = next((v for v, r in curve if r >= target), best_value)
    recall = dict(curve)[chosen]
    set_search_params(index, f"{knob.name}={chosen}")
    return TuneResult(f"{knob.name}={chosen}", recall, recall >= target, k, len(q), curve)
