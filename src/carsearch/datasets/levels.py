"""Classification levels: a car's label as its full class name (model), its make, or its model year."""

from __future__ import annotations

import numpy as np

from carsearch.defaults import LEVELS
from carsearch.errors import CarsearchError


class LabelLevels:
    """Labels at a classification level, for anything with `labels`, `make` and `year` arrays."""

    labels: np.ndarray
    make: np.ndarray
    year: np.ndarray

    def level(self, level: str) -> np.ndarray:
        """model (the full class name, e.g. "Audi TTS Coupe 2012"), make ("Audi") or year ("2012")."""
        if level not in LEVELS:
            raise CarsearchError(f"unknown level {level!r}; choose one of {', '.join(LEVELS)}.")
        return {"model": self.labels, "make": self.make, "year": self.year}[level]
