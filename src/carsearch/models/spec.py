"""What a backbone entry declares (dimension, preprocessing per weights source, how to build it and
fetch its weights), and the one place that decides what a --weights string means: `resolve_weights`.
Nothing here builds a network or downloads anything."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from carsearch.errors import CarsearchError
from carsearch.models.preprocess import Preprocessing
from carsearch.models.weights import WeightsInfo

# How a named source is fetched: (expected sha256 or None) -> (state dict for the full network, info).
Fetch = Callable[[str | None], tuple[dict[str, torch.Tensor], WeightsInfo]]


@dataclass(frozen=True)
class WeightSource:
    """A named weights choice of a backbone, with the preprocessing its network expects."""

    name: str
    preprocessing: Preprocessing | None  # None: declared beside the weights file (BackboneSpec.declared)
    fetch: Fetch | None  # None: random init (`none`)


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone as declared: nothing is built or downloaded to know its size or preprocessing."""

    name: str
    dim: int
    description: str
    sources: tuple[WeightSource, ...]
    file_preprocessing: Preprocessing | None  # for `--weights FILE.pth` (None: `declared` says)
    build: Callable[[], nn.Module]  # the full network (classifier included), random weights
    fit_state: Callable[[nn.Module, dict, str], dict]  # a full network's state dict as this network names it
    make_headless: Callable[[nn.Module], None]  # drop the classifier in place
    params_millions: float  # of the headless network
    published: str  # what a user can expect, as published (not measured here)
    # Backbones from files (models/file_nets.py): the preprocessing declared for a weights choice, and a
    # network that loads itself (an ONNX or TorchScript file carries its weights).
    declared: Callable[[ResolvedWeights], Preprocessing] | None = None
    load: Callable[[ResolvedWeights, str | None], Loaded] | None = None

    @property
    def weight_choices(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sources)

    def source(self, name: str) -> WeightSource:
        return next(s for s in self.sources if s.name == name)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "dim": self.dim,
            "weights": list(self.weight_choices),
            "params_millions": self.params_millions,
            "input": self.sources[0].preprocessing.size,
            "description": self.description,
            "published": self.published,
        }


@dataclass(frozen=True)
class Loaded:
    """A headless network with its weights' identity, its preprocessing and its embedding size."""

    model: nn.Module
    weights: WeightsInfo
    preprocessing: Preprocessing
    dim: int


@dataclass(frozen=True)
class ResolvedWeights:
    """What a --weights string means for a backbone: kind is "named", "file" or "checkpoint"."""

    kind: str
    value: str  # the named choice, or the absolute path


def resolve_weights(spec: BackboneSpec, weights: str | None) -> ResolvedWeights:
    """The one place that decides where weights come from: a named choice (None: the backbone's first,
    its pretrained weights), a file, or a checkpoint folder."""
    if weights is None:
        return ResolvedWeights("named", spec.sources[0].name)
    if weights in spec.weight_choices:
        return ResolvedWeights("named", weights)
    path = Path(weights).expanduser()
    if path.is_dir():
        return ResolvedWeights("checkpoint", str(path.resolve()))
    if os.sep in weights or weights.endswith((".pth", ".pt", ".bin")) or path.exists():
        return ResolvedWeights("file", str(path.resolve()))
    raise CarsearchError(
        f"unknown weights {weights!r} for {spec.name}; choose one of {', '.join(spec.weight_choices)}, "
        "or give the path of a .pth file or of a `carsearch train` checkpoint folder."
    )


def preprocessing_for(spec: BackboneSpec, weights: str | None) -> Preprocessing | None:
    """The preprocessing a weights choice implies, known without building (None for a checkpoint: its
    checkpoint.json says)."""
    r = resolve_weights(spec, weights)
    if spec.declared is not None and r.kind != "checkpoint":
        return spec.declared(r)
    if r.kind == "named":
        return spec.source(r.value).preprocessing
    return spec.file_preprocessing if r.kind == "file" else None
