"""Evaluation protocols (DESIGN.md): closed-set kNN classification, Cars196 zero-shot retrieval, open-set.

They work on an EmbeddingSet in memory; the neighbour search is any faiss factory string (Flat = exact),
so the same protocol measures what an index type costs in accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

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
from carsearch.eval.splits import class_range, class_spec, halve_classes, stratified_split
from carsearch.index.core import Index

LIST_CLASSES = "`carsearch dataset DATA_DIR` lists them"


@dataclass(frozen=True)
class ClassSplit:
    """Which classes the open-set gallery knows and which the zero-shot protocol queries, and why."""

    known: str  # class ids, as --known-classes takes them
    test: str  # class ids, as --test-classes takes them
    how: str  # "given", "cars196" (the defaults) or "halves" (the collection's own classes, seeded)
    note: str  # one sentence for the report


def _cars196_misfit(classes: np.ndarray, numbered: bool) -> str | None:
    """Why Cars196's class ranges do not describe a collection with these class ids, or None if they do:
    both ranges must hold two of its classes or more, and nothing may lie outside them."""
    if numbered:
        return "its class ids are carsearch's numbering of its class names, not Cars196's"
    known, test = class_range(defaults.KNOWN_CLASSES), class_range(defaults.TEST_CLASSES)
    outside = sorted(set(classes.tolist()) - known - test)
    if outside:
        return f"{len(outside)} of its {len(classes)} class ids lie outside 1-196 (such as {outside[0]})"
    in_known, in_test = int(np.isin(classes, sorted(known)).sum()), int(np.isin(classes, sorted(test)).sum())
    if in_known < 2 or in_test < 2:
        return (
            f"of its {len(classes)} classes, {in_known} lie in {defaults.KNOWN_CLASSES} and {in_test} in "
            f"{defaults.TEST_CLASSES}"
        )
    return None


def choose_class_split(
    class_ids: np.ndarray, known: str | None, test: str | None, seed: int, numbered: bool = False
) -> ClassSplit:
    """The class split of the zero-shot and open-set protocols for a collection with these class ids.

    Ranges given are kept; one given alone takes the collection's other classes as its counterpart.
    None given: Cars196's (1-98 known, 99-196 test) when they fit the collection, else its own classes
    cut in two seeded halves (eval.splits.halve_classes), and the note says so. `numbered`: the ids are
    carsearch's numbering of the class names (eval.splits.numbered_by_name), which Cars196's never fit."""
    classes = np.unique(class_ids[class_ids >= 0])
    if known and test:
        return ClassSplit(known, test, "given", "")
    if known or test:
        given = class_range(known or test)
        rest = class_spec(classes[~np.isin(classes, sorted(given))])
        flag, other = ("--known-classes", "test") if known else ("--test-classes", "known")
        note = f"{other} classes: this collection's classes outside {flag} {known or test}, {rest or 'none'}."
        return ClassSplit(known or rest, test or rest, "given", note)
    misfit = _cars196_misfit(classes, numbered)
    if misfit is None:
        return ClassSplit(
            defaults.KNOWN_CLASSES,
            defaults.TEST_CLASSES,
            "cars196",
            f"Cars196's class split: {defaults.KNOWN_CLASSES} known, {defaults.TEST_CLASSES} test.",
        )
    if len(classes) < 2:
        raise CarsearchError(
            f"the zero-shot and open-set protocols split a collection's classes in two, and this one has "
            f"{len(classes)}: run --protocol closed,index."
        )
    first, second = halve_classes(classes, seed)
    return ClassSplit(
        class_spec(first),
        class_spec(second),
        "halves",
        f"Cars196's class split ({defaults.KNOWN_CLASSES} known, {defaults.TEST_CLASSES} test) does not fit "
        f"this collection ({misfit}), so its {len(classes)} classes are split at random in two halves "
        f"(seed {seed}): {len(first)} known (the open-set gallery) and {len(second)} test (zero-shot "
        f"queries, open-set unknowns); {LIST_CLASSES}, --known-classes / --test-classes choose others.",
    )


def check_class_split(class_ids: np.ndarray, split: ClassSplit, protocols: tuple[str, ...]) -> None:
    """Refuse, before anything is measured, a class split the chosen protocols cannot run on."""
    classes = np.unique(class_ids[class_ids >= 0])
    have = f"its class ids are {class_spec(classes)} ({LIST_CLASSES})"
    leave = ", or leave it out to split the collection's classes in half" if split.how == "given" else ""
    if "zeroshot" in protocols and np.isin(class_ids, sorted(class_range(split.test))).sum() < 2:
        raise CarsearchError(
            f"the zero-shot test classes {split.test} hold fewer than two images of this collection: {have}; "
            f"give --test-classes among them{leave}."
        )
    if "openset" in protocols:
        known = np.isin(classes, sorted(class_range(split.known)))
        if not known.any() or known.all():
            raise CarsearchError(
                f"the open-set protocol needs known and unknown classes, and the known classes {split.known} "
                f"are {'none' if not known.any() else 'all'} of this collection's: {have}; give "
                f"--known-classes among them{leave}."
            )


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
    openset_k: int,
    factory: str = "Flat",
    k: int = defaults.K_VOTE,
    temperature: float = defaults.TEMPERATURE,
    tpr: float = defaults.TPR,
    gallery_fraction: float = defaults.GALLERY_FRACTION,
    seed: int = 0,
) -> dict:
    """Gallery: part of the known classes. Queries: the held-out part of known and unknown classes.

    Score = similarity to the openset_k-th neighbour. AUROC and FPR@TPR use the query scores directly
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
    depth = max(k, openset_k)
    sims_k, rows_k = index.search(emb.vectors[q_known], depth)
    sims_u, _ = index.search(emb.vectors[q_unknown], depth)
    s_known, s_unknown = kth_similarity(sims_k, openset_k), kth_similarity(sims_u, openset_k)
    # The deployable threshold: leave-one-out over the gallery.
    loo = leave_one_out_scores(index, emb.vectors[gal], np.arange(len(gal)), openset_k, len(gal), seed)
    threshold = threshold_for_tpr(loo, tpr)
    labels = emb.labels
    pred, _ = vote_details(labels[gal], sims_k, rows_k, k, temperature)
    correct = np.array(pred, dtype=object) == labels[q_known]
    right_known = correct & (s_known >= threshold)
    rejected_unknown = s_unknown < threshold
    return {
        "openset_k": openset_k,
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
