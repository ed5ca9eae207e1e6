"""faiss factory strings: ids, training, removal, tunable parameters, errors."""

from __future__ import annotations

import numpy as np
import pytest

from carsearch.errors import CarsearchError
from carsearch.index.factory import (
    index_bytes,
    make_index,
    remove_ids,
    set_search_params,
    train_and_add,
    tunable,
)


def _data(n: int = 3000, d: int = 32, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize(
    "factory",
    ["Flat", "HNSW16", "IVF16,Flat", "IVF16,PQ8", "OPQ8,IVF16,PQ8", "IVF16,SQ8", "PQ8", "HNSW16,Flat"],
)
def test_every_type_returns_the_given_ids(factory: str, tmp_path) -> None:
    x = _data()
    ids = np.arange(len(x), dtype=np.int64) * 7 + 1000
    index = make_index(factory, x.shape[1])
    train_and_add(index, x, ids)
    knob = tunable(index)
    if knob.name:
        set_search_params(index, f"{knob.name}={knob.values[-1]}")
    _, found = index.search(x[:20], 1)
    assert set(found[:, 0]) <= set(ids.tolist())
    if factory in ("Flat", "HNSW16", "IVF16,Flat", "HNSW16,Flat"):
        assert (found[:, 0] == ids[:20]).all()  # full vectors: each finds itself
    # The size is the index file faiss writes, and holds at least each vector's code: 4 bytes a dimension
    # stored whole, one with SQ8, one a sub-quantizer with PQ8.
    import faiss

    faiss.write_index(index, str(tmp_path / "index.faiss"))
    assert index_bytes(index) == (tmp_path / "index.faiss").stat().st_size
    code = {"PQ8": 8, "SQ8": x.shape[1]}.get(factory.rsplit(",", 1)[-1], 4 * x.shape[1])
    assert index_bytes(index) >= len(x) * code


def test_polysemous_training_is_off() -> None:
    import faiss

    index = make_index("IVF16,PQ8", 32)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    assert ivf.do_polysemous_training is False


def test_tunable_values() -> None:
    assert tunable(make_index("Flat", 8)).name is None
    ivf = tunable(make_index("IVF16,Flat", 8))
    assert ivf.name == "nprobe" and ivf.values == (1, 2, 4, 8, 16)
    assert tunable(make_index("HNSW32", 8)).name == "efSearch"
    assert tunable(make_index("OPQ8,IVF16,PQ8", 32)).name == "nprobe"


@pytest.mark.parametrize(
    ("factory", "family", "whole_vectors"),
    [
        ("Flat", "flat", True),
        ("HNSW16", "hnsw", True),
        ("HNSW16,PQ8", "hnsw", False),
        ("IVF16,Flat", "ivf", False),
        ("IVF16,SQ8", "ivf", False),
        ("OPQ8,IVF16,PQ8", "ivf", False),
        ("IVF16_HNSW8,Flat", "ivf", False),  # a graph as the coarse quantiser is still an IVF index
        ("PQ8", "other", False),
        ("PCA16,Flat", "other", False),  # the stored vectors are projections, not the originals
    ],
)
def test_each_index_is_claimed_by_one_family(factory: str, family: str, whole_vectors: bool) -> None:
    """family_of names the family every other question is put to; its stored vectors come back whole
    (equal to what was added) exactly where the family says so."""
    from carsearch.index.factory import exhaustive_params, stored_vectors
    from carsearch.index.families import family_of

    x = _data(1000)
    index = make_index(factory, x.shape[1])
    train_and_add(index, x, np.arange(len(x)) + 5)
    assert family_of(index).name == family
    back = stored_vectors(index, np.array([5, 6, 7]))
    assert (back is not None) == whole_vectors
    if back is not None:
        np.testing.assert_array_equal(back, x[:3])
    # Exhaustive parameters make any family find each vector's own id first, filtered to odd ids.
    import faiss

    odd = np.arange(5, len(x) + 5, 2)
    params = exhaustive_params(index, 3, faiss.IDSelectorBatch(odd))
    _, found = index.search(x[:40], 3, params=params) if params is not None else index.search(x[:40], 3)
    if family != "other":
        assert np.isin(found[found >= 0], odd).all()
    if whole_vectors or (family == "ivf" and "PQ" not in factory and "SQ" not in factory):
        assert (found[::2, 0] == np.arange(5, 45, 2)).all()


def test_removal_where_supported() -> None:
    x = _data()
    for factory in ("Flat", "IVF16,Flat"):
        index = make_index(factory, x.shape[1])
        train_and_add(index, x, np.arange(len(x)))
        assert remove_ids(index, np.array([0, 1, 2])) == 3
        assert index.ntotal == len(x) - 3
        set_search_params(index, "nprobe=16" if "IVF" in factory else "")
        _, found = index.search(x[:3], 5)
        assert not {0, 1, 2} & set(found.ravel().tolist())
    hnsw = make_index("HNSW16", x.shape[1])
    train_and_add(hnsw, x, np.arange(len(x)))
    with pytest.raises(CarsearchError, match="HNSW indexes cannot remove"):
        remove_ids(hnsw, np.array([0]))


def test_errors() -> None:
    with pytest.raises(CarsearchError, match="not a faiss factory string"):
        make_index("HNSWxyz", 32)
    with pytest.raises(CarsearchError, match="leave out IDMap"):
        make_index("IDMap,Flat", 32)
    with pytest.raises(CarsearchError, match="needs at least 1024 vectors to train"):
        train_and_add(make_index("IVF1024,Flat", 32), _data(500), np.arange(500))
    with pytest.raises(CarsearchError, match="do not apply"):
        set_search_params(make_index("Flat", 8), "nprobe=4")


# --- fewer than k results (faiss pads with -1 when a search visits fewer than k candidates) ------------


def _clustered(n: int = 48, d: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, d))
    x = centres[np.arange(n) % 4] + 0.3 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(
    ("factory", "params"),
    [
        ("IVF4,Flat", "nprobe=1"),
        ("IVF4,PQ8x4", "nprobe=1"),
        ("HNSW4", "efSearch=1"),
        ("PCA16,IVF4,Flat", "nprobe=1"),
    ],
)
def test_k_results_whenever_k_exist(factory: str, params: str) -> None:
    """Every index type returns k results when it holds k vectors, even tuned as narrow as it goes."""
    from carsearch.index.core import Index
    from carsearch.search.filters import filtered_search

    x = _clustered()
    ids = np.arange(1000, 1048)
    index = Index.build(factory, x, ids, params=params)
    for k in (10, 40, 48):
        _, got = index.search(x[:5], k)
        assert (got >= 0).all(), (factory, k)
        assert all(len(set(row)) == k for row in got.tolist())
    # More than the index holds: all of them, then -1 padding.
    _, got = index.search(x[:2], 60)
    assert (got[:, :48] >= 0).all() and (got[:, 48:] == -1).all()
    assert sorted(got[0, :48].tolist()) == ids.tolist()
    # A filter that every image passes, through the selector path (exact_limit 0): k results too.
    allowed = ids[ids % 2 == 0]
    _, got = filtered_search(index, x[:3], 20, allowed, exact_limit=0)
    assert (got >= 0).all() and np.isin(got, allowed).all()
    _, got = filtered_search(index, x[:3], 30, allowed, exact_limit=0)
    assert (got[:, :24] >= 0).all() and (got[:, 24:] == -1).all()
