"""One `Index` class: a faiss index built from a factory string, tuned, searched with its tuned
parameters, changed (add / remove) and persisted. `index build`, `bench`, `search` and `serve` all use it.

Vectors are L2-normalised and compared by inner product (= cosine); ids are int64 (the shards' ids, or row
positions for in-memory protocols).
"""

from __future__ import annotations

import time
from pathlib import Path

import faiss
import numpy as np

from carsearch.defaults import MAX_TRAIN_VECTORS, TARGET_RECALL
from carsearch.eval.neighbors import exact_search
from carsearch.index.factory import (
    exhaustive_params,
    index_bytes,
    make_index,
    remove_ids,
    set_search_params,
    stored_ids,
    stored_vectors,
    train_and_add,
)
from carsearch.index.tune import TuneResult, tune


class Index:
    """A faiss index with its factory string and search parameters."""

    def __init__(self, index: faiss.Index, factory: str, params: str = "") -> None:
        self.faiss = index
        self.factory = factory
        self.params = ""
        self.tuned: TuneResult | None = None
        self.timings: dict[str, float] = {}
        self.set_params(params)

    @classmethod
    def build(
        cls,
        factory: str,
        vectors: np.ndarray,
        ids: np.ndarray | None = None,
        *,
        seed: int = 0,
        target_recall: float | None = TARGET_RECALL,
        params: str | None = None,
        max_train: int = MAX_TRAIN_VECTORS,
    ) -> Index:
        """Make, train (on a seeded sample of at most `max_train` vectors) and fill an index, then set its
        search parameters: `params` as given, or the cheapest reaching `target_recall` (None: leave them)."""
        ids = np.arange(len(vectors)) if ids is None else np.asarray(ids, np.int64)
        index = cls(make_index(factory, vectors.shape[1]), factory)
        train_s, add_s = train_and_add(index.faiss, vectors, ids, seed, max_train)
        index.timings = {"train": train_s, "add": add_s}
        if params is not None:
            index.set_params(params)
        elif target_recall is not None:
            t0 = time.perf_counter()
            index.tune(vectors, ids, target_recall, seed)
            index.timings["tune"] = time.perf_counter() - t0
        return index

    @classmethod
    def read(cls, path: Path, factory: str, params: str = "") -> Index:
        """An index file written by `save` (faiss's format); the caller checks it against its descriptor."""
        return cls(faiss.read_index(str(path)), factory, params)

    def save(self, path: Path) -> None:
        faiss.write_index(self.faiss, str(path))

    # --- properties ----------------------------------------------------------------------------------

    @property
    def d(self) -> int:
        return int(self.faiss.d)

    @property
    def ntotal(self) -> int:
        return int(self.faiss.ntotal)

    @property
    def metric_type(self) -> int:
        return int(self.faiss.metric_type)

    @property
    def memory_bytes(self) -> int:
        return index_bytes(self.faiss)

    @property
    def build_seconds(self) -> float:
        return self.timings.get("train", 0.0) + self.timings.get("add", 0.0)

    # --- search ----------------------------------------------------------------------------------------

    def set_params(self, params: str) -> None:
        """Search parameters such as "efSearch=64" or "nprobe=16" ("" = the index's own)."""
        set_search_params(self.faiss, params)
        self.params = params

    def tune(self, vectors: np.ndarray, ids: np.ndarray, target: float = TARGET_RECALL, seed: int = 0):
        """Set the cheapest search parameter whose recall@10 on the collection reaches `target`."""
        self.tuned = tune(self.faiss, vectors, ids, target, seed=seed)
        self.params = self.tuned.params
        return self.tuned

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities (n, k) float32, ids (n, k) int64) of the k nearest, best first. k results come
        back whenever the index holds k vectors; -1 ids (and -inf) pad the rest only when it holds fewer."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        sims, ids = self.faiss.search(q, k)
        return self.complete(q, k, sims, ids, min(k, self.ntotal))

    def complete(
        self,
        q: np.ndarray,
        k: int,
        sims: np.ndarray,
        ids: np.ndarray,
        expected: int,
        allowed: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Fill the rows of a search result that came back with fewer than `expected` ids.

        An approximate search returns -1 slots whenever it visits fewer than k candidates (small inverted
        lists and a low nprobe, a selective filter, HNSW on a tiny graph). Such rows are searched again
        visiting every stored vector (passing `allowed`), and where that still falls short, exactly over
        the stored vectors (Flat and HNSW-Flat keep them)."""
        short = np.flatnonzero((ids[:, :expected] < 0).any(axis=1)) if expected > 0 else np.array([], int)
        if len(short) == 0:
            return sims, ids
        sims, ids = sims.copy(), ids.copy()
        sel = faiss.IDSelectorBatch(allowed) if allowed is not None else None
        params = exhaustive_params(self.faiss, k, sel)
        if params is not None:
            s2, i2 = self.faiss.search(q[short], k, params=params)
            sims[short], ids[short] = s2, i2
            short = short[(i2[:, :expected] < 0).any(axis=1)]
        if len(short):
            every = stored_ids(self.faiss)
            if every is not None and allowed is not None:
                every = every[np.isin(every, allowed)]
            vectors = stored_vectors(self.faiss, every) if every is not None and len(every) else None
            if vectors is not None:
                sims[short], ids[short] = exact_search(vectors, every, q[short], k, pad=True)
        return sims, ids

    # --- changes ---------------------------------------------------------------------------------------

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> float:
        """Add vectors with their ids (the index must be trained); returns the seconds it took."""
        t0 = time.perf_counter()
        self.faiss.add_with_ids(
            np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64)
        )
        return time.perf_counter() - t0

    def remove(self, ids: np.ndarray) -> int:
        """Remove ids; refused, with the reason, where the index type cannot forget (HNSW)."""
        return remove_ids(self.faiss, ids)
