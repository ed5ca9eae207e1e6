"""`--factory auto`: pick an index type from the collection size and a memory budget, and say why.

Exact search while it is cheap, a graph index (HNSW) while the vectors fit, then IVF, then product
quantisation (OPQ + IVF-PQ) when memory is short: the usual path of faiss's own guidelines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from carsearch import defaults
from carsearch.errors import CarsearchError

FLAT_MAX = defaults.EXACT_SEARCH_MAX
HNSW_MAX = 2_000_000  # above this HNSW's build time (hours on a few cores) stops being reasonable
HNSW_M = 32


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


def ivf_lists(n: int) -> int:
    """About 4·sqrt(n) lists (a power of two), with at least 39 training vectors per list."""
    lists = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    while lists > 1 and n < 39 * lists:
        lists //= 2
    return max(1, lists)


def estimate_bytes(kind: str, n: int, d: int, lists: int = 0, m: int = 0) -> int:
    ids = 8 * n
    if kind == "flat":
        return 4 * n * d + ids
    if kind == "hnsw":
        return 4 * n * d + ids + int(n * HNSW_M * 2 * 4 * 1.1)
    if kind == "ivf-flat":
        return 4 * n * d + ids + 4 * lists * d
    if kind == "ivf-pq":
        return n * m + ids + 4 * lists * d + 4 * 256 * d
    if kind == "opq-ivf-pq":
        return estimate_bytes("ivf-pq", n, d, lists, m) + 4 * d * d
    raise ValueError(kind)


def choose_factory(n: int, d: int, budget: int) -> Choice:
    """The index for `n` vectors of dimension `d` within `budget` bytes, with the reason."""
    flat = estimate_bytes("flat", n, d)
    if n <= FLAT_MAX and flat <= budget:
        return Choice(
            "Flat",
            f"{n} vectors: exact search is cheap below {FLAT_MAX} and takes "
            f"{human_bytes(flat)} of the {human_bytes(budget)} budget",
            flat,
        )
    hnsw = estimate_bytes("hnsw", n, d)
    if n <= HNSW_MAX and hnsw <= budget:
        return Choice(
            f"HNSW{HNSW_M}",
            f"{n} vectors: a graph index answers in well under a millisecond and "
            f"its {human_bytes(hnsw)} fit the {human_bytes(budget)} budget",
            hnsw,
        )
    lists = ivf_lists(n)
    ivf = estimate_bytes("ivf-flat", n, d, lists)
    if ivf <= budget:
        why = "too many for HNSW" if n > HNSW_MAX else f"HNSW would need {human_bytes(hnsw)}"
        return Choice(
            f"IVF{lists},Flat",
            f"{n} vectors ({why}): IVF with {lists} lists keeps the full vectors "
            f"in {human_bytes(ivf)} of the {human_bytes(budget)} budget",
            ivf,
        )
    # Largest code size that fits (more bytes per vector, better recall); OPQ's rotation (4·d² bytes)
    # when there is room for it, plain IVF-PQ when there is not (small collections, tight budgets).
    for m in sorted((m for m in range(8, d // 2 + 1, 8) if d % m == 0), reverse=True):
        for kind, factory in (("opq-ivf-pq", f"OPQ{m},IVF{lists},PQ{m}"), ("ivf-pq", f"IVF{lists},PQ{m}")):
            size = estimate_bytes(kind, n, d, lists, m)
            if size <= budget:
                return Choice(
                    factory,
                    f"{n} vectors: full vectors need {human_bytes(ivf)}, more than the {human_bytes(budget)} "
                    f"budget, so they are compressed to {m} bytes each with "
                    f"{'OPQ + ' if kind.startswith('opq') else ''}product quantisation "
                    f"({human_bytes(size)}); "
                    "expect lower recall",
                    size,
                )
    smallest = estimate_bytes("ivf-pq", n, d, lists, 8)
    raise CarsearchError(
        f"{n} vectors of {d} dimensions need at least {human_bytes(smallest)} even compressed to 8 bytes "
        "each; "
        f"raise --memory-budget above {human_bytes(budget)}."
    )
