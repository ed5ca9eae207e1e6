"""What an audit measures, before any of it is reported: the neighbour index and each photo's nearest
neighbours (one kNN search serves the vote, the outlier score and most near-duplicate pairs), exact and
near-duplicate groups (edited copies confirmed by local features), the label votes, the outlier scores and
fence, and the second folder's leakage."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

import faiss
import numpy as np

from carsearch.audit.scores import (
    LabelQuality,
    Neighbours,
    label_quality,
    neighbours,
    outlier_fence,
    outlier_scores,
)
from carsearch.audit.settings import AuditSettings
from carsearch.embed.store import EmbeddingSet
from carsearch.eval.duplicates import components, near_pairs, nearest_in
from carsearch.eval.edited_copies import (
    LocalMatcher,
    candidate_pairs,
    confirm_leaks,
    cosine_threshold,
    edited_copies,
    photo_lookup,
)
from carsearch.index.families import neighbour_index
from carsearch.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class Findings:
    """An audit's measurements over n photos (rows of the embedding set)."""

    threshold: float  # the cosine from which two photos are near-duplicates, as used
    index: faiss.Index  # the neighbour index (index.families.neighbour_index)
    nb: Neighbours  # each row's nearest neighbours, itself left out
    exact_groups: list[np.ndarray]  # rows of byte-identical files, largest group first
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray]  # near-duplicate pairs (i < j, cosine), copies folded
    copies: dict | None  # edited copies found below the threshold (None: not looked for)
    near: list[np.ndarray]  # near-duplicate groups (connected components of the pairs)
    quality: LabelQuality  # the neighbours' vote on each photo's label
    outlier: np.ndarray  # (n,) similarity to the outlier_k-th neighbour
    fence: float  # outliers lie below it
    leakage: dict | None  # the second folder's photos with a near-duplicate here (None: no second folder)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step


def find(
    emb: EmbeddingSet, other: EmbeddingSet | None, cfg: AuditSettings, progress: bool, t0: float
) -> Findings:
    """Measure everything the report says, step by step under one progress bar (timings from `t0`, the
    audit's start, for the load step)."""
    n = len(emb)
    k, outlier_k = cfg.k, cfg.outlier_k
    threshold = cosine_threshold(cfg.threshold, cfg.local_features and photo_lookup(emb) is not None)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def step(name: str) -> None:
        nonlocal clock
        timings[name] = round(time.perf_counter() - clock, 2)
        clock = time.perf_counter()
        bar.update(1)

    with Progress(6 if other is not None else 5, "audit", "step", enabled=progress) as bar:
        timings["load"] = round(time.perf_counter() - t0, 2)
        index = neighbour_index(emb.vectors, cfg.exact)
        step("index")
        depth = min(max(k, outlier_k), max(1, n - 1))
        nb = neighbours(index, emb.vectors, depth)
        step("neighbours")
        exact_groups = _exact_groups(emb)
        i, j, s, copies = near_duplicate_pairs(emb, index, nb, threshold, cfg.local_features, progress)
        i, j, s = fold_exact_copies(n, exact_groups, i, j, s)
        near = components(n, i, j)
        step("duplicates")
        quality = label_quality(emb.labels, nb, k)
        step("votes")
        outlier = outlier_scores(nb, outlier_k)
        fence = outlier_fence(outlier)
        step("outliers")
        leakage = None
        if other is not None:
            leakage = _leakage(index, emb, other, cfg.threshold, cfg.local_features)
            step("leakage")
    return Findings(
        threshold, index, nb, exact_groups, (i, j, s), copies, near, quality, outlier, fence, leakage, timings
    )


def member(emb: EmbeddingSet, row: int) -> dict:
    return {
        "id": int(emb.ids[row]),
        "path": str(emb.paths[row]),
        "label": str(emb.labels[row]),
    }


