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
with at least `defaults.EDITED_COPY_MIN_INLIERS` inliers is an edited copy. A mirrored copy is not (its
features do not match), but its cosine is above the threshold anyway (0.95-0.98 measured).
"""

from __future__ import annotations

import logging
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


@dataclass
class LocalMatcher:
    """ORB features of photos (computed once each) and the RANSAC inlier count of a pair.

    `path_of(row)` gives the photo file of a row; rows whose photo cannot be read count as 0 inliers and
    are counted in `unreadable`."""

    path_of: Callable[[int], Path]
    side: int = defaults.EDITED_COPY_SIDE
    features: int = defaults.EDITED_COPY_FEATURES
    unreadable: set[int] = field(default_factory=set)
    _cache: dict[int, tuple] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        import cv2

        self._cv2 = cv2
        self._orb = cv2.ORB_create(nfeatures=self.features)
        self._matcher = cv2.BFMatcher(cv2.NORM_HAMMING)

    def _features(self, row: int) -> tuple:
        if row not in self._cache:
            self._cache[row] = self._compute(row)
        return self._cache[row]

    def _compute(self, row: int) -> tuple:
        from PIL import Image, ImageOps

        cv2 = self._cv2
        try:
            with Image.open(self.path_of(row)) as im:
                im.draft("L", (self.side, self.side))  # JPEG: decode at a reduced size, as embedding does
                gray = np.asarray(ImageOps.exif_transpose(im).convert("L"))
        except (OSError, ValueError) as e:
            log.debug("edited copies: %s unreadable (%s)", self.path_of(row), e)
            self.unreadable.add(row)
            return (), None
        # Every photo at the same scale: a downscaled copy is enlarged back, so that its corners are found
        # at the scales of its original's.
        scale = self.side / max(gray.shape)
        gray = cv2.resize(
            gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        )
        return self._orb.detectAndCompute(gray, None)

    def inliers(self, a: int, b: int) -> int:
        """Features of photo `a` matched in photo `b` consistently with one similarity transform."""
        cv2 = self._cv2
        (ka, da), (kb, db) = self._features(a), self._features(b)
        if da is None or db is None or len(ka) < 2 or len(kb) < 2:
            return 0
        good = [
            m[0]
            for m in self._matcher.knnMatch(da, db, k=2)
            if len(m) == 2 and m[0].distance < _RATIO * m[1].distance
        ]
        if len(good) < 3:
            return 0
        src = np.float32([ka[m.queryIdx].pt for m in good])
        dst = np.float32([kb[m.trainIdx].pt for m in good])
        _, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=_RANSAC_PX)
        return int(mask.sum()) if mask is not None else 0


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
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Which candidate pairs (i[n], j[n]) are edited copies: (mask, inlier counts), both of length n."""
    counts = np.zeros(len(i), dtype=np.int32)
    with Progress(len(i), "edited copies", "pair", enabled=progress) as bar:
        for n, (a, b) in enumerate(zip(i.tolist(), j.tolist(), strict=True)):
            counts[n] = matcher.inliers(a, b)
            bar.update(1)
    return counts >= min_inliers, counts


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
    threshold: float,
    gallery_photo: Callable[[int], Path] | None,
    query_photo: Callable[[int], Path] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Queries (n, d) float32 with a near-duplicate in the gallery that `index` holds: their nearest gallery
    photo (`sims`, `rows`: (n,)) at `threshold` or above, or an edited copy among their first EDITED_COPY_K
    at EDITED_COPY_MIN_COSINE or above. `*_photo`: row -> photo file (`photo_lookup`); without them, the
    cosine rule alone. Returns (mask, similarity, gallery row), the last two those of the copy when found."""
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
