"""How an index is built: one frozen object that `index build`, `--tune` and the API pass whole."""

from __future__ import annotations

from dataclasses import dataclass

from carsearch import defaults
from carsearch.errors import CarsearchError


@dataclass(frozen=True)
class IndexSettings:
    """The settings of one index build (defaults.py holds every default).

    factory: a faiss index_factory string, or "auto" (index/auto.py picks one for the size and the
    budget). memory_budget: bytes the index may take (auto's choice, the training sample's size).
    target_recall: the 10-recall@10 against exact search that tuning reaches with the fewest visits.
    calibrate: set the open-set threshold by leave-one-out on the collection; openset_k: its neighbour
    (the k-th most similar photo); tpr: the share of known-model queries the threshold keeps. seed: the
    training, tuning and calibration samples. max_train: vectors faiss trains on (None: as many as a
    quarter of the budget holds, within defaults.MIN/MAX_TRAIN_VECTORS).

    Raises CarsearchError for a target recall outside (0, 1].
    """

    factory: str = defaults.FACTORY
    memory_budget: int = defaults.MEMORY_BUDGET
    target_recall: float = defaults.TARGET_RECALL
    calibrate: bool = True
    openset_k: int = defaults.OPENSET_K
    tpr: float = defaults.TPR
    seed: int = defaults.SEED
    max_train: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.target_recall <= 1:
            raise CarsearchError("--target-recall must be in (0, 1].")
