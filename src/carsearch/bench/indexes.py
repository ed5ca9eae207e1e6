"""The index protocol: what an index type costs and gives, measured against exact search.

Database = the gallery split, queries = the held-out split (real queries the index never saw).
Timings are wall-clock on this process's threads; each batched figure is the best of a few repeats.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

from carsearch.eval.neighbors import recall_at_k
from carsearch.index.auto import ivf_lists
from carsearch.index.core import Index
from carsearch.index.factory import tunable

SINGLE_QUERIES = 200  # one-at-a-time queries timed for latency percentiles


def default_factories(n: int, d: int) -> list[str]:
    """Flat, HNSW32, IVF-Flat, IVF-PQ and OPQ+IVF-PQ sized for n vectors of dimension d."""
    lists = ivf_lists(n)
    m = max(8, next(m for m in range(d // 16, 0, -1) if d % m == 0))  # about 16 dimensions per code byte
    return ["Flat", "HNSW32", f"IVF{lists},Flat", f"IVF{lists},PQ{m}", f"OPQ{m}_{4 * m},IVF{lists},PQ{m}"]


def time_batched(
    search: Callable[[np.ndarray, int], object],
    queries: np.ndarray,
    k: int,
    min_seconds: float = 0.5,
    repeats: int = 3,
) -> float:
    """Queries per second when all queries go in one call (best of `repeats`, each >= min_seconds)."""
    best = math.inf
    for _ in range(repeats):
        calls, t0 = 0, time.perf_counter()
        while True:
            search(queries, k)
            calls += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds:
                break
        best = min(best, elapsed / calls)
    return len(queries) / best


def time_single(search: Callable[[np.ndarray, int], object], queries: np.ndarray, k: int) -> dict[str, float]:
    """One query per call: queries per second and latency percentiles in milliseconds."""
    q = queries[:SINGLE_QUERIES]
    search(q[:1], k)  # warm-up
    lat = []
    for i in range(len(q)):
        t0 = time.perf_counter()
        search(q[i : i + 1], k)
        lat.append(time.perf_counter() - t0)
    lat_ms = np.array(lat) * 1e3
    return {
        "qps_single": float(1e3 / lat_ms.mean()),
        "p50_ms": float(np.percentile(lat_ms, 50)),
        "p99_ms": float(np.percentile(lat_ms, 99)),
    }


def measure(run: Index, queries: np.ndarray, truth: np.ndarray, k: int = 10) -> dict:
    """Recall@1 / @10 against exact search, batched and single-query speed."""
    _, found = run.search(queries, k)
    return {
        "recall@1": recall_at_k(found, truth, 1),
        "recall@10": recall_at_k(found, truth, k),
        "qps_batched": time_batched(run.search, queries, k),
        **time_single(run.search, queries, k),
    }


def sweep(run: Index, queries: np.ndarray, truth: np.ndarray, k: int = 10) -> list[dict]:
    """Recall@10 and batched QPS for each value of the index's search parameter (the recall-QPS curve)."""
    knob = tunable(run.faiss)
    tuned = run.params
    points = []
    values = knob.values if knob.name else (None,)
    for v in values:
        if knob.name:
            run.set_params(f"{knob.name}={v}")
        _, found = run.search(queries, k)
        points.append(
            {
                "param": f"{knob.name}={v}" if knob.name else "",
                "recall@10": recall_at_k(found, truth, k),
                "qps_batched": time_batched(run.search, queries, k, min_seconds=0.2, repeats=2),
            }
        )
    run.set_params(tuned)
    return points
