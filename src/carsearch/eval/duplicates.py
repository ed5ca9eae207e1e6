"""Near-duplicates from embeddings: pairs above a cosine threshold by faiss range search (never an n x n
matrix), their connected components, and leakage of one set's photos into another's.

Memory follows the index plus one batch of queries' results, not the number of pairs: range search runs
`batch` queries at a time and keeps only the pairs it finds. Up to `defaults.AUDIT_EXACT_LIMIT` vectors
the index is exact (Flat); above it an IVF index (nprobe cells out of ~4 sqrt(n)) finds the pairs, which
near-duplicates, sitting almost on top of each other, share a cell with.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from carsearch import defaults


def search_index(vectors: np.ndarray, exact: bool | None = None, seed: int = defaults.SEED) -> faiss.Index:
    """An inner-product index over `vectors` for range and kNN search: Flat when `exact` (by default up
    to AUDIT_EXACT_LIMIT vectors), else IVF trained on a seeded sample."""
    x = np.ascontiguousarray(vectors, np.float32)
    n, d = x.shape
    if exact is None:
        exact = n <= defaults.AUDIT_EXACT_LIMIT
    if exact:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = max(1, min(n // 39, int(4 * math.sqrt(n))))
        index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = x[np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))]
        index.train(sample)
        index.nprobe = min(nlist, defaults.AUDIT_NPROBE)
    index.add(x)
    return index


def range_pairs(
    index: faiss.Index,
    queries: np.ndarray,
    threshold: float,
    self_search: bool = True,
    batch: int = 4096,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (query row, index row, similarity) with similarity >= threshold. With `self_search` the
    queries are the indexed vectors themselves: each pair is reported once (i < j), never (i, i)."""
    q = np.ascontiguousarray(queries, np.float32)
    out_i, out_j, out_s = [], [], []
    for start in range(0, len(q), batch):
        lims, sims, ids = index.range_search(q[start : start + batch], float(threshold))
        rows = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims.astype(np.int64)))
        keep = rows < ids if self_search else np.ones(len(ids), dtype=bool)
        out_i.append(rows[keep])
        out_j.append(ids[keep])
        out_s.append(sims[keep])
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    i, j, s = np.concatenate(out_i), np.concatenate(out_j).astype(np.int64), np.concatenate(out_s)
    order = np.lexsort((j, i))
    return i[order], j[order], s[order]


def components(n: int, i: np.ndarray, j: np.ndarray) -> list[np.ndarray]:
    """Groups of rows joined by pairs (connected components with two or more members), largest first,
    each sorted, ties by first member."""
    if len(i) == 0:
        return []
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    count, label = connected_components(graph, directed=False)
    sizes = np.bincount(label, minlength=count)
    groups = [np.flatnonzero(label == c) for c in np.flatnonzero(sizes > 1)]
    return sorted(groups, key=lambda g: (-len(g), int(g[0])))


def nearest_in(index: faiss.Index, queries: np.ndarray, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Each query's most similar indexed vector: (similarity, row), batch by batch."""
    q = np.ascontiguousarray(queries, np.float32)
    sims, rows = np.full(len(q), -np.inf, np.float32), np.full(len(q), -1, np.int64)
    for start in range(0, len(q), batch):
        s, r = index.search(q[start : start + batch], 1)
        sims[start : start + len(s)], rows[start : start + len(s)] = s[:, 0], r[:, 0]
    return sims, rows


def leaked(
    gallery: np.ndarray, queries: np.ndarray, threshold: float = defaults.NEAR_DUPLICATE_THRESHOLD
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which queries have a near-duplicate in the gallery: (mask, best similarity, gallery row)."""
    sims, rows = nearest_in(search_index(gallery), queries)
    return sims >= threshold, sims, rows
