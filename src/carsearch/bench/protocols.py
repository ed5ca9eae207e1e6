"""Evaluation protocols (DESIGN.md): closed-set kNN classification, Cars196 zero-shot retrieval, open-set.

They work on an EmbeddingSet in memory; the neighbour search is any faiss factory string (Flat = exact),
so the same protocol measures what an index type costs in accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from carsearch.embed.store import EmbeddingSet
from carsearch.errors import CarsearchError
from carsearch.index.build import leave_one_out_scores
from carsearch.index.factory import make_index, set_search_params, train_and_add
from carsearch.index.tune import tune
from carsearch.search.openset import auroc, fpr_at_tpr, kth_similarity, threshold_for_tpr
from carsearch.search.vote import DEFAULT_K, DEFAULT_TEMPERATURE, vote

GALLERY_FRACTION = 2 / 3


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


@dataclass
class SearchIndex:
    """A faiss index over some vectors, in memory, with the row positions as ids."""

    index: object
    factory: str
    params: str
    recall: float | None

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        factory: str = "Flat",
        target_recall: float | None = 0.95,
        params: str | None = None,
        seed: int = 0,
    ) -> SearchIndex:
        index = make_index(factory, vectors.shape[1])
        train_and_add(index, vectors, np.arange(len(vectors)), seed)
        recall = None
        if params is not None:
            set_search_params(index, params)
        elif target_recall is not None:
            tuned = tune(index, vectors, np.arange(len(vectors)), target_recall, seed=seed)
            params, recall = tuned.params, tuned.recall
        return cls(index, factory, params or "", recall)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, gallery row positions), -1 where fewer than k were found."""
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def knn_metrics(
    gallery_labels: np.ndarray,
    query_labels: np.ndarray,
    sims: np.ndarray,
    rows: np.ndarray,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
) -> dict[str, float]:
    """top-1 / top-5 of the ranked weighted vote, hit@1 / hit@5 of the raw neighbours."""
    top1 = top5 = hit1 = hit5 = 0
    for truth, s, r in zip(query_labels, sims, rows, strict=True):
        ok = r[:k] >= 0
        neigh = gallery_labels[r[:k][ok]]
        ranked = [lab for lab, _ in vote(list(neigh), s[:k][ok], temperature)]
        top1 += bool(ranked) and ranked[0] == truth
        top5 += truth in ranked[:5]
        hit1 += len(neigh) > 0 and neigh[0] == truth
        hit5 += truth in set(neigh[:5])
    n = max(1, len(query_labels))
    return {
        "top1": top1 / n,
        "top5": top5 / n,
        "hit1": hit1 / n,
        "hit5": hit5 / n,
        "queries": len(query_labels),
    }


def vote_details(
    gallery_labels: np.ndarray,
    sims: np.ndarray,
    rows: np.ndarray,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
) -> tuple[list[str | None], np.ndarray]:
    """The winning label of each query's vote and its vote share (the classifier's confidence)."""
    preds, conf = [], []
    for s, r in zip(sims, rows, strict=True):
        ok = r[:k] >= 0
        ranked = vote(list(gallery_labels[r[:k][ok]]), s[:k][ok], temperature)
        preds.append(ranked[0][0] if ranked else None)
        conf.append(ranked[0][1] if ranked else 0.0)
    return preds, np.array(conf)


def zero_shot(emb: EmbeddingSet, test_classes: set[int], ks: tuple[int, ...] = (1, 2, 4, 8)) -> dict:
    """Cars196 protocol: every test-class image queries all other test-class images (exact search);
    Recall@K = share of queries with an image of their class among their K nearest."""
    test = np.flatnonzero(np.isin(emb.class_ids, sorted(test_classes)))
    if len(test) < 2:
        raise CarsearchError("the zero-shot test classes hold fewer than two images.")
    return retrieval_recall(emb.vectors[test], emb.class_ids[test], ks) | {"queries": len(test)}


def retrieval_recall(vectors: np.ndarray, classes: np.ndarray, ks: tuple[int, ...] = (1, 2, 4, 8)) -> dict:
    """Each (L2-normalised) vector queries all the others by exact cosine; Recall@K = share of queries with
    a vector of their class among their K nearest. The metric of the zero-shot protocol and of training's
    validation."""
    index = SearchIndex.build(vectors, "Flat", None)
    _, rows = index.search(vectors, min(max(ks) + 1, len(vectors)))
    # Drop each query itself (it is its own nearest neighbour); the rest keep their order.
    own = rows == np.arange(len(vectors))[:, None]
    neigh = np.array([r[~o][: max(ks)] for r, o in zip(rows, own, strict=True)])
    same = classes[neigh] == classes[:, None]
    return {f"recall@{k}": float(np.mean(same[:, :k].any(axis=1))) for k in ks}


def open_set(
    emb: EmbeddingSet,
    known_classes: set[int],
    k_openset: int,
    factory: str = "Flat",
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    tpr: float = 0.95,
    gallery_fraction: float = GALLERY_FRACTION,
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
    index = SearchIndex.build(emb.vectors[gal], factory, 0.95, seed=seed)
    depth = max(k, k_openset)
    sims_k, rows_k = index.search(emb.vectors[q_known], depth)
    sims_u, _ = index.search(emb.vectors[q_unknown], depth)
    s_known, s_unknown = kth_similarity(sims_k, k_openset), kth_similarity(sims_u, k_openset)
    # The deployable threshold: leave-one-out over the gallery.
    loo = leave_one_out_scores(index.index, emb.vectors[gal], np.arange(len(gal)), k_openset, len(gal), seed)
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
