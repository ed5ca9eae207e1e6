"""`--factory auto`: the choice follows collection size and memory budget, and says why."""

import pytest

from carsearch.errors import CarsearchError
from carsearch.index.auto import choose_factory
from carsearch.index.families import FLAT, HNSW_FAMILY, IVF_FAMILY, family_of, ivf_lists

G = 1 << 30


def test_small_collection_is_exact() -> None:
    c = choose_factory(5_000, 1280, 4 * G)
    assert c.factory == "Flat" and "exact" in c.reason


def test_medium_collection_gets_hnsw_when_it_fits() -> None:
    c = choose_factory(290_000, 1280, 4 * G)  # VMMRdb-sized
    assert c.factory == "HNSW32" and c.estimated_bytes <= 4 * G


def test_short_memory_moves_to_ivf_then_pq() -> None:
    n, d = 290_000, 2048
    between = (IVF_FAMILY.estimated_bytes(n, d, ivf_lists(n)) + HNSW_FAMILY.estimated_bytes(n, d)) // 2
    ivf = choose_factory(n, d, between)  # room for the vectors, not for HNSW's links
    assert ivf.factory.startswith("IVF") and ivf.factory.endswith(",Flat")
    pq = choose_factory(n, d, 200 << 20)  # 200 MiB: vectors must be compressed
    assert pq.factory.startswith("OPQ") and ",PQ" in pq.factory and pq.estimated_bytes <= 200 << 20
    assert "compressed" in pq.reason
    m = int(pq.factory.split(",")[0][3:])
    assert d % m == 0


def test_impossible_budget_is_refused() -> None:
    with pytest.raises(CarsearchError, match="raise --memory-budget"):
        choose_factory(10_000_000, 2048, 1 << 20)


def test_ivf_lists_have_enough_training_points() -> None:
    for n in (100, 5_000, 290_000, 10_000_000):
        lists = ivf_lists(n)
        assert lists >= 1 and (lists == 1 or n >= 39 * lists)


@pytest.fixture
def one_thread():
    """faiss on one thread: its OpenMP threads spin against each other on a loaded 2-core machine."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _layout(kind: str, n: int, d: int, lists: int, m: int) -> tuple[str, int, object]:
    """(factory string, estimated bytes, family) of one layout, each from its family."""
    if kind == "flat":
        return FLAT.factory(), FLAT.estimated_bytes(n, d), FLAT
    if kind == "hnsw":
        return HNSW_FAMILY.factory(), HNSW_FAMILY.estimated_bytes(n, d), HNSW_FAMILY
    code, opq = (0 if kind == "ivf-flat" else m), kind.startswith("opq")
    return (
        IVF_FAMILY.factory(lists, code, opq),
        IVF_FAMILY.estimated_bytes(n, d, lists, code, opq),
        IVF_FAMILY,
    )


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf-flat", "ivf-pq", "opq-ivf-pq"])
def test_estimate_is_the_size_faiss_serialises(kind: str, one_thread: None) -> None:
    """The estimate the choice rests on, against the real thing: the serialised size of a faiss index of
    that kind holding n vectors (faiss's layout, the same in RAM), within 5%; the family's factory string
    builds an index the family claims back. The sizes do not depend on how well the index is trained, so
    it trains on a small sample."""
    import faiss
    import numpy as np

    from carsearch.index.factory import make_index, train_and_add

    n, d, m = 5_000, 32, 8
    lists = ivf_lists(n)
    factory, estimate, family = _layout(kind, n, d, lists, m)
    assert (
        factory
        == {
            "flat": "Flat",
            "hnsw": "HNSW32",
            "ivf-flat": f"IVF{lists},Flat",
            "ivf-pq": f"IVF{lists},PQ{m}",
            "opq-ivf-pq": f"OPQ{m},IVF{lists},PQ{m}",
        }[kind]
    )
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = make_index(factory, d)
    if isinstance(index, faiss.IndexPreTransform):  # OPQ's rotation: a few iterations do for its size
        faiss.downcast_VectorTransform(index.chain.at(0)).niter = 2
    train_and_add(index, x, np.arange(n), max_train=1_000)
    real = faiss.serialize_index(index).nbytes
    assert index.ntotal == n and family_of(index) is family
    assert estimate == pytest.approx(real, rel=0.05), (kind, real)


def test_a_chosen_flat_index_is_the_size_estimated(one_thread: None) -> None:
    import faiss
    import numpy as np

    from carsearch.index.factory import make_index, train_and_add

    n, d = 3_000, 64
    c = choose_factory(n, d, 4 * G)
    index = make_index(c.factory, d)
    x = np.random.default_rng(1).standard_normal((n, d)).astype(np.float32)
    train_and_add(index, x, np.arange(n))
    assert c.estimated_bytes == pytest.approx(faiss.serialize_index(index).nbytes, rel=0.05)
