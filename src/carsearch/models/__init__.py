"""Models: the backbone registry (declared configs), weights sources, the embedding network, checkpoints.

`load_backbone(name, weights)` is the one way to get a network: `embed`, `train`, `search` and `serve`
ask it and never build networks themselves. Exports load on first use (descriptor readers need no torch).
"""

from __future__ import annotations

from carsearch.lazy import lazy_exports

_EXPORTS = {
    "load_backbone": "carsearch.models.builder",
    "EmbeddingNet": "carsearch.models.network",
    "CROP_MODES": "carsearch.models.preprocess",
    "Preprocessing": "carsearch.models.preprocess",
    "FILE_KINDS": "carsearch.models.registry",
    "BackboneSpec": "carsearch.models.registry",
    "Loaded": "carsearch.models.registry",
    "backbone_names": "carsearch.models.registry",
    "declare_backbone": "carsearch.models.registry",
    "get_backbone": "carsearch.models.registry",
    "list_backbones": "carsearch.models.registry",
    "preprocessing_for": "carsearch.models.registry",
    "WeightsInfo": "carsearch.models.weights",
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
