"""faiss factory strings: building, training and adding with ids, removal, the search parameter to tune.

Every index uses inner product on L2-normalised vectors (= cosine similarity). Index types without
native ids (Flat, HNSW, PQ, ...) are wrapped in IndexIDMap2 so the shards' /ids are the search results.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator

import faiss
import numpy as np

from carsearch import defaults
from carsearch.errors import CarsearchError
from carsearch.index.families import Tunable, chain, family_of, ivf_of

log = logging.getLogger(__name__)

_IVF = re.compile(r"IVF(\d+)")


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Capture what C++ code (faiss) writes to file descriptor 2 and hand it back as lines.

    faiss prints one clustering warning per sub-quantizer straight to stderr; we log a single line instead.
    """
    lines: list[str] = []
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (embedded interpreters): nothing to capture
        yield lines
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode(errors="replace").splitlines())


def make_index(factory: str, dim: int) -> faiss.Index:
    """An empty index for `factory` (cosine via inner product), with id support."""
    factory = factory.strip()
    if not factory or factory.lower() == "auto":
        raise CarsearchError("internal: resolve 'auto' to a factory string before building")
    if factory.startswith("IDMap"):
        raise CarsearchError(f"{factory!r}: leave out IDMap, carsearch adds it where the index needs it.")
    m = _IVF.search(factory)
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        if ivf_of(index) is None:
            index = faiss.index_factory(dim, "IDMap2," + factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else "invalid"
        raise CarsearchError(
            f"{factory!r} is not a faiss factory string this faiss can build for {dim}-d vectors ({detail}); "
            "examples: Flat, HNSW32, IVF256,Flat, IVF1024,PQ64, OPQ64,IVF1024,PQ64."
        ) from None
    if m and int(m.group(1)) < 1:
        raise CarsearchError(f"{factory!r}: IVF needs at least one list.")
    for part in chain(index):
        # faiss's factory turns on polysemous training for PQ codes: a simulated-annealing reordering that
        # only serves Hamming-threshold search, which carsearch never uses. It made IVF-PQ training on 5k
        # vectors take 26 s instead of 2.3 s here.
        if hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False
    return index


def min_training_points(index: faiss.Index) -> int:
    """The fewest vectors faiss can train this index on (one per IVF list; 256 for 8-bit PQ codebooks)."""
    return family_of(index).min_training_points(index)


def training_rows(n: int, max_train: int, seed: int) -> np.ndarray | None:
    """Which of n vectors train an index: a seeded sample of `max_train` (sorted), or None for all. The one
    rule both the in-memory and the streaming build follow, so they train on the same vectors."""
    if n <= max_train:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, max_train, replace=False))


def train(index: faiss.Index, sample: np.ndarray, seed: int = 0) -> float:
    """Train an empty index on `sample` (seeded clustering); returns the seconds it took."""
    x = np.ascontiguousarray(sample, dtype=np.float32)
    t0 = time.perf_counter()
    if index.is_trained:
        return 0.0
    need = min_training_points(index)
    if len(x) < need:
        raise CarsearchError(
            f"this index needs at least {need} vectors to train and the collection has {len(x)}; "
            "use fewer IVF lists (e.g. IVF64), fewer PQ bits, or Flat / HNSW32."
        )
    _seed_clustering(index, seed)
    with captured_stderr() as noise:
        try:
            index.train(x)
        except RuntimeError as e:
            lines = str(e).strip().splitlines() or ["failed"]
            detail = lines[-1].split("failed: ")[-1]
            raise CarsearchError(
                f"faiss cannot train this index on {len(x)} vectors of {x.shape[1]} dimensions "
                f"({detail}); choose another --factory (fewer IVF lists, a smaller PCA/OPQ output, "
                "or Flat)."
            ) from None
    warnings = [line for line in noise if "WARNING" in line]
    if warnings:
        log.warning(
            "faiss: %s (and %d similar warnings): few training vectors for this index type; "
            "recall may suffer.",
            warnings[0].strip(),
            len(warnings) - 1,
        )
    return time.perf_counter() - t0


def train_and_add(
    index: faiss.Index,
    vectors: np.ndarray,
    ids: np.ndarray,
    seed: int = 0,
    max_train: int = defaults.MAX_TRAIN_VECTORS,
) -> tuple[float, float]:
    """Train (on at most `max_train` sampled vectors) and add with ids. Returns (train_s, add_s)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    rows = training_rows(len(x), max_train, seed)
    train_s = train(index, x if rows is None else x[rows], seed)
    t1 = time.perf_counter()
    index.add_with_ids(x, np.ascontiguousarray(ids, dtype=np.int64))
    return train_s, time.perf_counter() - t1


def _seed_clustering(index: faiss.Index, seed: int) -> None:
    # k-means seeds default to a constant in faiss already; set ours so `--seed` means something.
    ivf = ivf_of(index)
    if ivf is not None:
        ivf.cp.seed = seed
        pq = getattr(ivf, "pq", None)
        if pq is not None:
            pq.cp.seed = seed


def tunable(index: faiss.Index) -> Tunable:
    """The search parameter worth tuning for this index, with candidate values cheapest first."""
    return family_of(index).tunable(index)


def set_search_params(index: faiss.Index, params: str) -> None:
    """Apply a search-parameter string such as "efSearch=64" or "nprobe=16" (empty: nothing)."""
    if not params:
        return
    try:
        faiss.ParameterSpace().set_index_parameters(index, params)
    except RuntimeError as e:
        raise CarsearchError(f"search parameters {params!r} do not apply to this index ({e}).") from None


def remove_ids(index: faiss.Index, ids: np.ndarray) -> int:
    """Remove ids; refused, with the reason, for index types whose structure cannot forget (HNSW)."""
    refused = family_of(index).removal_refused(index)
    if refused:
        raise CarsearchError(refused)
    try:
        return int(index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))))
    except RuntimeError as e:
        raise CarsearchError(f"this index type does not support removal ({e}); rebuild it instead.") from None


def index_bytes(index: faiss.Index) -> int:
    """Bytes the index takes in memory, as its serialised size (faiss's own layout, the same in RAM)."""
    return int(faiss.serialize_index(index).nbytes)


def exhaustive_params(index: faiss.Index, k: int, sel: faiss.IDSelector | None = None):
    """Search parameters under which a search of `index` visits every stored vector (passing `sel`):
    every inverted list for IVF (OPQ / PCA in front included), an HNSW beam as wide as the collection.
    None for index types whose search already visits everything (Flat) or that take no parameters."""
    return family_of(index).exhaustive_params(index, k, sel)


def stored_vectors(index: faiss.Index, ids: np.ndarray) -> np.ndarray | None:
    """The stored vectors of `ids` (n, d) float32 where the index keeps them whole (Flat, HNSW-Flat
    behind IDMap2); None for compressed or unmapped indexes."""
    return family_of(index).stored_vectors(index, ids)


def stored_ids(index: faiss.Index) -> np.ndarray | None:
    """Every id an IDMap2-wrapped index holds (int64), or None."""
    if not isinstance(index, faiss.IndexIDMap2):
        return None
    return faiss.vector_to_array(index.id_map).astype(np.int64)
