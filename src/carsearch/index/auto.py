"""`--factory auto`: pick an index type from the collection size and a memory budget, and say why.

Exact search while it is cheap, a graph index (HNSW) while the vectors fit, then IVF, then product
quantisation (OPQ + IVF-PQ) when memory is short: the usual path of faiss's own guidelines.
"""

from __future__ import annotations

from dataclasses import dataclass

from carsearch import defaults
from carsearch.errors import CarsearchError
from carsearch.index.families import FLAT, HNSW_FAMILY, IVF_FAMILY, ivf_lists

FLAT_MAX = defaults.EXACT_SEARCH_MAX
HNSW_MAX = 2_000_000  # above this HNSW's build time (hours on a few cores) stops being reasonable


@dataclass(frozen=True)
class Choice:
    factory: str
    reason: str
    estimated_bytes: int


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def choose_factory(n: int, d: int, budget: int) -> Choice:
    """The index for `n` vectors of dimension `d` within `budget` bytes, with the reason."""
    flat = FLAT.estimated_bytes(n, d)
    if n <= FLAT_MAX and flat <= budget:
        return Choice(
            FLAT.factory(),
            f"{n} vectors: exact search is cheap below {FLAT_MAX} and takes "
            f"{human_bytes(flat)} of the {human_bytes(budget)} budget",
            flat,
        )
    hnsw = HNSW_FAMILY.estimated_bytes(n, d)
    if n <= HNSW_MAX and hnsw <= budget:
        return Choice(
            HNSW_FAMILY.factory(),
            f"{n} vectors: a graph index answers in well under a millisecond and "
            f"its {human_bytes(hnsw)} fit the {human_bytes(budget)} budget",
            hnsw,
        )
    lists = ivf_lists(n)
    ivf = IVF_FAMILY.estimated_bytes(n, d, lists)
    if ivf <= budget:
        why = "too many for HNSW" if n > HNSW_MAX else f"HNSW would need {human_bytes(hnsw)}"
        return Choice(
            IVF_FAMILY.factory(lists),
            f"{n} vectors ({why}): IVF with {lists} lists keeps the full vectors "
            f"in {human_bytes(ivf)} of the {human_bytes(budget)} budget",
            ivf,
        )
    # Largest code size that fits (more bytes per vector, better recall); OPQ's rotation (4·d² bytes)
    # when there is room for it, plain IVF-PQ when there is not (small collections, tight budgets).
    for m in sorted((m for m in range(8, d // 2 + 1, 8) if d % m == 0), reverse=True):
        for opq in (True, False):
            size = IVF_FAMILY.estimated_bytes(n, d, lists, m, opq)
            if size <= budget:
                return Choice(
                    IVF_FAMILY.factory(lists, m, opq),
                    f"{n} vectors: full vectors need {human_bytes(ivf)}, more than the {human_bytes(budget)} "
                    f"budget, so they are compressed to {m} bytes each with "
                    f"{'OPQ + ' if opq else ''}product quantisation "
                    f"({human_bytes(size)}); "
                    "expect lower recall",
                    size,
                )
    smallest = IVF_FAMILY.estimated_bytes(n, d, lists, 8)
    raise CarsearchError(
        f"{n} vectors of {d} dimensions need at least {human_bytes(smallest)} even compressed to 8 bytes "
        "each; "
        f"raise --memory-budget above {human_bytes(budget)}."
    )
