"""Edited copies (a listing photo re-posted cropped, downscaled, recompressed and colour-shifted) told apart
from other photos of the same model by local-feature agreement.

Frozen-feature cosine alone cannot: such a copy sits at 0.7-0.9 of its original, where other photos of the
same model in the same pose also sit (issue 19, kind 10; docs/benchmarks.md, audit). What separates them is
geometry: the copy and its original share hundreds of corner features related by one similarity transform
(shift, scale, small rotation), two photos of the same model a handful. So candidate pairs (each photo's
`defaults.EDITED_COPY_K` nearest neighbours with cosine in [`defaults.EDITED_COPY_MIN_COSINE`, the
near-duplicate threshold)) are checked with OpenCV's ORB (Rublee et al., "ORB: an efficient alternative to
SIFT or SURF", ICCV 2011) on both photos scaled to `defaults.EDITED_COPY_SIDE` px, Lowe's ratio test (0.8,
Lowe, IJCV 2004) and a RANSAC fit of a partial affine transform (`cv2.estimateAffinePartial2D`); a pair
with at least `defaults.EDITED_COPY_MIN_INLIERS` inliers whose pixels also agree once aligned
(normalised cross-correlation >= `defaults.EDITED_COPY_MIN_NCC`: other photos of the same car from the
same shoot share corners, not pixels) is an edited copy. A mirrored copy is not (its features do not
match), but its cosine is above the threshold anyway (0.95-0.98 measured).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from carsearch import defaults
from carsearch.embed.store import EmbeddingSet
from carsearch.progress import Progress

log = logging.getLogger(__name__)

_RATIO = 0.8  # Lowe's ratio test
_RANSAC_PX = 4.0  # reprojection error allowed, in pixels of the scaled photo


@dataclass(frozen=True)
class Match:
    """How photo `a` maps onto photo `b`: RANSAC inliers of their ORB features under one similarity
    transform, and the normalised cross-correlation (-1..1) of their grey pixels once `a` is warped onto
    `b` by it (-1 when no transform was found or they barely overlap)."""

    inliers: int
    ncc: float


_NO_MATCH = Match(0, -1.0)


@dataclass
class LocalMatcher:
    """ORB features of photos (computed once each, the last `cache` photos kept) and how a pair matches.

    `path_of(row)` gives the photo file of a row; rows whose photo cannot be read never match and are
    counted in `unreadable`."""

    path_of: Callable[[int], Path]
    side: int = defaults.EDITED_COPY_SIDE
    features: int = defaults.EDITED_COPY_FEATURES
    cache: int = defaults.EDITED_COPY_CACHE
    unreadable: set[int] = field(default_factory=set)
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)

    def __post_init__(self) -> None:
        import cv2

        self._cv2 = cv2
        self._orb = cv2.ORB_create(nfeatures=self.features)
        self._matcher = cv2.BFMatcher(cv2.NORM_HAMMING)

    def _features(self, row: int) -> tuple:
        if row in self._cache:
            self._cache.move_to_end(row)
        else:
            self._cache[row] = self._compute(row)
            if len(self._cache) > self.cache:
                self._cache.popitem(last=False)
        return self._cache[row]

    def _compute(self, row: int) -> tuple:
        """(points (n, 2) float32, ORB descriptors (n, 32) uint8 or None, grey photo at half size)."""
        from PIL import Image, ImageOps

        cv2 = self._cv2
        try:
            with Image.open(self.path_of(row)) as im:
                im.draft("L", (self.side, self.side))  # JPEG: decode at a reduced size, as embedding does
                gray = np.asarray(ImageOps.exif_transpose(im).convert("L"))
        except (OSError, ValueError) as e:
            log.debug("edited copies: %s unreadable (%s)", self.path_of(row), e)
            self.unreadable.add(row)
            return np.zeros((0, 2), np.float32), None, None
        # Every photo at the same scale: a downscaled copy is enlarged back, so that its corners are found
        # at the scales of its original's.
        scale = self.side / max(gray.shape)
        gray = cv2.resize(
            gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        )
        keypoints, descriptors = self._orb.detectAndCompute(gray, None)
        points = np.float32([k.pt for k in keypoints]).reshape(-1, 2)
        # The pixels are compared at half size, blurred: JPEG blocks and resampling differ between copies.
        half = cv2.resize(gray, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
        return points, descriptors, cv2.GaussianBlur(half.astype(np.float32), (0, 0), 0.75)

    def match(self, a: int, b: int) -> Match:
        """How photo `a` maps onto photo `b` (features matched with Lowe's ratio test, RANSAC)."""
        cv2 = self._cv2
        (pa, da, ga), (pb, db, gb) = self._features(a), self._features(b)
        if da is None or db is None or len(pa) < 2 or len(pb) < 2:
            return _NO_MATCH
        good = [
            m[0]
            for m in self._matcher.knnMatch(da, db, k=2)
            if len(m) == 2 and m[0].distance < _RATIO * m[1].distance
        ]
        if len(good) < 3:
            return _NO_MATCH
        src = pa[[m.queryIdx for m in good]]
        dst = pb[[m.trainIdx for m in good]]
        warp, mask = cv2.estimateAffinePartial2D(
            src, dst, method=cv2.RANSAC, ransacReprojThreshold=_RANSAC_PX
        )
        if warp is None or mask is None:
            return _NO_MATCH
        return Match(int(mask.sum()), self._ncc(ga, gb, warp))

    def _ncc(self, ga: np.ndarray, gb: np.ndarray, warp: np.ndarray) -> float:
        """Normalised cross-correlation of `ga` warped onto `gb` (half-size photos: the transform's shift
        halves) over the pixels both cover, the border of the overlap left out (-1 under 500 pixels)."""
        cv2 = self._cv2
        half = warp.copy()
        half[:, 2] *= 0.5
        h, w = gb.shape
        warped = cv2.warpAffine(ga, half, (w, h), flags=cv2.INTER_LINEAR)
        cover = cv2.warpAffine(np.ones(ga.shape, np.uint8), half, (w, h), flags=cv2.INTER_NEAREST)
        inside = cv2.erode(cover, np.ones((3, 3), np.uint8)) > 0
        if inside.sum() < 500:
            return -1.0
        x, y = warped[inside], gb[inside]
        x, y = (x - x.mean()) / (x.std() + 1e-6), (y - y.mean()) / (y.std() + 1e-6)
        return float(np.mean(x * y))


def cosine_threshold(threshold: float | None, confirmed_by_photos: bool) -> float:
    """The cosine from which a pair is a near-duplicate without a look at its photos: `threshold` when
    given; else NEAR_DUPLICATE_THRESHOLD_CONFIRMED when the photos confirm the pairs below it, and
    NEAR_DUPLICATE_THRESHOLD when the cosine decides alone."""
    if threshold is not None:
        return threshold
    if confirmed_by_photos:
        return defaults.NEAR_DUPLICATE_THRESHOLD_CONFIRMED
    return defaults.NEAR_DUPLICATE_THRESHOLD


def candidate_pairs(
    nb_sims: np.ndarray, nb_rows: np.ndarray, threshold: float, k: int = defaults.EDITED_COPY_K
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j, cosine) among each row's first `k` neighbours (`nb_*`: (n, >= k), itself left out,
    -1 for none) with cosine in [EDITED_COPY_MIN_COSINE, threshold): those the cosine alone leaves out."""
    sims, rows = nb_sims[:, :k], nb_rows[:, :k]
    r, c = np.nonzero((sims >= defaults.EDITED_COPY_MIN_COSINE) & (sims < threshold) & (rows >= 0))
    i, j, s = r.astype(np.int64), rows[r, c].astype(np.int64), sims[r, c].astype(np.float32)
    a, b = np.minimum(i, j), np.maximum(i, j)
    if len(a) == 0:
        return a, b, s
    _, first = np.unique(a * (int(b.max()) + 1) + b, return_index=True)
    return a[first], b[first], s[first]


def edited_copies(
    matcher: LocalMatcher,
    i: np.ndarray,
    j: np.ndarray,
    min_inliers: int = defaults.EDITED_COPY_MIN_INLIERS,
    min_ncc: float = defaults.EDITED_COPY_MIN_NCC,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Which candidate pairs (i[n], j[n]) are edited copies: at least `min_inliers` inliers and pixels
    that agree once aligned (NCC >= `min_ncc`). Returns (mask (n,) bool, inlier counts (n,) int32)."""
    counts = np.zeros(len(i), dtype=np.int32)
    ncc = np.full(len(i), -1.0)
    with Progress(len(i), "edited copies", "pair", enabled=progress) as bar:
        for n, (a, b) in enumerate(zip(i.tolist(), j.tolist(), strict=True)):
            m = matcher.match(a, b)
            counts[n], ncc[n] = m.inliers, m.ncc
            bar.update(1)
    return (counts >= min_inliers) & (ncc >= min_ncc), counts