def _exact_groups(emb: EmbeddingSet) -> list[np.ndarray]:
    """Rows sharing a file sha256 (byte-identical files), largest group first."""
    by_digest: dict[str, list[int]] = defaultdict(list)
    for row, digest in enumerate(emb.sha256):
        if digest:
            by_digest[str(digest)].append(row)
    groups = [np.array(rows) for rows in by_digest.values() if len(rows) > 1]
    return sorted(groups, key=lambda g: (-len(g), int(g[0])))


def fold_exact_copies(
    n: int, exact_groups: list[np.ndarray], i: np.ndarray, j: np.ndarray, s: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs (i < j, similarity) with every byte-identical file replaced by its group's first row:
    a pair within one exact group goes, and pairs that become the same keep their highest similarity."""
    first = np.arange(n)
    for g in exact_groups:
        first[g] = g[0]
    a, b = first[i], first[j]
    lo, hi, keep = np.minimum(a, b), np.maximum(a, b), a != b
    lo, hi, s = lo[keep], hi[keep], np.asarray(s)[keep]
    order = np.lexsort((-s, hi, lo))  # by pair, best similarity first
    lo, hi, s = lo[order], hi[order], s[order]
    new = np.ones(len(lo), bool)
    new[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    return lo[new], hi[new], s[new]


def near_duplicate_pairs(
    emb: EmbeddingSet,
    index: object,
    nb,
    threshold: float,
    local_features: bool = True,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict | None]:
    """The audit's near-duplicate pairs (i < j, cosine) of `emb`: cosine >= `threshold`, plus, with
    `local_features`, edited copies below it; `nb` is `neighbours(index, emb.vectors, >= EDITED_COPY_K)`.
    The dict says how many were edited copies and why some could not be checked (None without)."""
    i, j, s = near_pairs(index, emb.vectors, threshold, nb.sims, nb.rows)
    copies = _edited_copies(emb, nb, threshold, progress) if local_features else None
    if copies is not None and len(copies["i"]):
        i = np.concatenate([i, copies["i"]])
        j = np.concatenate([j, copies["j"]])
        s = np.concatenate([s, copies["s"]])
    return i, j, s, copies


def _edited_copies(emb: EmbeddingSet, nb, threshold: float, progress: bool) -> dict:
    """Pairs below `threshold` confirmed as edited copies by their photos' local features."""
    ci, cj, cs = candidate_pairs(nb.sims, nb.rows, threshold)
    empty = np.zeros(0, np.int64)
    path_of = photo_lookup(emb)
    if path_of is None:
        note = f"the photos are not in {emb.root} any more"
        log.warning("audit: edited copies not checked: %s.", note)
        return {"i": empty, "j": empty, "s": np.zeros(0, np.float32), "note": note}
    matcher = LocalMatcher(path_of)
    keep, _ = edited_copies(matcher, ci, cj, progress=progress)
    note = f"{len(matcher.unreadable)} photos could not be read" if matcher.unreadable else ""
    return {"i": ci[keep], "j": cj[keep], "s": cs[keep], "note": note}


def _leakage(
    index: object,
    emb: EmbeddingSet,
    other: EmbeddingSet,
    threshold: float | None,
    local_features: bool = True,
) -> dict:
    """Every photo of the second folder with a near-duplicate in the first: its nearest photo there at
    `threshold` or above, or an edited copy of it (local features) at EDITED_COPY_MIN_COSINE or above."""
    sims, rows = nearest_in(index, other.vectors)
    if local_features:
        hit, sims, rows = confirm_leaks(
            index, other.vectors, sims, rows, threshold, photo_lookup(emb), photo_lookup(other)
        )
    else:
        hit = sims >= cosine_threshold(threshold, False)
    hit = np.flatnonzero(hit)
    order = hit[np.argsort(-sims[hit], kind="stable")]
    return {
        "queries": len(other),
        "leaked": len(hit),
        "rate": round(len(hit) / len(other), 4),
        "leaked_ids": sorted(int(x) for x in other.ids[hit]),
        "pairs": [
            {
                "query": member(other, q),
                "match": member(emb, int(rows[q])),
                "similarity": round(float(sims[q]), 4),
            }
            for q in order
        ],
    }
