"""Peers measured side by side with faiss in the same run: hnswlib's HNSW, numpy and torch brute force.

Each is brought to the same recall target where it has a knob (hnswlib's ef); brute force is exact.
A peer whose package is missing is skipped with the reason (install the `bench` extra).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable

import numpy as np

from carsearch.bench.indexes import TIMING_SECONDS, measure, recall_qps_curve
from carsearch.eval.neighbors import drop_self, exact_search, recall_at_k, sample_queries
from carsearch.index.families import HNSW_FAMILY
from carsearch.index.tune import cheapest_reaching

HNSW_EF = HNSW_FAMILY.EF_SEARCH  # the ladder faiss's HNSW is tuned on


def _numpy_search(gallery: np.ndarray) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
    def search(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims = q @ gallery.T
        part = np.argpartition(-sims, kth=min(k, sims.shape[1] - 1), axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1)
        idx = np.take_along_axis(part, order, axis=1)
        return np.take_along_axis(sims, idx, axis=1), idx

    return search


def _torch_search(gallery: np.ndarray) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
    import torch

    g = torch.from_numpy(gallery)

    def search(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            vals, idx = torch.topk(torch.mm(torch.from_numpy(q), g.T), k, dim=1)
        return vals.numpy(), idx.numpy()

    return search


def _peer(name: str, build_s: float, memory: int, params: str, figures: dict) -> dict:
    return {"name": name, "params": params, "build_seconds": build_s, "memory_bytes": memory, **figures}


def measure_peers(
    gallery: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    target_recall: float,
    k: int = 10,
    hnsw_m: int = 32,
    seed: int = 0,
    seconds: float = TIMING_SECONDS,
) -> tuple[list[dict], list[str]]:
    """(peer results, skipped-with-reason lines). hnswlib's ef is tuned like faiss's efSearch: on the
    gallery's own vectors as queries (each one's own id left out), never on the measured queries."""
    out, skipped = [], []
    figures = measure(_numpy_search(gallery), queries, truth, k, seconds)
    out.append(_peer("numpy brute force (matrix product)", 0.0, gallery.nbytes, "", figures))
    try:
        figures = measure(_torch_search(gallery), queries, truth, k, seconds)
        out.append(_peer("torch.mm brute force", 0.0, gallery.nbytes, "", figures))
    except ImportError as e:
        skipped.append(f"torch: {e}")
    try:
        import hnswlib
    except ImportError:
        skipped.append("hnswlib: not installed (pip install 'carsearch[bench]')")
        return out, skipped
    t0 = time.perf_counter()
    index = hnswlib.Index(space="ip", dim=gallery.shape[1])
    # faiss's HNSW defaults (M=32, efConstruction=40), so the two graphs are built alike.
    index.init_index(max_elements=len(gallery), M=hnsw_m, ef_construction=40, random_seed=0)
    index.add_items(gallery, np.arange(len(gallery)))
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        index.save_index(os.path.join(tmp, "h.bin"))
        memory = os.path.getsize(os.path.join(tmp, "h.bin"))

    def search(q: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        labels, dist = index.knn_query(q, k=kk)
        return 1 - dist, labels.astype(np.int64)

    sample = sample_queries(len(gallery), 1000, seed)
    ids = np.arange(len(gallery))
    self_truth = drop_self(*exact_search(gallery, ids, gallery[sample], k + 1), ids[sample], k)[1]

    def recall_with(ef: int) -> float:
        index.set_ef(max(ef, k + 1))
        return recall_at_k(drop_self(*search(gallery[sample], k + 1), ids[sample], k)[1], self_truth, k)

    chosen, _ = cheapest_reaching(HNSW_EF, recall_with, target_recall)
    # The recall-QPS curve, to compare with faiss's HNSW at equal recall.
    curve = recall_qps_curve(
        search, queries, truth, k, "ef", HNSW_EF, lambda ef: index.set_ef(max(ef, k)), seconds
    )
    index.set_ef(max(chosen, k + 1))
    figures = measure(search, queries, truth, k, seconds)
    out.append({**_peer(f"hnswlib HNSW{hnsw_m}", build_s, memory, f"ef={chosen}", figures), "sweep": curve})
    return out, skipped