def photo_lookup(emb: EmbeddingSet, rows: np.ndarray | None = None) -> Callable[[int], Path] | None:
    """row -> the photo file of that row of `emb` (of row `rows[row]` when `rows` select a part of it, so
    that no subset of the vectors is copied); None when the photos are not in the dataset root any more."""
    if not emb.root.is_dir():
        return None

    def path_of(row: int) -> Path:
        path = Path(str(emb.paths[row if rows is None else rows[row]]))
        return path if path.is_absolute() else emb.root / path

    return path_of


def confirm_leaks(
    index: object,
    queries: np.ndarray,
    sims: np.ndarray,
    rows: np.ndarray,
    threshold: float | None,
    gallery_photo: Callable[[int], Path] | None,
    query_photo: Callable[[int], Path] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Queries (n, d) float32 with a near-duplicate in the gallery that `index` holds: their nearest gallery
    photo (`sims`, `rows`: (n,)) at `threshold` or above, or an edited copy among their first EDITED_COPY_K
    at EDITED_COPY_MIN_COSINE or above. `*_photo`: row -> photo file (`photo_lookup`); without them, the
    cosine rule alone. `threshold` None: `cosine_threshold`'s default for the case. Returns (mask, similarity,
    gallery row), the last two those of the copy when found."""
    threshold = cosine_threshold(threshold, gallery_photo is not None and query_photo is not None)
    hit, sims, rows = sims >= threshold, sims.copy(), rows.copy()
    maybe = np.flatnonzero(~hit & (sims >= defaults.EDITED_COPY_MIN_COSINE))
    if not len(maybe) or gallery_photo is None or query_photo is None:
        return hit, sims, rows
    # One key space for both sets: gallery rows as they are, query rows after them.
    n = index.ntotal
    matcher = LocalMatcher(lambda r: gallery_photo(r) if r < n else query_photo(r - n))
    k_sims, k_rows = index.search(np.ascontiguousarray(queries[maybe], np.float32), defaults.EDITED_COPY_K)
    q, c = np.nonzero((k_sims >= defaults.EDITED_COPY_MIN_COSINE) & (k_sims < threshold) & (k_rows >= 0))
    copy, _ = edited_copies(matcher, maybe[q] + n, k_rows[q, c])
    for qi, ci in zip(q[copy][::-1], c[copy][::-1], strict=True):  # the most similar copy wins
        hit[maybe[qi]], sims[maybe[qi]], rows[maybe[qi]] = True, k_sims[qi, ci], k_rows[qi, ci]
    return hit, sims, rows
