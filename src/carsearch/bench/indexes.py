"""The index protocol: what an index type costs and gives, measured against exact search.

Database = the gallery split, queries = the held-out split (real queries the index never saw).
Timings are wall-clock on this process's threads; each batched figure is the best of a few repeats.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from carsearch import defaults
from carsearch.eval.neighbors import recall_at_k
from carsearch.index.auto import human_bytes
from carsearch.index.core import Index
from carsearch.index.factory import tunable
from carsearch.index.families import FLAT, HNSW_FAMILY, IVF_FAMILY, PQ_CENTROIDS, ivf_lists

SINGLE_QUERIES = 200  # one-at-a-time queries timed for latency percentiles
TIMING_SECONDS = defaults.BENCH_TIMING_SECONDS
CURVE_SHARE = 0.4  # a recall-QPS curve's points: the best of 2, each this share of TIMING_SECONDS


def default_factories(n: int, d: int) -> tuple[list[str], dict[str, str]]:
    """Flat, HNSW32, IVF-Flat, IVF-PQ and OPQ+IVF-PQ sized for n training vectors of dimension d, less
    the types n vectors are too few to train: (the types kept, {type left out: why})."""
    lists = ivf_lists(n)
    m = max(8, next(m for m in range(d // 16, 0, -1) if d % m == 0))  # about 16 dimensions per code byte
    kept, left_out = [FLAT.factory(), HNSW_FAMILY.factory()], {}
    ivf_flat = IVF_FAMILY.factory(lists)
    if lists >= 2:
        kept.append(ivf_flat)
    else:
        left_out[ivf_flat] = (
            f"two inverted lists need {2 * IVF_FAMILY.training_floor()} training vectors "
            f"({IVF_FAMILY.training_floor()} per list, faiss's minimum) and the gallery holds {n}; one list "
            "is exact search"
        )
    pq_min = IVF_FAMILY.training_floor(m)
    for factory in (IVF_FAMILY.factory(lists, m), IVF_FAMILY.factory(lists, m, opq=True, opq_dim=4 * m)):
        if n >= pq_min:
            kept.append(factory)
        else:
            left_out[factory] = (
                f"8-bit product quantisation trains {PQ_CENTROIDS} centroids per sub-quantizer, which faiss "
                f"wants {pq_min:,} training vectors for, and the gallery holds {n:,}"
            )
    return kept, left_out


def recommend(measured: dict[str, dict], target_recall: float) -> dict[str, str]:
    """The index type to use for this collection, chosen from the measured figures, and why.

    Candidates reach the target 10-recall@10 on the held-out queries and lose at most
    defaults.RECOMMEND_MAX_TOP1_LOSS of kNN top-1 to the best type measured; the pick is the candidate
    with the lowest median single-query latency (search and serve ask one photo at a time). Exact search
    (Flat) stays the pick unless that one answers defaults.RECOMMEND_MIN_SPEEDUP times faster: it needs no
    training and no tuning, and its recall is 1. No candidate: the type with the highest 10-recall@10."""
    if not measured:
        return {}
    best_top1 = max((x["top1"] for x in measured.values() if "top1" in x), default=None)

    def accurate(x: dict) -> bool:
        return best_top1 is None or x.get("top1", best_top1) >= best_top1 - defaults.RECOMMEND_MAX_TOP1_LOSS

    def figures(f: str) -> str:
        x = measured[f]
        top1 = f", kNN top-1 {x['top1']:.1%}" if "top1" in x else ""
        return (
            f"10-recall@10 {x['10-recall@10']:.3f}{top1}, {x['p50_ms']:.2f} ms per query (p50), "
            f"{x['qps_batched']:,.0f} QPS batched, {human_bytes(x['memory_bytes'])}, built in "
            f"{x['build_seconds']:.1f} s"
        )

    candidates = [f for f, x in measured.items() if x["10-recall@10"] >= target_recall and accurate(x)]
    if not candidates:
        pick = max(measured, key=lambda f: measured[f]["10-recall@10"])
        why = (
            f"no type measured reaches 10-recall@10 {target_recall} with kNN top-1 within "
            f"{defaults.RECOMMEND_MAX_TOP1_LOSS:.0%} of the best; `{pick}` comes closest ({figures(pick)})."
        )
        return {"factory": pick, "why": why}
    fastest = min(candidates, key=lambda f: (measured[f]["p50_ms"], measured[f]["memory_bytes"]))
    if fastest == "Flat" or "Flat" not in candidates:
        others = ", ".join(f"`{f}`" for f in measured if f not in candidates)
        why = (
            f"`{fastest}` is the fastest one query at a time of the types that reach 10-recall@10 "
            f"{target_recall} and keep kNN top-1 within {defaults.RECOMMEND_MAX_TOP1_LOSS:.0%} of the best: "
            f"{figures(fastest)}." + (f" Short of that: {others}." if others else "")
        )
        return {"factory": fastest, "why": why}
    speedup = measured["Flat"]["p50_ms"] / measured[fastest]["p50_ms"]
    if speedup >= defaults.RECOMMEND_MIN_SPEEDUP:
        why = (
            f"`{fastest}` answers {speedup:.1f}x faster than exact search at the target 10-recall@10 "
            f"{target_recall} with kNN top-1 within {defaults.RECOMMEND_MAX_TOP1_LOSS:.0%} of the best: "
            f"{figures(fastest)}; `Flat`: {figures('Flat')}."
        )
        return {"factory": fastest, "why": why}
    why = (
        f"exact search is as good a choice here: `Flat` ({figures('Flat')}) is within "
        f"{defaults.RECOMMEND_MIN_SPEEDUP}x of the fastest type that reaches 10-recall@10 {target_recall}, "
        f"`{fastest}` ({figures(fastest)}), and needs no training or tuning."
    )
    return {"factory": "Flat", "why": why}


def time_batched(
    search: Callable[[np.ndarray, int], object],
    queries: np.ndarray,
    k: int,
    min_seconds: float = TIMING_SECONDS,
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


def measure(
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    queries: np.ndarray,
    truth: np.ndarray,
    k: int = 10,
    seconds: float = TIMING_SECONDS,
) -> dict:
    """1-recall@1 / 10-recall@10 of `search(queries, k)` against exact search's `truth` (m, k) int64,
    batched QPS (timed `seconds` at a time) and single-query QPS and latency percentiles (ms). The
    figures of faiss's indexes and of the peers alike."""
    _, found = search(queries, k)
    return {
        "1-recall@1": recall_at_k(found, truth, 1),
        "10-recall@10": recall_at_k(found, truth, k),
        "qps_batched": time_batched(search, queries, k, seconds),
        **time_single(search, queries, k),
    }


