"""Models: the backbone registry (declared configs), weights sources, the embedding network, checkpoints.

`load_backbone(name, weights)` is the one way to get a network: `embed`, `train`, `search` and `serve`
ask it and never build networks themselves. Exports load on first use (descriptor readers need no torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_backbone": "carsearch.models.builder",
    "EmbeddingNet": "carsearch.models.network",
    "CROP_MODES": "carsearch.models.preprocess",
    "Preprocessing": "carsearch.models.preprocess",
    "BackboneSpec": "carsearch.models.registry",
    "Loaded": "carsearch.models.registry",
    "backbone_names": "carsearch.models.registry",
    "get_backbone": "carsearch.models.registry",
    "list_backbones": "carsearch.models.registry",
    "preprocessing_for": "carsearch.models.registry",
    "WeightsInfo": "carsearch.models.weights",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'carsearch.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
