"""Metadata filters (make, model, year) and the search that honours them inside faiss.

A filter turns into the set of allowed ids. Small sets (up to FILTER_EXACT_LIMIT) are searched exactly:
their vectors are read back from the index and compared one by one, so k results come back whenever k
match. Larger sets go to faiss with an IDSelector in the search parameters, the tuned efSearch / nprobe
raised in proportion to how much the filter leaves out (a graph or list walk that throws away 99% of
what it visits must visit ~100x more to fill k). Index types that cannot take a selector are searched
unfiltered with a larger k and filtered after, growing k until k results or the whole index.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import faiss
import numpy as np

from carsearch import defaults
from carsearch.datasets.records import nfc
from carsearch.errors import CarsearchError
from carsearch.eval.neighbors import exact_search
from carsearch.index.core import Index
from carsearch.index.factory import stored_vectors
from carsearch.index.families import family_of

_YEAR_RANGE = re.compile(r"^\s*(\d{4})?\s*-\s*(\d{4})?\s*$")


@dataclass(frozen=True)
class Filter:
    """make / model: any of the listed names (compared case- and Unicode-form-insensitively: NFC, then
    casefold); years: inclusive (low, high) ranges."""

    make: tuple[str, ...] = ()
    model: tuple[str, ...] = ()
    years: tuple[tuple[int, int], ...] = ()
    # What the user typed ("make Tesla; year 2010-"), for messages; not part of what the filter is.
    text: str = field(default="", compare=False)

    @classmethod
    def parse(cls, make: str | None = None, model: str | None = None, year: str | None = None) -> Filter:
        """From the texts users type: "BMW,Audi", "2010-", "-2005", "2008,2012-2014"."""
        asked = (("make", make), ("model", model), ("year", year))
        text = "; ".join(f"{f} {v.strip()}" for f, v in asked if v and v.strip())
        return cls(_names(make), _names(model), _years(year), text)

    def describe(self) -> str:
        """The filter in words: what was typed, else its fields ("make bmw; year 2010-2012")."""
        if self.text:
            return self.text
        years = ",".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in self.years)
        asked = (("make", ",".join(self.make)), ("model", ",".join(self.model)), ("year", years))
        return "; ".join(f"{f} {v}" for f, v in asked if v)

    def __bool__(self) -> bool:
        return bool(self.make or self.model or self.years)

    def to_json(self) -> dict:
        return {"make": list(self.make), "model": list(self.model), "years": [list(r) for r in self.years]}

    def mask(self, make: np.ndarray, model: np.ndarray, year: np.ndarray) -> np.ndarray:
        """Which gallery rows pass."""
        keep = np.ones(len(make), dtype=bool)
        if self.make:
            keep &= np.isin(_folded(make), self.make)
        if self.model:
            keep &= np.isin(_folded(model), self.model)
        if self.years:
            numeric = np.array([int(y) if str(y).isdigit() else -1 for y in year])
            ok = np.zeros(len(year), dtype=bool)
            for lo, hi in self.years:
                ok |= (numeric >= lo) & (numeric <= hi)
            keep &= ok
        return keep


def _fold(text: str) -> str:
    return nfc(text).casefold()


def _folded(values: np.ndarray) -> np.ndarray:
    """Gallery strings folded like filter values (indexes built before labels were NFC included)."""
    uniq, inverse = np.unique(values.astype(str), return_inverse=True)
    return np.array([_fold(u) for u in uniq], dtype=object)[inverse].astype(str)


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(sorted({_fold(t.strip()) for t in (text or "").split(",") if t.strip()}))


def _years(text: str | None) -> tuple[tuple[int, int], ...]:
    out = []
    for part in (text or "").split(","):
        if not part.strip():
            continue
        if part.strip().isdigit() and len(part.strip()) == 4:
            out.append((int(part), int(part)))
            continue
        m = _YEAR_RANGE.match(part)
        if not m or not (m.group(1) or m.group(2)):
            raise CarsearchError(
                f"year {part.strip()!r}: give a year (2012), a range (2008-2012, 2010-, -2005) or a list."
            )
        lo, hi = int(m.group(1) or 0), int(m.group(2) or 9999)
        if lo > hi:
            raise CarsearchError(f"year range {part.strip()!r} runs backwards.")
        out.append((lo, hi))
    return tuple(out)


def filtered_search(
    index: Index,
    queries: np.ndarray,
    k: int,
    allowed: np.ndarray,
    exact_limit: int = defaults.FILTER_EXACT_LIMIT,
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, ids) of the k nearest allowed ids, best first; -1 ids where fewer than k exist.
    Up to `exact_limit` allowed ids are searched exactly where the index keeps whole vectors."""
    q = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
    allowed = np.unique(np.asarray(allowed, np.int64))
    if len(allowed) == 0:
        return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
    if len(allowed) <= exact_limit:
        vectors = stored_vectors(index.faiss, allowed)
        if vectors is not None:
            return exact_search(vectors, allowed, q, k, pad=True)
    fraction = len(allowed) / max(1, index.ntotal)
    params = family_of(index.faiss).filter_params(index.faiss, faiss.IDSelectorBatch(allowed), k, fraction)
    if params is not None:
        sims, ids = index.faiss.search(q, k, params=params)
        # The scaled nprobe / efSearch may still visit fewer than k allowed vectors: widen those rows.
        return index.complete(q, k, sims, ids, min(k, len(allowed)), allowed)
    return _post_filter(index, q, k, allowed, fraction)


def _post_filter(
    index: Index, q: np.ndarray, k: int, allowed: np.ndarray, fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    depth = min(index.ntotal, max(4 * k, math.ceil(2 * k / fraction)))
    while True:
        sims, ids = index.search(q, depth)
        keep = np.isin(ids, allowed)
        enough = (keep.sum(axis=1) >= min(k, len(allowed))).all()
        if enough or depth >= index.ntotal:
            break
        depth = min(index.ntotal, depth * 4)
    out_s = np.full((len(q), k), -np.inf, np.float32)
    out_i = np.full((len(q), k), -1, np.int64)
    for r in range(len(q)):
        s, i = sims[r][keep[r]][:k], ids[r][keep[r]][:k]
        out_s[r, : len(s)], out_i[r, : len(i)] = s, i
    return out_s, out_i
