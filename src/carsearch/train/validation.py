"""Validation Recall@1: held-out images embedded through the same Encoder that embeds collections."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from carsearch.datasets import Record
from carsearch.embed.encoder import Encoder
from carsearch.errors import CarsearchError
from carsearch.eval.neighbors import retrieval_recall
from carsearch.models import Loaded, Preprocessing, WeightsInfo
from carsearch.train.data import TrainImages

VALIDATION_BATCH = 64


def recall_at_1(vectors: np.ndarray, classes: np.ndarray) -> float:
    """Each vector queries all others (exact cosine); share whose nearest has the same class."""
    if len(vectors) < 2:
        return float("nan")
    x = np.ascontiguousarray(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), dtype=np.float32)
    return retrieval_recall(x, np.asarray(classes), (1,))["recall@1"]


def require_validation(n: int, how: str) -> None:
    """Validation needs two images at least (each queries the others); say what to change if not."""
    if n < 2:
        raise CarsearchError(
            f"the validation set ({how}) holds {n} usable image(s), and Recall@1 needs at least two: "
            "give --val-classes, or a --train-fraction below 1."
        )


class ImageValidation:
    """Validation images decoded and framed once (uint8 arrays), embedded by the network under training."""

    def __init__(self, root: Path, records: list[Record], classes: list[int], prep: Preprocessing) -> None:
        ds = TrainImages(root, records, classes, prep, augment=False)
        items = [ds[i] for i in range(len(ds))]
        good = [(a, t) for a, t in items if a is not None]
        self.arrays = np.stack([a for a, _ in good]) if good else np.zeros((0, 1, 1, 3), np.uint8)
        self.classes = np.array([t for _, t in good])
        self.prep = prep

    def __len__(self) -> int:
        return len(self.classes)

    def recall(self, net: nn.Module, dim: int, device: torch.device, precision: str) -> float:
        """Recall@1 of `net`'s embeddings (the network stays trainable: it is wrapped, not frozen)."""
        loaded = Loaded(net, WeightsInfo("training", None, "training"), self.prep, dim)
        encoder = Encoder(loaded, "", None, device, precision, freeze=False)
        return recall_at_1(encoder.encode_arrays(self.arrays, VALIDATION_BATCH), self.classes)
