"""Backbone registry: name -> declared entry (models/spec.py), in the order `carsearch backbones` lists them.
Entries declare everything before anything is built (timm's `_registry.py` / pretrained configs are the
model); `build_headless` builds one with seeded random weights, `builder.load_backbone` with its weights.
Names `onnx:PATH`, `torchscript:PATH` and `timm:NAME` stand for entries made from files (file_nets.py)."""

from __future__ import annotations

from torch import nn

from carsearch.errors import CarsearchError
from carsearch.models.file_nets import FILE_KINDS, declared_name, file_spec, is_file_backbone, parse_declare
from carsearch.models.spec import (
    BackboneSpec,
    Loaded,
    ResolvedWeights,
    WeightSource,
    preprocessing_for,
    resolve_weights,
)
from carsearch.models.timm_nets import EFFICIENTNET_LITES, VITS
from carsearch.models.torchvision_nets import RESNETS
from carsearch.models.weights import random_init

__all__ = [
    "FILE_KINDS",
    "BackboneSpec",
    "Loaded",
    "ResolvedWeights",
    "WeightSource",
    "backbone_names",
    "build_headless",
    "declare_backbone",
    "get_backbone",
    "list_backbones",
    "preprocessing_for",
    "register",
    "resolve_weights",
]

_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    _REGISTRY[spec.name] = spec
    return spec


for _spec in (*RESNETS, *EFFICIENTNET_LITES, *VITS):
    register(_spec)


def backbone_names() -> list[str]:
    return sorted(_REGISTRY)


def list_backbones() -> list[BackboneSpec]:
    """Every registered backbone, in registration order."""
    return list(_REGISTRY.values())


def get_backbone(name: str) -> BackboneSpec:
    """The registered backbone called `name`, or the entry of a file backbone (its `name` is the full one:
    absolute path, declared keys); an unknown name is refused with the list of known ones."""
    if is_file_backbone(name):
        return file_spec(name)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise CarsearchError(
            f"unknown backbone {name!r}; choose one of {', '.join(backbone_names())}, or a network from a "
            "file: onnx:PATH, torchscript:PATH, timm:NAME."
        ) from None


def declare_backbone(name: str, declare: tuple[str, ...] | list[str] = ()) -> str:
    """The full name of backbone `name` with `--declare KEY=VALUE` keys (file backbones only)."""
    if not is_file_backbone(name):
        if declare:
            raise CarsearchError(
                f"--declare is for backbones from files (onnx:PATH, torchscript:PATH, timm:NAME), not {name}."
            )
        return name
    return get_backbone(declared_name(name, parse_declare(declare))).name


def build_headless(name: str) -> nn.Module:
    """The headless architecture of backbone `name` with seeded random weights."""
    spec = get_backbone(name)
    model = random_init(spec.build)
    spec.make_headless(model)
    return model
