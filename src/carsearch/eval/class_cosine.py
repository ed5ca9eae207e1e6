"""Open-set score from the tuned network's own classifier: a query's largest cosine to the class weights.

A network trained with a cosine classifier (cosine-ce, normalized-softmax, CosFace, ArcFace) or proxies
learns one unit vector per class; the largest cosine of a query to them is the maximum-logit score divided
by the scale, which Vaze et al. ("Open-Set Recognition: a Good Closed-Set Classifier is All You Need",
ICLR 2022) found a strong open-set baseline. Measured on the dev protocol (classes 1-98 trained, 99-196
unknown, docs/benchmarks.md) it separates unknown models better than the similarity to the nearest indexed
photo: AUROC 0.857 against 0.838, FPR@95%TPR 0.62 against 0.80 (cpu-hour checkpoint at 320 px).

The weights are saved with the best epoch's network (`CLASS_WEIGHTS_FILE` in the checkpoint folder:
"weights" (C, d) float32 unit rows, "class_ids" (C,) int64); `index build --tune` calibrates a threshold
on the held-out images and records it with the classes' labels in index.json's openset.class_cosine. It
applies only while every labelled class of the index has a weight: photos of a new model added later fall
back to the neighbour score.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from carsearch.errors import CarsearchError
from carsearch.fsutil import sha256_file

CLASS_WEIGHTS_FILE = "class_weights.safetensors"


def max_class_cosine(vectors: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(n,) float64: each unit row of `vectors` (n, d) against the unit rows of `weights` (C, d)."""
    return (
        (np.asarray(vectors, np.float32) @ np.asarray(weights, np.float32).T).max(axis=1).astype(np.float64)
    )


def load_class_weights(folder: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(weights (C, d) float32, class_ids (C,) int64) saved beside a checkpoint, None when there are none."""
    from safetensors.numpy import load_file

    path = Path(folder) / CLASS_WEIGHTS_FILE
    if not path.is_file():
        return None
    t = load_file(str(path))
    return t["weights"].astype(np.float32), t["class_ids"].astype(np.int64)


@dataclass(frozen=True)
class ClassCosine:
    """The calibrated score of an index: `weights` (C, d) unit rows, `labels` (C,) their class labels."""

    weights: np.ndarray
    labels: frozenset[str]
    threshold: float

    @classmethod
    def from_openset(cls, openset: dict | None, checkpoint: str | Path | None) -> ClassCosine | None:
        """From index.json's openset.class_cosine and the checkpoint folder it names; None when the index
        has none. Raises CarsearchError when the weights file changed since calibration."""
        cc = (openset or {}).get("class_cosine")
        if not cc or not checkpoint:
            return None
        path = Path(checkpoint) / CLASS_WEIGHTS_FILE
        if not path.is_file() or sha256_file(path) != cc["sha256"]:
            raise CarsearchError(
                f"{path} is missing or changed since the index was calibrated; rebuild the index with "
                "--tune, or use the neighbour score (index calibrate)."
            )
        weights, _ = load_class_weights(path.parent)
        return cls(weights, frozenset(cc["labels"]), float(cc["threshold"]))

    def covers(self, labels: np.ndarray) -> bool:
        """Whether every labelled class of the index has a class weight."""
        return set(np.unique(labels).tolist()) - {""} <= self.labels

    def score(self, vectors: np.ndarray) -> np.ndarray:
        return max_class_cosine(vectors, self.weights)
