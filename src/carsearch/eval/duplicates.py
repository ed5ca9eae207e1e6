"""Near-duplicates from embeddings: pairs above a cosine threshold by faiss range search (never an n x n
matrix), their connected components, and leakage of one set's photos into another's.

Memory follows the index plus one batch of queries' results, not the number of pairs: range search runs
`batch` queries at a time and keeps only the pairs it finds. The index is built by
`index.families.neighbour_index` (exact up to AUDIT_EXACT_LIMIT vectors, IVF-SQ8 above).
"""

from __future__ import annotations

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def range_pairs(
    index: faiss.Index,
    queries: np.ndarray,
    threshold: float,
    self_search: bool = True,
    batch: int = 4096,
    query_rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (query row, index row, similarity) with similarity >= threshold. With `self_search` the
    queries are the indexed vectors themselves: each pair is reported once (i < j), never (i, i).
    `query_rows`: the indexed rows the queries are, when they are a subset of them."""
    q = np.ascontiguousarray(queries, np.float32)
    where = np.arange(len(q)) if query_rows is None else np.asarray(query_rows, np.int64)
    out_i, out_j, out_s = [], [], []
    for start in range(0, len(q), batch):
        lims, sims, ids = index.range_search(q[start : start + batch], float(threshold))
        rows = np.repeat(where[start : start + len(lims) - 1], np.diff(lims.astype(np.int64)))
        keep = rows < ids if self_search else np.ones(len(ids), dtype=bool)
        out_i.append(rows[keep])
        out_j.append(ids[keep])
        out_s.append(sims[keep])
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    i, j, s = np.concatenate(out_i), np.concatenate(out_j).astype(np.int64), np.concatenate(out_s)
    order = np.lexsort((j, i))
    return i[order], j[order], s[order]


def near_pairs(
    index: faiss.Index,
    vectors: np.ndarray,
    threshold: float,
    nb_sims: np.ndarray,
    nb_rows: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`range_pairs(index, vectors, threshold)` (self-search), reusing each row's k nearest neighbours
    (itself left out) found by the same index: a row whose k-th neighbour is below the threshold has all
    its pairs among them, so only rows with k neighbours at or above it are range-searched."""
    full = nb_sims[:, -1] >= threshold if nb_sims.shape[1] else np.ones(len(vectors), dtype=bool)
    r, c = np.nonzero((nb_sims >= threshold) & ~full[:, None] & (nb_rows >= 0))
    i, j, s = r, nb_rows[r, c], nb_sims[r, c]
    rows = np.flatnonzero(full)
    if len(rows):
        ri, rj, rs = range_pairs(index, vectors[rows], threshold, self_search=False, query_rows=rows)
        keep = ri != rj
        i, j, s = np.concatenate([i, ri[keep]]), np.concatenate([j, rj[keep]]), np.concatenate([s, rs[keep]])
    a, b = np.minimum(i, j), np.maximum(i, j)
    if len(a) == 0:
        return a.astype(np.int64), b.astype(np.int64), s.astype(np.float32)
    # Each pair once (found from both ends), with the larger of its two similarity estimates.
    order = np.lexsort((-s, b, a))
    a, b, s = a[order], b[order], s[order]
    first = np.ones(len(a), dtype=bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return a[first].astype(np.int64), b[first].astype(np.int64), s[first].astype(np.float32)


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