def sweep(
    run: Index, queries: np.ndarray, truth: np.ndarray, k: int = 10, seconds: float = TIMING_SECONDS
) -> list[dict]:
    """Recall@10 and batched QPS for each value of the index's search parameter (the recall-QPS curve)."""
    knob = tunable(run.faiss)
    tuned = run.params
    if knob.name is None:
        return recall_qps_curve(run.search, queries, truth, k, "", (None,), lambda _: None, seconds)
    points = recall_qps_curve(
        run.search,
        queries,
        truth,
        k,
        knob.name,
        knob.values,
        lambda v: run.set_params(f"{knob.name}={v}"),
        seconds,
    )
    run.set_params(tuned)
    return points


def recall_qps_curve(
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    queries: np.ndarray,
    truth: np.ndarray,
    k: int,
    knob: str,
    values: Sequence,
    set_value: Callable[[object], None],
    seconds: float = TIMING_SECONDS,
) -> list[dict]:
    """One point per knob value: {"param": "knob=value" ("" without a knob), "10-recall@10" against
    `truth` (m, k) int64, "qps_batched"} of `search(queries, k)` after `set_value(value)`. The curve of
    faiss's indexes and of the peers alike."""
    points = []
    for v in values:
        set_value(v)
        points.append(
            {
                "param": f"{knob}={v}" if knob else "",
                "10-recall@10": recall_at_k(search(queries, k)[1], truth, k),
                "qps_batched": time_batched(search, queries, k, CURVE_SHARE * seconds, repeats=2),
            }
        )
    return points
