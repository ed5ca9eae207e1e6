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
from pathlib import Path

import numpy as np

from carsearch import SCHEMA_VERSION
from carsearch.audit.findings import Findings, find, member
from carsearch.audit.settings import AuditSettings
from carsearch.embed.store import EmbeddingSet, load_embeddings
from carsearch.errors import CarsearchError
from carsearch.fsutil import write_json_atomic, write_text_atomic
from carsearch.index.families import FLAT, family_of, neighbour_index_bytes
from carsearch.index.idlist import write_id_list
from carsearch.memwatch import peak_rss_bytes
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
    t0 = time.perf_counter()
    emb = _load(emb_dir, "the embedding folder")
    other = _load(queries_dir, "the second embedding folder") if queries_dir else None
    if other is not None:
        check_compatible(emb.provenance, other.provenance, str(emb.folder), str(other.folder))
    out = Path(out).expanduser().resolve()
    found = find(emb, other, cfg, progress, t0)
    report, lists = _report(emb, other, found, cfg)
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

        write_page(report, emb, other, out, cfg.top)
    from carsearch.audit.report import markdown

    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["peak_rss_bytes"] = peak_rss_bytes()
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", markdown(report))
    return report


def _report(
    emb: EmbeddingSet, other: EmbeddingSet | None, f: Findings, cfg: AuditSettings
) -> tuple[dict, dict[str, tuple]]:
    """(report.json's content, {id list: (embedding set, its rows)}) from what the audit found."""
    n, k, top = len(emb), cfg.k, cfg.top
    i, j, s = f.pairs
    quality, outlier, leakage, exact_groups, near = f.quality, f.outlier, f.leakage, f.exact_groups, f.near
    pair_sim = {(int(a), int(b)): float(c) for a, b, c in zip(i, j, s, strict=True)}
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
    is_outlier = outlier < f.fence
    duplicate_rows = {int(r) for g in [*exact_groups, *near] for r in g[1:]}
    lists = {  # the photos each id list names: (embedding set, rows)
        "duplicates": (emb, np.array(sorted(duplicate_rows), np.int64)),
        "suspects": (emb, np.flatnonzero(flagged | is_outlier)),
        "leaked": (other, np.flatnonzero(np.isin(other.ids, leakage["leaked_ids"])) if leakage else None),
    }
    copies = f.copies
    report = {
        "kind": REPORT_KIND,
        "schema_version": SCHEMA_VERSION,
        "folder": str(emb.folder),
        "queries_folder": str(other.folder) if other is not None else None,
        "backbone": emb.provenance["backbone"],
        "settings": {
            "threshold": f.threshold,
            "k": k,
            "outlier_k": cfg.outlier_k,
            "search": "exact (Flat)" if family_of(f.index) is FLAT else f"IVF, nprobe {f.index.nprobe}",
            "outlier_fence": round(f.fence, 4),
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
                "voted_examples": [member(emb, e) for e in _voted_examples(emb, quality.voted, f.nb, k, r)],
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
        "timings": f.timings,
        "index_bytes": neighbour_index_bytes(f.index),
        "peak_rss_bytes": 0,
    }
    return report, lists


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
