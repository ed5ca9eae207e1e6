"""Classification levels: a car's label as its whole class name (class), its make, or its model year."""

from __future__ import annotations

import numpy as np

from carsearch.defaults import LEVEL_ALIASES, LEVELS
from carsearch.errors import CarsearchError


def level_name(level: str) -> str:
    """The level `level` names: one of LEVELS, an old name (LEVEL_ALIASES: "model") giving its new one.
    Raises CarsearchError for any other."""
    level = LEVEL_ALIASES.get(level, level)
    if level not in LEVELS:
        raise CarsearchError(f"unknown level {level!r}; choose one of {', '.join(LEVELS)}.")
    return level


class LabelLevels:
    """Labels at a classification level, for anything with `labels`, `make` and `year` arrays."""

    labels: np.ndarray
    make: np.ndarray
    year: np.ndarray

    def level(self, level: str) -> np.ndarray:
        """class (the whole class name, e.g. "Audi TTS Coupe 2012"), make ("Audi") or year ("2012");
        "model" is class's old name."""
        return {"class": self.labels, "make": self.make, "year": self.year}[level_name(level)]
