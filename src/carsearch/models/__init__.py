"""Models: the backbone registry (declared configs), weights sources, the embedding network, checkpoints.

`load_backbone(name, weights)` is the one way to get a network: `embed`, `train`, `search` and `serve`
ask it and never build networks themselves.
"""

from carsearch.models.builder import load_backbone
from carsearch.models.network import EmbeddingNet
from carsearch.models.preprocess import CROP_MODES, Preprocessing
from carsearch.models.registry import (
    BackboneSpec,
    Loaded,
    backbone_names,
    get_backbone,
    list_backbones,
    preprocessing_for,
)
from carsearch.models.weights import WeightsInfo

__all__ = [
    "CROP_MODES",
    "BackboneSpec",
    "EmbeddingNet",
    "Loaded",
    "Preprocessing",
    "WeightsInfo",
    "backbone_names",
    "get_backbone",
    "list_backbones",
    "load_backbone",
    "preprocessing_for",
]
