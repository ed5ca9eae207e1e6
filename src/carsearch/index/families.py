"""Index families: everything carsearch knows about a kind of faiss index, in one object per kind.

After autofaiss's `IndexMetadata` (one object per family: its factory strings, estimated size, search
knob): a family says how to recognise its indexes, the search-time knob worth tuning and the values to
try, whether it can forget vectors, the fewest vectors it trains on, the search parameters that honour an
IDSelector (a filter) or visit every vector, whether its stored vectors come back whole, and how many
bytes n vectors take. Tuning, filtered search, exact fallbacks, removal, `--factory auto` and the bench's
default types all ask `family_of(index)` instead of testing index types themselves, so a new family is
one class here (added to FAMILIES).

Sizes follow faiss's own layouts (float32 vectors, int64 ids, 4-byte graph links with 2M of them on
level 0), checked against `faiss.serialize_index` in tests/test_auto.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np

from carsearch import defaults

# faiss's k-means wants this many training vectors per centroid and warns below it ("please provide at
# least N training points"): IVF lists and 8-bit PQ codebooks (256 centroids per sub-quantizer) are such
# centroids. faiss.ClusteringParameters().min_points_per_centroid.
MIN_POINTS_PER_CENTROID = 39
PQ_CENTROIDS = 256
ID_BYTES = 8  # an int64 id per vector (IDMap2, or the inverted lists' own ids)


@dataclass(frozen=True)
class Tunable:
    """The search-time knob of an index: its name and the values worth trying, cheapest first."""

    name: str | None  # "efSearch", "nprobe" or None (exact / nothing to tune)
    values: tuple[int, ...] = ()


def ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def chain(index: faiss.Index) -> list[faiss.Index]:
    """The index and the indexes it wraps (IDMap, PreTransform, IVF), each downcast to its real type."""
    out = []
    current: faiss.Index | None = faiss.downcast_index(index)
    while current is not None and len(out) < 8:
        out.append(current)
        inner = getattr(current, "index", None)
        current = faiss.downcast_index(inner) if inner is not None else None
    ivf = ivf_of(index)
    if ivf is not None:
        out.append(faiss.downcast_index(ivf))
    return out


def hnsw_of(index: faiss.Index) -> faiss.IndexHNSW | None:
    return next((part for part in chain(index) if isinstance(part, faiss.IndexHNSW)), None)


def _behind_idmap(index: faiss.Index) -> faiss.Index:
    """What an IDMap2 wraps (the index itself when it is not one)."""
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index


def _reconstructed(index: faiss.Index, ids: np.ndarray) -> np.ndarray | None:
    """The vectors of `ids` read back through an IDMap2 (None without one: rows are not ids)."""
    if not isinstance(index, faiss.IndexIDMap2):
        return None
    return index.reconstruct_batch(np.ascontiguousarray(ids, np.int64)).astype(np.float32, copy=False)


def ivf_lists(n: int, per_sqrt: float = 4.0, power_of_two: bool = True) -> int:
    """IVF lists for n vectors: about `per_sqrt`·sqrt(n) (a power of two unless told otherwise), with at
    least MIN_POINTS_PER_CENTROID training vectors per list. `--factory auto` and the bench use 4·sqrt(n)
    in powers of two; the audit's range-search index 2·sqrt(n) as it falls."""
    if power_of_two:
        lists = 2 ** round(math.log2(max(1.0, per_sqrt * math.sqrt(n))))
        while lists > 1 and n < MIN_POINTS_PER_CENTROID * lists:
            lists //= 2
        return max(1, lists)
    return max(1, min(n // MIN_POINTS_PER_CENTROID, int(per_sqrt * math.sqrt(n))))


class IndexFamily:
    """A kind of faiss index (any the others do not claim): no knob, removal as faiss allows, selectors
    not trusted (filtered search goes unfiltered and filters after), vectors not given back."""

    name = "other"
    knob: str | None = None

    def matches(self, index: faiss.Index) -> bool:
        return True

    def tunable(self, index: faiss.Index) -> Tunable:
        """The search parameter worth tuning, with candidate values cheapest first."""
        return Tunable(None)

    def removal_refused(self, index: faiss.Index) -> str | None:
        """Why this family cannot remove vectors (a sentence saying what to do), or None if it can."""
        return None

    def min_training_points(self, index: faiss.Index) -> int:
        """The fewest vectors faiss can train this index on."""
        return 0

    def stored_vectors(self, index: faiss.Index, ids: np.ndarray) -> np.ndarray | None:
        """The stored vectors of `ids` (n, d) float32 where the index keeps them whole, else None."""
        return None

    def exhaustive_params(self, index: faiss.Index, k: int, sel: faiss.IDSelector | None):
        """Search parameters under which a search visits every stored vector passing `sel`; None where
        a plain search already visits everything (or the family takes no parameters: filtered searches
        of it never get here, `filter_params` sends them to a post-filter)."""
        return None

    def filter_params(self, index: faiss.Index, sel: faiss.IDSelector, k: int, fraction: float):
        """Search parameters honouring `sel`, which passes `fraction` of the index, widened so k allowed
        vectors are likely found; None: search unfiltered and filter after."""
        return None


class Flat(IndexFamily):
    """Exact search over whole float32 vectors (`Flat`)."""

    name = "flat"

    def matches(self, index: faiss.Index) -> bool:
        return isinstance(_behind_idmap(index), faiss.IndexFlat)

    def stored_vectors(self, index: faiss.Index, ids: np.ndarray) -> np.ndarray | None:
        return _reconstructed(index, ids)

    def exhaustive_params(self, index: faiss.Index, k: int, sel: faiss.IDSelector | None):
        return faiss.SearchParameters(sel=sel) if sel is not None else None

    def filter_params(self, index: faiss.Index, sel: faiss.IDSelector, k: int, fraction: float):
        return faiss.SearchParameters(sel=sel)

    @staticmethod
    def factory() -> str:
        return "Flat"

    @staticmethod
    def estimated_bytes(n: int, d: int) -> int:
        return 4 * n * d + ID_BYTES * n


class HNSW(IndexFamily):
    """Graph search (Malkov & Yashunin 2018): `HNSW32`, `HNSW32,PQ16`, ... Links cannot be unmade, so no
    removal; the beam width efSearch trades recall for time."""

    name = "hnsw"
    knob = "efSearch"
    M = 32  # links per node of the graphs carsearch proposes (`--factory auto`, the bench)
    EF_SEARCH = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)

    def matches(self, index: faiss.Index) -> bool:
        return hnsw_of(index) is not None

    def tunable(self, index: faiss.Index) -> Tunable:
        return Tunable(self.knob, self.EF_SEARCH)

    def removal_refused(self, index: faiss.Index) -> str | None:
        return (
            "HNSW indexes cannot remove vectors (the graph would lose its links); rebuild the index without "
            "those images, or use a Flat or IVF index if removals are routine."
        )

    def stored_vectors(self, index: faiss.Index, ids: np.ndarray) -> np.ndarray | None:
        return _reconstructed(index, ids) if isinstance(_behind_idmap(index), faiss.IndexHNSWFlat) else None

    def exhaustive_params(self, index: faiss.Index, k: int, sel: faiss.IDSelector | None):
        if not isinstance(_behind_idmap(index), faiss.IndexHNSW):  # a graph behind a transform
            return super().exhaustive_params(index, k, sel)
        return faiss.SearchParametersHNSW(sel=sel, efSearch=max(k, int(index.ntotal)))

    def filter_params(self, index: faiss.Index, sel: faiss.IDSelector, k: int, fraction: float):
        inner = _behind_idmap(index)
        if not isinstance(inner, faiss.IndexHNSW):
            return None
        scale = 1.0 / max(fraction, 1e-6)
        ef = min(defaults.FILTER_MAX_EF, max(inner.hnsw.efSearch, math.ceil(2 * k * scale)))
        return faiss.SearchParametersHNSW(sel=sel, efSearch=ef)

    @classmethod
    def factory(cls, m: int = M) -> str:
        return f"HNSW{m}"

    @classmethod
    def estimated_bytes(cls, n: int, d: int, m: int = M) -> int:
        # Level 0 holds 2M links of 4 bytes per node; the upper levels add about a tenth.
        return 4 * n * d + ID_BYTES * n + int(n * m * 2 * 4 * 1.1)


class IVF(IndexFamily):
    """Inverted lists (`IVF1024,Flat`, `IVF1024,PQ64`, `OPQ64,IVF1024,PQ64`, `IVF256,SQ8`, ...): nprobe
    lists are searched; training clusters the vectors into the lists (and PQ codebooks)."""

    name = "ivf"
    knob = "nprobe"

    def matches(self, index: faiss.Index) -> bool:
        return ivf_of(index) is not None

    def tunable(self, index: faiss.Index) -> Tunable:
        nlist = ivf_of(index).nlist
        values = [1]
        while values[-1] < nlist:
            values.append(min(values[-1] * 2, nlist))
        return Tunable(self.knob, tuple(values))

    def min_training_points(self, index: faiss.Index) -> int:
        # One vector per list; 256 for 8-bit PQ codebooks.
        ivf = ivf_of(index)
        pq = getattr(ivf, "pq", None)
        return max(ivf.nlist, 1 << pq.nbits) if pq is not None else ivf.nlist

    def exhaustive_params(self, index: faiss.Index, k: int, sel: faiss.IDSelector | None):
        params = self._wrapped(index, faiss.SearchParametersIVF(sel=sel, nprobe=int(ivf_of(index).nlist)))
        return params if params is not None else super().exhaustive_params(index, k, sel)

    def filter_params(self, index: faiss.Index, sel: faiss.IDSelector, k: int, fraction: float):
        ivf = ivf_of(index)
        scale = 1.0 / max(fraction, 1e-6)
        nprobe = min(ivf.nlist, max(ivf.nprobe, math.ceil(ivf.nprobe * min(scale, 8.0))))
        return self._wrapped(index, faiss.SearchParametersIVF(sel=sel, nprobe=nprobe))

    @staticmethod
    def _wrapped(index: faiss.Index, params: faiss.SearchParametersIVF):
        """`params` as the outer index takes them: as they are for an IVF index, inside PreTransform's
        parameters for OPQ / PCA in front of one; None for other wrappings."""
        if isinstance(index, faiss.IndexIVF):
            return params
        if isinstance(index, faiss.IndexPreTransform) and isinstance(
            faiss.downcast_index(index.index), faiss.IndexIVF
        ):
            return faiss.SearchParametersPreTransform(index_params=params)
        return None

    @staticmethod
    def factory(lists: int, code_bytes: int = 0, opq: bool = False, opq_dim: int = 0) -> str:
        """IVF-Flat (code_bytes 0), IVF-PQ with `code_bytes` bytes a vector, OPQ in front (rotating to
        `opq_dim` dimensions when given)."""
        if not code_bytes:
            return f"IVF{lists},Flat"
        rotation = f"OPQ{code_bytes}" + (f"_{opq_dim}" if opq_dim else "") + "," if opq else ""
        return f"{rotation}IVF{lists},PQ{code_bytes}"

    @staticmethod
    def estimated_bytes(n: int, d: int, lists: int, code_bytes: int = 0, opq: bool = False) -> int:
        centroids = 4 * lists * d
        if not code_bytes:
            return 4 * n * d + ID_BYTES * n + centroids
        codebooks = 4 * PQ_CENTROIDS * d
        return n * code_bytes + ID_BYTES * n + centroids + codebooks + (4 * d * d if opq else 0)

    @staticmethod
    def training_floor(code_bytes: int = 0) -> int:
        """Training vectors faiss wants for one list's centroid (IVF) or a sub-quantizer's 256 (8-bit PQ)."""
        return MIN_POINTS_PER_CENTROID * (PQ_CENTROIDS if code_bytes else 1)


FLAT, HNSW_FAMILY, IVF_FAMILY, OTHER = Flat(), HNSW(), IVF(), IndexFamily()
# Asked in this order: an IVF index with a graph as its coarse quantiser is an IVF index.
FAMILIES: tuple[IndexFamily, ...] = (IVF_FAMILY, HNSW_FAMILY, FLAT, OTHER)


def family_of(index: faiss.Index) -> IndexFamily:
    """The family of a built index (the first of FAMILIES that claims it; OTHER claims any)."""
    return next(f for f in FAMILIES if f.matches(index))


def neighbour_index(vectors: np.ndarray, exact: bool | None = None, seed: int = defaults.SEED) -> faiss.Index:
    """An unmapped inner-product index over `vectors` (rows are the ids) for range and kNN search: Flat
    when `exact` (by default up to AUDIT_EXACT_LIMIT vectors), else IVF with 8-bit scalar-quantised
    vectors over about 2·sqrt(n) lists, trained on a seeded sample of 50 vectors a list, nprobe
    AUDIT_NPROBE. Used by the audit and the bench's leak check.

    Why IVF-SQ8 at scale: a quarter of the memory, and scanning is memory-bound, so twice as fast as
    IVF-Flat at 300k x 1280, recall@51 0.99 of it; near-duplicates, sitting almost on top of each
    other, share a list."""
    x = np.ascontiguousarray(vectors, np.float32)
    n, d = x.shape
    if exact is None:
        exact = n <= defaults.AUDIT_EXACT_LIMIT
    if exact:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = ivf_lists(n, per_sqrt=2.0, power_of_two=False)
        index = faiss.index_factory(d, f"IVF{nlist},SQ8", faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = x[np.sort(rng.choice(n, size=min(n, 50 * nlist), replace=False))]
        index.train(sample)
        index.nprobe = min(nlist, defaults.AUDIT_NPROBE)
    index.add(x)
    return index


def neighbour_index_bytes(index: faiss.Index) -> int:
    """Memory of a `neighbour_index`: its vectors (1 byte a value in IVF-SQ8), plus ids, centroids and the
    quantiser's ranges for IVF (computed, not serialised: no copy made)."""
    if isinstance(index, faiss.IndexIVF):
        return index.ntotal * (index.code_size + ID_BYTES) + index.nlist * index.d * 4 + 2 * index.d * 4
    return index.ntotal * index.d * 4
