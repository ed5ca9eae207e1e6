"""`--factory auto`: the choice follows collection size and memory budget, and says why."""

import pytest

from carsearch.errors import CarsearchError
from carsearch.index.auto import choose_factory, estimate_bytes, ivf_lists

G = 1 << 30


def test_small_collection_is_exact() -> None:
    c = choose_factory(5_000, 1280, 4 * G)
    assert c.factory == "Flat" and "exact" in c.reason


def test_medium_collection_gets_hnsw_when_it_fits() -> None:
    c = choose_factory(290_000, 1280, 4 * G)  # VMMRdb-sized
    assert c.factory == "HNSW32" and c.estimated_bytes <= 4 * G


def test_short_memory_moves_to_ivf_then_pq() -> None:
    n, d = 290_000, 2048
    between = (estimate_bytes("ivf-flat", n, d, ivf_lists(n)) + estimate_bytes("hnsw", n, d)) // 2
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
