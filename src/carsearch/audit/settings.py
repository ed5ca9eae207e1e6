"""What an audit looks for and how far: one frozen object that `carsearch audit` and the API pass whole."""

from __future__ import annotations

from dataclasses import dataclass

from carsearch import defaults
from carsearch.errors import CarsearchError


@dataclass(frozen=True)
class AuditSettings:
    """The settings of one audit (defaults.py holds every default).

    threshold: the cosine from which two photos are near-duplicates without a look at them (None:
    NEAR_DUPLICATE_THRESHOLD_CONFIRMED with local features, NEAR_DUPLICATE_THRESHOLD without).
    k: neighbours of the label vote; outlier_k: the neighbour whose distance is the outlier score.
    exact: exact search (Flat) or IVF (None: exact up to defaults.AUDIT_EXACT_LIMIT photos).
    top: entries of each list in the report and on the page. page: also write the HTML page.
    local_features: also find edited copies below the threshold by local-feature and pixel agreement
    of the photos (eval/edited_copies.py).

    Raises CarsearchError for a threshold outside (0, 1] or a k or outlier_k under 1.
    """

    threshold: float | None = None
    k: int = defaults.AUDIT_VOTE_K
    outlier_k: int = defaults.AUDIT_OUTLIER_K
    exact: bool | None = None
    top: int = defaults.AUDIT_LIST
    page: bool = True
    local_features: bool = True

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise CarsearchError("--threshold is a cosine similarity: give a value in (0, 1].")
        if self.k < 1 or self.outlier_k < 1:
            raise CarsearchError("--k and --outlier-k must be at least 1.")
