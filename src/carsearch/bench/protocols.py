"""Evaluation protocols (DESIGN.md): closed-set kNN classification, Cars196 zero-shot retrieval, open-set.

They work on an EmbeddingSet in memory; the neighbour search is any faiss factory string (Flat = exact),
so the same protocol measures what an index type costs in accuracy.
"""

from __future__ import annotations

import numpy as np

from carsearch import defaults
from carsearch.embed.store import EmbeddingSet
from carsearch.errors import CarsearchError
from carsearch.eval.knn import vote_details
from carsearch.eval.neighbors import retrieval_recall
from carsearch.eval.openset import (
    auroc,
    fpr_at_tpr,
    kth_similarity,
    leave_one_out_scores,
    threshold_for_tpr,
)
from carsearch.eval.splits import stratified_split
from carsearch.index.core import Index


def zero_shot(emb: EmbeddingSet, test_classes: set[int], ks: tuple[int, ...] = (1, 2, 4, 8)) -> dict:
    """Cars196 protocol: every test-class image queries all other test-class images (exact search);
    Recall@K = share of queries with an image of their class among their K nearest."""
    test = np.flatnonzero(np.isin(emb.class_ids, sorted(test_classes)))
    if len(test) < 2:
        raise CarsearchError("the zero-shot test classes hold fewer than two images.")
    return retrieval_recall(emb.vectors[test], emb.class_ids[test], ks) | {"queries": len(test)}


def open_set(
    emb: EmbeddingSet,
    known_classes: set[int],
    k_openset: int,
    factory: str = "Flat",
    k: int = defaults.K_VOTE,
    temperature: float = defaults.TEMPERATURE,
    tpr: float = defaults.TPR,
    gallery_fraction: float = defaults.GALLERY_FRACTION,
    seed: int = 0,
) -> dict:
    """Gallery: part of the known classes. Queries: the held-out part of known and unknown classes.

    Score = similarity to the k_openset-th neighbour. AUROC and FPR@TPR use the query scores directly
    (the standard OOD metrics); the open-set accuracy uses the threshold `carsearch index build`
    would deploy, calibrated leave-one-out on the gallery alone, so no query informs it.
    """
    gal, qry = stratified_split(emb.class_ids, gallery_fraction, seed)
    is_known = np.isin(emb.class_ids, sorted(known_classes))
    gal = gal[is_known[gal]]
    q_known, q_unknown = qry[is_known[qry]], qry[~is_known[qry]]
    if len(gal) == 0 or len(q_known) == 0 or len(q_unknown) == 0:
        raise CarsearchError(
            "the open-set protocol needs known classes in the gallery and both known and "
            "unknown query images."
        )
    index = Index.build(factory, emb.vectors[gal], seed=seed, target_recall=defaults.TARGET_RECALL)
    depth = max(k, k_openset)
    sims_k, rows_k = index.search(emb.vectors[q_known], depth)
    sims_u, _ = index.search(emb.vectors[q_unknown], depth)
    s_known, s_unknown = kth_similarity(sims_k, k_openset), kth_similarity(sims_u, k_openset)
    # The deployable threshold: leave-one-out over the gallery.
    loo = leave_one_out_scores(index, emb.vectors[gal], np.arange(len(gal)), k_openset, len(gal), seed)
    threshold = threshold_for_tpr(loo, tpr)
    labels = emb.labels
    pred, _ = vote_details(labels[gal], sims_k, rows_k, k, temperature)
    correct = np.array(pred, dtype=object) == labels[q_known]
    right_known = correct & (s_known >= threshold)
    rejected_unknown = s_unknown < threshold
    return {
        "k_openset": k_openset,
        "auroc": auroc(s_known, s_unknown),
        f"fpr@{round(tpr * 100)}tpr": fpr_at_tpr(s_known, s_unknown, tpr),
        "threshold": threshold,
        "tpr_at_threshold": float(np.mean(s_known >= threshold)),
        "fpr_at_threshold": float(np.mean(~rejected_unknown)),
        "open_set_accuracy": float(
            (right_known.sum() + rejected_unknown.sum()) / (len(q_known) + len(q_unknown))
        ),
        "closed_set_top1_known": float(np.mean(correct)),
        "known_queries": len(q_known),
        "unknown_queries": len(q_unknown),
        "gallery": len(gal),
        "scores_known": s_known,
        "scores_unknown": s_unknown,
        "correct_known": correct,
    }
