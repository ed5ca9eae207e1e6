"""Neighbour oracles and bookkeeping shared by tuning, the protocols and training's validation: exact
search, one way to leave a query's own id out, recall against exact search, Recall@K."""

from __future__ import annotations

import faiss
import numpy as np


def exact_search(
    vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int, pad: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The oracle: exhaustive inner-product search of `queries` (m, d) over `vectors` (n, d) named by
    `ids` (n,): (similarities (m, c) float32, ids (m, c) int64), best first, c = min(k, n); with `pad`,
    c = k and faiss's padding (-1 ids) past the n-th."""
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    flat.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.asarray(ids, np.int64))
    return flat.search(np.ascontiguousarray(queries, np.float32), k if pad else min(k, len(ids)))


def drop_self(
    sims: np.ndarray, found: np.ndarray, self_ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each row without the query's own id (and without faiss's -1 padding), cut to k; rows that come
    up short are padded with -inf similarities and -1 ids. The one way a query is left out of its own
    neighbours, wherever collection images query their own collection."""
    out_sims = np.full((len(found), k), -np.inf)
    out_ids = np.full((len(found), k), -1, dtype=np.int64)
    for i, (row, me) in enumerate(zip(found, self_ids, strict=True)):
        keep = (row != me) & (row >= 0)
        kept = row[keep][:k]
        out_ids[i, : len(kept)] = kept
        out_sims[i, : len(kept)] = sims[i][keep][:k]
    return out_sims, out_ids


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean over queries of |found[:k] ∩ truth[:k]| / k (faiss's "k-recall@k"); -1 entries never match."""
    hits = 0
    for f, t in zip(found[:, :k], truth[:, :k], strict=True):
        hits += len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist()))
    denom = sum(min(k, int((t >= 0).sum())) for t in truth[:, :k])
    return hits / denom if denom else 1.0


def sample_queries(n: int, size: int, seed: int) -> np.ndarray:
    """A seeded sample of `size` row positions out of n (all of them when size >= n), sorted."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(size, n), replace=False))


def retrieval_recall(vectors: np.ndarray, classes: np.ndarray, ks: tuple[int, ...] = (1, 2, 4, 8)) -> dict:
    """Each (L2-normalised) vector queries all the others by exact cosine; Recall@K = share of queries with
    a vector of their class among their K nearest. The metric of the zero-shot protocol and of training's
    validation."""
    rows = np.arange(len(vectors))
    depth = min(max(ks), len(vectors) - 1)
    sims, found = exact_search(vectors, rows, vectors, depth + 1)
    _, neigh = drop_self(sims, found, rows, depth)
    same = (neigh >= 0) & (classes[neigh] == classes[:, None])
    return {f"recall@{k}": float(np.mean(same[:, :k].any(axis=1))) for k in ks}
