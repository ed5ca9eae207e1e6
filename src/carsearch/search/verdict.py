"""A classification's verdict: known, "unknown" (open-set rejection) or "uncertain", and the reason said.

Two unknown-model scores, whichever the index was calibrated with: the similarity to the k-th nearest
indexed photo (eval/openset.py; every index) and, for an index built with `--tune` by a network with a
cosine classifier, the largest cosine to its class weights (eval/class_cosine.py), used while every
labelled class of the index has a weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from carsearch import defaults
from carsearch.eval.class_cosine import ClassCosine
from carsearch.eval.openset import kth_similarity


@dataclass(frozen=True)
class Verdict:
    unknown: bool
    uncertain: bool
    score: float | None  # the unknown-model score the threshold applies to
    threshold: float | None
    reason: str | None


def judge(
    openset: dict | None,
    class_cosine: ClassCosine | None,
    vector: np.ndarray,
    sims: np.ndarray,
    found: int,
    top: tuple[str | None, float],
    level: str,
    reject: bool,
) -> Verdict:
    """The verdict on one query: `vector` (d,) its embedding, `sims` its neighbours' similarities (best
    first), `found` how many neighbours passed the filter, `top` the winning label and its vote share."""
    if openset is None:
        return Verdict(False, False, None, None, None)
    if class_cosine is not None:
        score, threshold = float(class_cosine.score(vector[None])[0]), class_cosine.threshold
        why = "the closest known model's class weight"
    else:
        # A filter may leave fewer than k neighbours: then the farthest one that passed stands in for the
        # k-th (closer, so the test is lenient), and with none there is nothing to compare with.
        k = min(int(openset["k"]), found)
        score = float(kth_similarity(sims, k)[0]) if k else None
        threshold = openset["threshold"]
        why = ("the nearest" if k == 1 else f"the k-th nearest (k {k})") + " indexed photo"
    unknown = bool(reject and score is not None and score < threshold)
    share_cut = (openset.get("uncertain") or {}).get("share_threshold")
    uncertain = (
        bool(reject and not unknown and top[0] is not None and level == "class" and share_cut is not None)
        and top[1] < share_cut
    )
    reason = None
    if unknown:
        reason = f"similarity {score:.3f} to {why} is below the open-set threshold {threshold:.3f}"
    elif uncertain:
        reason = (
            f"its vote share {top[1]:.0%} is below {share_cut:.0%}, the share that "
            f"{openset.get('tpr_target', defaults.TPR):.0%} of right answers on held-out photos reached"
        )
    return Verdict(unknown, uncertain, score, threshold, reason)
