"""Which images are gallery (and training) and which are queries: the seeded per-class split, class ranges."""

from __future__ import annotations

import numpy as np

from carsearch.defaults import GALLERY_FRACTION
from carsearch.errors import CarsearchError


def stratified_split(
    class_ids: np.ndarray, gallery_fraction: float = GALLERY_FRACTION, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a shuffle seeded by (seed, class id); the first round(fraction * n) images go to the
    gallery, the rest are queries. A class with two or more images keeps at least one on each side.

    Each class's split depends only on the seed, the class id and the class's own images (in order), not
    on which other classes are present: `carsearch train --train-fraction` and `carsearch bench
    --gallery-fraction` with the same seed hold out exactly the same images. Returns sorted indices."""
    if not 0 < gallery_fraction < 1:
        raise CarsearchError("the gallery fraction must be between 0 and 1.")
    gallery, queries = [], []
    for c in np.unique(class_ids):
        members = np.flatnonzero(class_ids == c)
        np.random.default_rng([seed, int(c) & 0x7FFFFFFF]).shuffle(members)
        n_gal = round(gallery_fraction * len(members))
        if len(members) >= 2:
            n_gal = min(max(n_gal, 1), len(members) - 1)
        gallery.extend(members[:n_gal])
        queries.extend(members[n_gal:])
    return np.sort(np.array(gallery, dtype=np.int64)), np.sort(np.array(queries, dtype=np.int64))


def class_range(spec: str) -> set[int]:
    """ "1-98" or "1-98,120" -> {1, ..., 98, 120}."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            out.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise CarsearchError(f"{spec!r} is not a class range such as 1-98 or 1-98,120.") from None
    return out


def class_spec(ids: np.ndarray | list[int]) -> str:
    """The inverse of class_range: [1, 2, 3, 7, 9, 10] -> "1-3,7,9-10"."""
    runs: list[list[int]] = []
    for c in sorted({int(c) for c in ids}):
        if runs and c == runs[-1][-1] + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def halve_classes(class_ids: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The classes present, shuffled with `seed` and cut in two halves (the first takes the odd one):
    the open-set protocol's known classes and the zero-shot protocol's test classes when a collection has
    no split of its own. Returns both halves sorted."""
    classes = np.random.default_rng(seed).permutation(np.unique(class_ids[class_ids >= 0]))
    half = (len(classes) + 1) // 2
    return np.sort(classes[:half]), np.sort(classes[half:])


def numbered_by_name(labels: np.ndarray, class_ids: np.ndarray) -> bool:
    """True when the class ids are carsearch's own numbering, 1..C in the sorted order of the class names
    (datasets.number_classes: VMMRdb folders, class folders without classes.csv), not the dataset's."""
    labelled = class_ids >= 0
    if not labelled.any():
        return False
    names = np.unique(labels[labelled])
    return bool((np.searchsorted(names, labels[labelled]) + 1 == class_ids[labelled]).all())
