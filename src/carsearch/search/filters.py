"""Metadata filters (the fields of datasets/attributes.FILTER_FIELDS: make, model, year) and the search
that honours them inside faiss.

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
from collections.abc import Mapping
from dataclasses import dataclass, field

import faiss
import numpy as np

from carsearch import defaults
from carsearch.datasets import attributes
from carsearch.datasets.attributes import NAMES, YEARS
from carsearch.datasets.records import nfc
from carsearch.errors import CarsearchError
from carsearch.eval.neighbors import exact_search
from carsearch.index.core import Index
from carsearch.index.factory import stored_vectors
from carsearch.index.families import family_of

_YEAR_RANGE = re.compile(r"^\s*(\d{4})?\s*-\s*(\d{4})?\s*$")


@dataclass(frozen=True)
class Filter:
    """For each field of FILTER_FIELDS (datasets/attributes.py) a user restricted, the values a gallery row
    must match: names compared case- and Unicode-form-insensitively (NFC, then casefold), years as
    inclusive (low, high) ranges. Hashable: searches cache the ids a filter passes."""

    # (field name, its parsed values) for each field given, in FILTER_FIELDS order.
    asked: tuple[tuple[str, tuple], ...] = ()
    # What the user typed ("make Tesla; year 2010-"), for messages; not part of what the filter is.
    text: str = field(default="", compare=False)

    @classmethod
    def parse(cls, **typed: str | None) -> Filter:
        """From the texts users type, by field name: make="BMW,Audi", year="2010-", "-2005",
        "2008,2012-2014". Raises CarsearchError for a field that is not filterable or a malformed year."""
        fields = attributes.FILTER_FIELDS
        names = [f.name for f in fields]
        unknown = sorted(set(typed) - set(names))
        if unknown:
            raise CarsearchError(f"no filter {unknown[0]!r}; filters are {', '.join(names)}.")
        given = {f: v.strip() for f, v in typed.items() if v and v.strip()}
        asked = []
        for f in fields:
            values = (_names if f.kind == NAMES else _years)(given.get(f.name))
            if values:
                asked.append((f.name, values))
        text = "; ".join(f"{f.name} {given[f.name]}" for f in fields if f.name in given)
        return cls(tuple(asked), text)

    def values(self, name: str) -> tuple:
        """The values asked for field `name` (() when it was not restricted)."""
        return dict(self.asked).get(name, ())

    def describe(self) -> str:
        """The filter in words: what was typed, else its fields ("make bmw; year 2010-2012")."""
        if self.text:
            return self.text
        kinds = _kinds()
        return "; ".join(f"{name} {_shown(values, kinds[name])}" for name, values in self.asked)

    def __bool__(self) -> bool:
        return bool(self.asked)

    def to_json(self) -> dict:
        """Every filterable field under its key, with its values (years as [low, high] pairs)."""
        return {
            f.key: [list(v) if f.kind == YEARS else v for v in self.values(f.name)]
            for f in attributes.FILTER_FIELDS
        }

    def mask(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """Which gallery rows pass, from their columns by field name (each (n,) strings)."""
        keep = np.ones(len(next(iter(columns.values()))), dtype=bool)
        kinds = _kinds()
        for name, values in self.asked:
            column = columns[name]
            if kinds[name] == NAMES:
                keep &= np.isin(_folded(column), values)
                continue
            numeric = np.array([int(y) if str(y).isdigit() else -1 for y in column])
            ok = np.zeros(len(column), dtype=bool)
            for lo, hi in values:
                ok |= (numeric >= lo) & (numeric <= hi)
            keep &= ok
        return keep


def _kinds() -> dict[str, str]:
    """Each filterable field's kind (NAMES or YEARS), by name."""
    return {f.name: f.kind for f in attributes.FILTER_FIELDS}


def _shown(values: tuple, kind: str) -> str:
    if kind == NAMES:
        return ",".join(values)
    return ",".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in values)


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
