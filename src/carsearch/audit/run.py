"""`carsearch audit`: duplicates, leakage, label conflicts, likely mislabelled photos and outliers of an
embedding folder, from the embeddings and sha256 digests its shards already hold.

Writes REPORT_DIR/report.json, report.md, index.html (+ thumbs/), and id lists that `index build
--exclude` and `index remove --ids-file` take (`id<TAB>path` lines under a header naming the embedding
folder: index/idlist.py): exclude-duplicates.txt (every member of a duplicate group but its first),
suspects.txt (likely mislabelled + outliers), leaked.txt (the second folder's leaked photos).

Byte-identical files are reported once, as exact duplicates: the near-duplicate groups hold each such
file once (its first copy, with `exact_copies` saying how many more there are, and their labels among
the group's).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from carsearch import SCHEMA_VERSION
from carsearch.audit.scores import label_quality, neighbours, outlier_fence, outlier_scores
from carsearch.audit.settings import AuditSettings
from carsearch.embed.store import EmbeddingSet, load_embeddings
from carsearch.errors import CarsearchError
from carsearch.eval.duplicates import components, near_pairs, nearest_in
from carsearch.eval.edited_copies import (
    LocalMatcher,
    candidate_pairs,
    confirm_leaks,
    cosine_threshold,
    edited_copies,
    photo_lookup,
)
from carsearch.fsutil import write_json_atomic, write_text_atomic
from carsearch.index.families import FLAT, family_of, neighbour_index, neighbour_index_bytes
from carsearch.index.idlist import write_id_list
from carsearch.memwatch import peak_rss_bytes
from carsearch.progress import Progress
from carsearch.provenance import check_compatible

log = logging.getLogger(__name__)

REPORT_KIND = "carsearch-audit"
ID_LISTS = {
    "duplicates": "exclude-duplicates.txt",
    "suspects": "suspects.txt",
    "leaked": "leaked.txt",
}
ID_LIST_ABOUT = {
    "duplicates": "carsearch audit: exact and near-duplicates to leave out (a group keeps its first photo)",
    "suspects": "carsearch audit: likely mislabelled photos and outliers",
    "leaked": "carsearch audit: photos of the second folder with a near-duplicate in the first (leakage)",
}
VOTED_EXAMPLES = 3  # photos of the class the neighbours vote for, shown beside each suspect


def _load(folder: str | Path, what: str) -> EmbeddingSet:
    emb = load_embeddings(folder)
    if len(emb) == 0:
        raise CarsearchError(f"{what} {emb.folder} holds no embeddings; run embed on a folder with images.")
    return emb


def member(emb: EmbeddingSet, row: int) -> dict:
    return {
        "id": int(emb.ids[row]),
        "path": str(emb.paths[row]),
        "label": str(emb.labels[row]),
    }


def audit(
    emb_dir: str | Path,
    out: str | Path,
    queries_dir: str | Path | None = None,
    settings: AuditSettings | None = None,
    *,
    progress: bool = True,
) -> dict:
    """Audit `emb_dir` (and the leakage of `queries_dir` into it) as `settings` say (audit/settings.py);
    write the report into `out` and return it. Edited copies are skipped, with a note in the summary,
    when the photos are not where the embedding folder says. Raises CarsearchError for an empty or
    unreadable folder, ProvenanceMismatch for two folders of different networks."""
    cfg = settings or AuditSettings()
    threshold, k, outlier_k, top, local_features = (
        cfg.threshold,
        cfg.k,
        cfg.outlier_k,
        cfg.top,
        cfg.local_features,
    )
    t0 = time.perf_counter()
    emb = _load(emb_dir, "the embedding folder")
    other = _load(queries_dir, "the second embedding folder") if queries_dir else None
    if other is not None:
        check_compatible(emb.provenance, other.provenance, str(emb.folder), str(other.folder))
    out = Path(out).expanduser().resolve()
    n = len(emb)
    given_threshold = threshold
    threshold = cosine_threshold(threshold, local_features and photo_lookup(emb) is not None)
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
        exact_used = family_of(index) is FLAT
        step("index")
        depth = min(max(k, outlier_k), max(1, n - 1))
        # One kNN search serves the vote, the outlier score, and most of the near-duplicate pairs.
        nb = neighbours(index, emb.vectors, depth)
        step("neighbours")
        exact_groups = _exact_groups(emb)
        i, j, s, copies = near_duplicate_pairs(emb, index, nb, threshold, local_features, progress)
        i, j, s = fold_exact_copies(n, exact_groups, i, j, s)
        near = components(n, i, j)
        pair_sim = {(int(a), int(b)): float(c) for a, b, c in zip(i, j, s, strict=True)}
        step("duplicates")
        quality = label_quality(emb.labels, nb, k)
        step("votes")
        outlier = outlier_scores(nb, outlier_k)
        fence = outlier_fence(outlier)
        step("outliers")
        leakage = _leakage(index, emb, other, given_threshold, local_features) if other is not None else None
        if other is not None:
            step("leakage")
    labelled = emb.labels != ""
    copies_of = {int(g[0]): g for g in exact_groups}
    near_groups = [_group(emb, g, pair_sim, copies_of) for g in near]
    exact_dups = [
        {"sha256": str(emb.sha256[g[0]]), "members": [member(emb, r) for r in g], **_labels(emb, g)}
        for g in exact_groups
    ]
    conflicts = [gi for gi, g in enumerate(near_groups) if g["conflict"]]
    # Ranked by score among the photos that can be judged; "too few examples" ones after them.
    ranked = np.where(quality.too_few_examples, -1.0, quality.mislabel_score)
    mislabel_order = np.argsort(-ranked[labelled], kind="stable")
    mislabel_rows = np.flatnonzero(labelled)[mislabel_order]
    flagged = quality.flagged & labelled
    too_few = quality.too_few_examples & labelled
    outlier_rows = np.argsort(outlier, kind="stable")
    is_outlier = outlier < fence
    duplicate_rows = {int(r) for g in [*exact_groups, *near] for r in g[1:]}
    lists = {  # the photos each id list names: (embedding set, rows)
        "duplicates": (emb, np.array(sorted(duplicate_rows), np.int64)),
        "suspects": (emb, np.flatnonzero(flagged | is_outlier)),
        "leaked": (other, np.flatnonzero(np.isin(other.ids, leakage["leaked_ids"])) if leakage else None),
    }
    report = {
        "kind": REPORT_KIND,
        "schema_version": SCHEMA_VERSION,
        "folder": str(emb.folder),
        "queries_folder": str(other.folder) if other is not None else None,
        "backbone": emb.provenance["backbone"],
        "settings": {
            "threshold": threshold,
            "k": k,
            "outlier_k": outlier_k,
            "search": "exact (Flat)" if exact_used else f"IVF, nprobe {index.nprobe}",
            "outlier_fence": round(fence, 4),
        },
        "summary": {
            "images": n,
            "labelled": int(labelled.sum()),
            "exact_duplicate_groups": len(exact_groups),
            "exact_duplicate_images": sum(len(g) for g in exact_groups),
            "exact_duplicate_conflicts": sum(g["conflict"] for g in exact_dups),
            "near_duplicate_pairs": len(i),
            "edited_copy_pairs": len(copies["i"]) if copies else 0,
            **({"edited_copies_not_checked": copies["note"]} if copies and copies["note"] else {}),
            "near_duplicate_groups": len(near),
            "near_duplicate_images": sum(len(g) for g in near),
            "label_conflicts": len(conflicts),
            "likely_mislabelled": int(flagged.sum()),
            "too_few_examples_to_judge": int(too_few.sum()),
            "outliers": int(is_outlier.sum()),
            **({"leaked_queries": leakage["leaked"], "leakage_rate": leakage["rate"]} if leakage else {}),
        },
        "exact_duplicates": exact_dups,
        "near_duplicates": near_groups,
        "label_conflicts": conflicts,
        "mislabelled": [
            {
                **member(emb, r),
                "score": round(float(quality.mislabel_score[r]), 4),
                "voted": str(quality.voted[r]),
                "voted_share": round(float(quality.voted_share[r]), 4),
                "flagged": bool(flagged[r]),
                "too_few_examples": bool(too_few[r]),
                "voted_examples": [member(emb, e) for e in _voted_examples(emb, quality.voted, nb, k, r)],
            }
            for r in mislabel_rows[:top]
        ],
        "too_few_examples": [member(emb, r) for r in np.flatnonzero(too_few)[:top]],
        "outliers": [
            {**member(emb, r), "kth_similarity": round(float(outlier[r]), 4), "flagged": bool(is_outlier[r])}
            for r in outlier_rows[:top]
        ],
        "leakage": leakage,
        "id_lists": {name: ID_LISTS[name] for name in lists},
        "seconds": 0.0,
        "timings": timings,
        "index_bytes": neighbour_index_bytes(index),
        "peak_rss_bytes": 0,
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, (where, rows) in lists.items():
        if where is None:  # leaked.txt without a second folder: no photo, no folder
            write_id_list(out / ID_LISTS[name], [], None, ID_LIST_ABOUT[name])
            continue
        rows = rows[np.argsort(where.ids[rows], kind="stable")]
        named = [(int(where.ids[r]), str(where.paths[r])) for r in rows]
        write_id_list(out / ID_LISTS[name], named, where.folder, ID_LIST_ABOUT[name])
    if cfg.page:
        from carsearch.audit.page import write_page

        write_page(report, emb, other, out, top)
    from carsearch.audit.report import markdown

    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["peak_rss_bytes"] = peak_rss_bytes()
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", markdown(report))
    return report


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


def _voted_examples(emb: EmbeddingSet, voted: np.ndarray, nb, k: int, row: int) -> list[int]:
    """Up to VOTED_EXAMPLES rows of the class row's neighbours vote for: its nearest neighbours of that
    class first, then the class's first other photos."""
    label = str(voted[row])
    if not label or label == str(emb.labels[row]):
        return []
    picked = [int(r) for r in nb.rows[row, :k] if r >= 0 and str(emb.labels[r]) == label]
    picked = picked[:VOTED_EXAMPLES]
    if len(picked) < VOTED_EXAMPLES:
        more = [int(r) for r in np.flatnonzero(emb.labels == label) if r != row and r not in picked]
        picked += more[: VOTED_EXAMPLES - len(picked)]
    return picked


def _group(
    emb: EmbeddingSet,
    rows: np.ndarray,
    pair_sim: dict[tuple[int, int], float],
    copies_of: dict[int, np.ndarray],
) -> dict:
    """A near-duplicate group; a member that stands for byte-identical files brings their labels."""
    sims = [pair_sim[(a, b)] for a in rows for b in rows if (a, b) in pair_sim]
    every = np.concatenate([copies_of.get(int(r), np.array([r])) for r in rows])
    return {
        "members": [
            {**member(emb, r), **({"exact_copies": len(copies_of[r]) - 1} if r in copies_of else {})}
            for r in rows
        ],
        "min_similarity": round(min(sims), 4),
        "max_similarity": round(max(sims), 4),
        **_labels(emb, every),
    }


def _labels(emb: EmbeddingSet, rows: np.ndarray) -> dict:
    labels = sorted({str(emb.labels[r]) for r in rows if emb.labels[r]})
    return {"labels": labels, "conflict": len(labels) > 1}


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
