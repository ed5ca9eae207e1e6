"""Accuracy on the dev protocol: frozen features vs the one-command tuned workflow, with and without
test-time flip, side by side in one run.

Dev protocol (shared/DESIGN.md): each class of the dev folder is split 2/3 gallery (+ training) / 1/3
queries with the project's seeded per-class split (seed 0). The tuned workflow only ever sees the gallery:
it is run exactly as a user would run `carsearch index build GALLERY --tune-head` on a collection that is
the gallery (its head trains on 80% of each gallery class and picks its epoch on the other 20%); the
queries are then embedded through the index's head. Closed set: top-1 / top-5 of the weighted vote
(k=20, T=0.07), make top-1, hit@1 / hit@5. Zero-shot (Cars196 protocol) and open set: a head trained on
the gallery images of classes 1-98 only; classes 99-196 are never seen; AUROC and FPR@95%TPR need no
threshold.

    carsearch embed ../shared/data/stanford-cars-dev --out emb/lite0 --backbone efficientnet_lite0
    carsearch embed ../shared/data/stanford-cars-dev --out emb/lite0-flip --backbone efficientnet_lite0 --flip
    python benchmarks/tuned_accuracy.py emb/lite0 emb/lite0-flip --work /tmp/tuned-acc
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from carsearch.bench.runner import BenchSettings, run_bench
from carsearch.embed.project import project_embeddings
from carsearch.embed.store import load_embeddings, write_embedding_set
from carsearch.eval.knn import knn_metrics
from carsearch.eval.splits import class_range, stratified_split
from carsearch.index.core import Index
from carsearch.index.settings import IndexSettings
from carsearch.train.tuned import build_tuned_index


def closed_set(gallery_vectors, gallery, query_vectors, queries) -> dict:
    """kNN metrics of queries against a gallery (exact search), at the model and make levels."""
    index = Index.build("Flat", gallery_vectors, target_recall=None)
    sims, rows = index.search(query_vectors, 20)
    model = knn_metrics(gallery.labels, queries.labels, sims, rows)
    make = knn_metrics(gallery.make, queries.make, sims, rows)
    return {**{k: model[k] for k in ("top1", "top5", "hit1", "hit5")}, "make_top1": make["top1"]}


def zero_shot_open_set(emb_dir: Path, out: Path) -> dict:
    s = BenchSettings(
        factories=["Flat"], protocols=("zeroshot", "openset"), peers=False, sweep=False, plots=False
    )
    r = run_bench(emb_dir, out, s, progress=False)
    z, o = r["zeroshot"], r["openset"]
    return {
        **{f"R@{k}": z[f"recall@{k}"] for k in (1, 2, 4, 8)},
        "auroc": o["auroc"],
        "fpr95": o["fpr@95tpr"],
    }


def evaluate(emb_dir: Path, work: Path, label: str) -> list[dict]:
    emb = load_embeddings(emb_dir)
    gal, qry = stratified_split(emb.class_ids, 2 / 3, 0)
    rows = []
    frozen = closed_set(emb.vectors[gal], emb.subset(gal), emb.vectors[qry], emb.subset(qry))
    rows.append(
        {
            "embeddings": f"frozen {label}",
            "dim": emb.dim,
            **frozen,
            **zero_shot_open_set(emb_dir, work / f"{label}-frozen-bench"),
        }
    )
    # The tuned workflow, closed set: the collection is the gallery, nothing else.
    gallery_dir = write_embedding_set(
        emb.subset(gal), work / f"{label}-gallery", "dev protocol gallery (2/3)"
    )
    t0 = time.perf_counter()
    build_tuned_index(
        gallery_dir, work / f"{label}-tuned-index", progress=False, index=IndexSettings(factory="Flat")
    )
    tune_s = time.perf_counter() - t0
    head = work / f"{label}-tuned-index" / "head"
    project_embeddings(emb_dir, head, work / f"{label}-projected")
    proj = load_embeddings(work / f"{label}-projected")
    assert (proj.ids == emb.ids).all()
    # The tuned index is Flat over the projected gallery: searched here as such.
    tuned = closed_set(proj.vectors[gal], emb.subset(gal), proj.vectors[qry], emb.subset(qry))
    # Zero-shot and open set: a head trained on the gallery images of classes 1-98 only.
    known = np.isin(emb.class_ids, sorted(class_range("1-98")))
    known_gallery = write_embedding_set(
        emb.subset(np.intersect1d(gal, np.flatnonzero(known))), work / f"{label}-gallery-1-98", "classes 1-98"
    )
    build_tuned_index(
        known_gallery, work / f"{label}-tuned-1-98", progress=False, index=IndexSettings(factory="Flat")
    )
    project_embeddings(emb_dir, work / f"{label}-tuned-1-98" / "head", work / f"{label}-projected-1-98")
    open_ = zero_shot_open_set(work / f"{label}-projected-1-98", work / f"{label}-tuned-bench")
    rows.append(
        {
            "embeddings": f"head-only tuned {label}",
            "dim": proj.dim,
            **tuned,
            **open_,
            "train_seconds": round(tune_s, 1),
        }
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("emb_dirs", nargs="+", type=Path, help="embedding folders of the whole dev set")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for emb_dir in a.emb_dirs:
        prep = load_embeddings(emb_dir).provenance["preprocessing"]
        label = f"{load_embeddings(emb_dir).provenance['backbone']}{' + flip' if prep.get('flip') else ''}"
        rows += evaluate(emb_dir, a.work, label.replace(" ", "").replace("+", "-"))
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    cols = ["top1", "top5", "make_top1", "hit1", "hit5", "R@1", "R@2", "R@4", "R@8", "auroc", "fpr95"]
    print("| embeddings | dim | " + " | ".join(cols) + " | head training |")
    print("|---|---:|" + "---:|" * len(cols) + "---:|")
    for r in rows:
        vals = [f"{r[c]:.3f}" if c == "auroc" else f"{100 * r[c]:.1f}%" for c in cols]
        extra = f"{r['train_seconds']:.1f} s" if "train_seconds" in r else "-"
        print(f"| {r['embeddings']} | {r['dim']} | " + " | ".join(vals) + f" | {extra} |")


if __name__ == "__main__":
    main()
