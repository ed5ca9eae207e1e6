"""Backbones from files, one more kind of registry entry: `onnx:PATH` (run by ONNX Runtime),
`torchscript:PATH` (`torch.jit.save`) and `timm:NAME` with `--weights FILE` (any timm architecture with a
local state dict).

Each declares its preprocessing (size, resize or crop_pct, crop, mean, std, interpolation) and where the
embedding is taken (`output`: a named output; `layer`: a named layer's output, or its input with
`cut_head = true`; `cut_head = true` alone: the input of the final classifier) in a TOML file beside the
model (`model.onnx` -> `model.toml`; for timm, beside the weights file), or in the backbone's name as
`?key=value&...` (what `--declare KEY=VALUE` adds), which wins over the file key by key. An entry's name is
its full identity: the absolute path, the keys declared in the name and the embedding point, so that an
artifact's provenance names what made it; the model file's sha256 is its weights' sha256.
"""

from __future__ import annotations

import functools
import tomllib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carsearch.errors import CarsearchError
from carsearch.fsutil import sha256_file
from carsearch.models.file_graphs import onnx_net, probe_dim, torchscript_net
from carsearch.models.preprocess import CROP_MODES, Preprocessing
from carsearch.models.spec import BackboneSpec, Loaded, ResolvedWeights, WeightSource
from carsearch.models.weights import WeightsInfo

KINDS = ("onnx", "torchscript", "timm")
PREP_KEYS = ("size", "resize", "crop_pct", "crop", "mean", "std", "interpolation")
POINT_KEYS = ("output", "layer", "cut_head")
KEYS = PREP_KEYS + POINT_KEYS
_REQUIRED = ("size", "mean", "std", "interpolation")
_INTERPOLATIONS = ("bilinear", "bicubic")
_EXAMPLE = 'size = 224, mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225], interpolation = "bilinear"'
# What `carsearch backbones` shows of the file kinds.
FILE_KINDS = (
    ("onnx:PATH", "an ONNX file (a Keras or PyTorch export), run by ONNX Runtime: the onnx extra"),
    ("torchscript:PATH", "a TorchScript file (torch.jit.save of a traced or scripted network)"),
    ("timm:NAME", "any timm architecture with --weights FILE, a local state dict (its classifier is cut)"),
)
# Operations an ONNX classifier's output passes through after its last linear layer.


def is_file_backbone(name: str) -> bool:
    return name.partition(":")[0] in KINDS and ":" in name


# --- declarations ------------------------------------------------------------------------------------


def _coerce(key: str, value: Any, where: str) -> Any:
    """A declared value as its type (from TOML, or from text in a name / --declare), or one sentence."""
    text = isinstance(value, str)
    try:
        if key in ("size", "resize"):
            v = int(value) if text else value
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        elif key == "crop_pct":
            v = float(value) if text else value
            if isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1:
                return float(v)
        elif key in ("mean", "std"):
            v = [float(p) for p in value.split(",")] if text else value
            if (
                isinstance(v, list | tuple)
                and len(v) == 3
                and all(isinstance(p, int | float) and not isinstance(p, bool) for p in v)
                and (key == "mean" or min(v) > 0)
            ):
                return tuple(float(p) for p in v)
        elif (
            (key == "crop" and value in CROP_MODES)
            or (key == "interpolation" and value in _INTERPOLATIONS)
            or (key in ("output", "layer") and text and value)
        ):
            return value
        elif key == "cut_head":
            v = {"true": True, "false": False}.get(value.lower()) if text else value
            if isinstance(v, bool):
                return v
    except (ValueError, AttributeError):
        pass
    expected = {
        "size": "a whole number of pixels",
        "resize": "a whole number of pixels",
        "crop_pct": "a fraction in (0, 1]",
        "mean": "three numbers",
        "std": "three positive numbers",
        "crop": " or ".join(CROP_MODES),
        "interpolation": " or ".join(_INTERPOLATIONS),
        "output": "a name",
        "layer": "a name",
        "cut_head": "true or false",
    }[key]
    raise CarsearchError(f"{where}: {key} = {value!r} is not {expected}.")


def _unknown_key(key: str, where: str) -> CarsearchError:
    return CarsearchError(f"{where}: unknown key {key!r}; the keys are {', '.join(KEYS)}.")


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(repr(v) for v in value)
    return str(value)


def parse_declare(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """`--declare KEY=VALUE` options as a declaration."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        key = key.strip()
        if not eq:
            raise CarsearchError(f"--declare {pair!r} is not KEY=VALUE (for example --declare size=224).")
        if key not in KEYS:
            raise _unknown_key(key, f"--declare {pair}")
        out[key] = _coerce(key, value.strip(), f"--declare {pair}")
    return out


def split_name(name: str) -> tuple[str, str, dict[str, Any]]:
    """'onnx:PATH?key=value&...' -> (kind, PATH, declared keys)."""
    kind, _, rest = name.partition(":")
    ref, _, query = rest.partition("?")
    if kind not in KINDS or not ref:
        raise CarsearchError(
            f"{name!r} is not a file backbone; write onnx:PATH, torchscript:PATH or timm:NAME."
        )
    declared: dict[str, Any] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq or key not in KEYS:
            raise _unknown_key(key, f"backbone {name}")
        declared[key] = _coerce(key, value, f"backbone {name}")
    return kind, ref, declared


def _name(kind: str, ref: str, declared: dict[str, Any]) -> str:
    query = "&".join(f"{k}={_as_text(declared[k])}" for k in KEYS if k in declared)
    return f"{kind}:{ref}" + (f"?{query}" if query else "")


def _read_toml(path: Path) -> dict[str, Any]:
    """The declaration in `path` (empty when there is none)."""
    if not path.is_file():
        return {}
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise CarsearchError(f"cannot read the declaration {path} ({e}); fix it or delete it.") from None
    for key in raw:
        if key not in KEYS:
            raise _unknown_key(key, str(path))
    return {k: _coerce(k, v, str(path)) for k, v in raw.items()}


def _merge(in_file: dict[str, Any], in_name: dict[str, Any]) -> dict[str, Any]:
    """Preprocessing key by key (the name wins); the embedding point as a whole, from the name when it
    says anything about it, else from the file."""
    out = {k: v for k, v in in_file.items() if k in PREP_KEYS}
    out.update({k: v for k, v in in_name.items() if k in PREP_KEYS})
    point = {k: v for k, v in in_name.items() if k in POINT_KEYS}
    out.update(point or {k: v for k, v in in_file.items() if k in POINT_KEYS})
    if "output" in out and ("layer" in out or out.get("cut_head")):
        raise CarsearchError("declare the embedding as output = NAME, or as layer (and cut_head), not both.")
    return out


def _preprocessing(declared: dict[str, Any], name: str, toml: Path) -> Preprocessing:
    missing = [k for k in _REQUIRED if k not in declared]
    if missing:
        raise CarsearchError(
            f"{name} declares no {', '.join(missing)}: add {'it' if len(missing) == 1 else 'them'} to "
            f"{toml} (for example {_EXAMPLE}; optional: resize or crop_pct, crop, and output, layer or "
            "cut_head = true), or give them with --declare KEY=VALUE."
        )
    if "resize" in declared and "crop_pct" in declared:
        raise CarsearchError(f"{name}: declare resize or crop_pct, not both.")
    kw = {
        "crop": declared.get("crop", "center"),
        "mean": declared["mean"],
        "std": declared["std"],
        "interpolation": declared["interpolation"],
    }
    if "resize" in declared:
        return Preprocessing(size=declared["size"], resize=declared["resize"], **kw)
    return Preprocessing.from_crop_pct(declared["size"], declared.get("crop_pct", 0.875), **kw)


# --- entries -----------------------------------------------------------------------------------------


def file_spec(name: str) -> BackboneSpec:
    """The registry entry a file backbone's name stands for (its declaration read, nothing built)."""
    kind, ref, in_name = split_name(name)
    if kind == "timm":
        return _timm_spec(ref, in_name)
    path = Path(ref).expanduser().resolve()
    if not path.is_file():
        raise CarsearchError(f"the {kind} backbone file {path} does not exist.")
    toml = path.with_suffix(".toml")
    declared = _merge(_read_toml(toml), in_name)
    canonical = _name(kind, str(path), {k: v for k, v in declared.items() if k in POINT_KEYS or k in in_name})
    prep = _preprocessing(declared, canonical, toml)
    make = onnx_net if kind == "onnx" else torchscript_net

    def load(source: ResolvedWeights, expected_sha256: str | None) -> Loaded:
        if source.kind != "named":
            raise CarsearchError(f"{canonical} carries its own weights: leave out --weights.")
        digest = sha256_file(path)
        if expected_sha256 and digest != expected_sha256:
            raise CarsearchError(
                f"the model file {path} changed since these embeddings were made (sha256 {digest[:12]}..., "
                f"expected {expected_sha256[:12]}...); put the original back, or embed again with this one."
            )
        model = make(path, declared)
        return Loaded(model, WeightsInfo("file", digest, str(path)), prep, probe_dim(model, prep, canonical))

    def build() -> nn.Module:
        if kind == "onnx":
            raise CarsearchError(
                f"{canonical} runs in ONNX Runtime and cannot be trained or rebuilt here; use a "
                "torchscript: or timm: backbone for that."
            )
        return make(path, declared)

    what = "ONNX file, run by ONNX Runtime" if kind == "onnx" else "TorchScript file"
    return BackboneSpec(
        name=canonical,
        dim=0,  # known once loaded (a forward pass of one blank image)
        description=f"{what}; embedding: {_point_text(declared)}",
        sources=(WeightSource("file", prep, None),),
        file_preprocessing=None,
        build=build,
        fit_state=lambda _model, state, _what: state,
        make_headless=lambda _model: None,
        params_millions=0.0,
        published="",
        declared=lambda _source: prep,
        load=load,
    )


def _point_text(declared: dict[str, Any]) -> str:
    if "output" in declared:
        return f"output {declared['output']!r}"
    if "layer" in declared:
        return f"{'input' if declared.get('cut_head') else 'output'} of layer {declared['layer']!r}"
    return "input of the final classifier" if declared.get("cut_head") else "the network's output"


def _timm_spec(arch: str, in_name: dict[str, Any]) -> BackboneSpec:
    import timm

    if not timm.is_model(arch):
        raise CarsearchError(
            f"timm has no architecture {arch!r}; python -c \"import timm; print(timm.list_models('*'))\" "
            "lists them."
        )
    name = _name("timm", arch, {k: v for k, v in in_name.items() if k in PREP_KEYS})
    _timm_point(in_name, name)

    need_file = f"{name} takes its weights from a file: add --weights FILE (a state dict of timm's {arch})."

    def declared(source: ResolvedWeights) -> Preprocessing:
        if source.kind != "file":
            raise CarsearchError(need_file)
        toml = Path(source.value).with_suffix(".toml")
        decl = _merge(_read_toml(toml), in_name)
        _timm_point(decl, name)
        return _preprocessing(decl, f"{name} with {source.value}", toml)

    def fetch(_expected: str | None) -> tuple[dict, WeightsInfo]:
        raise CarsearchError(need_file)

    def build() -> nn.Module:
        return timm.create_model(arch, pretrained=False, num_classes=0)  # the classifier cut: pooled features

    return BackboneSpec(
        name=name,
        dim=_timm_dim(arch),
        description=f"timm {arch}, classifier cut",
        sources=(WeightSource("file", None, fetch),),
        file_preprocessing=None,
        build=build,
        fit_state=_timm_state,
        make_headless=lambda _model: None,
        params_millions=0.0,
        published="",
        declared=declared,
    )


def _timm_point(declared: dict[str, Any], name: str) -> None:
    if "output" in declared or "layer" in declared or declared.get("cut_head") is False:
        raise CarsearchError(
            f"{name}: a timm backbone's embedding is the input of its classifier (timm's pooled features); "
            "leave out output, layer and cut_head = false."
        )


@functools.cache
def _timm_dim(arch: str) -> int:
    import timm

    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def _timm_state(model: nn.Module, state: dict, _what: str) -> dict:
    """A full network's state dict (a fine-tune saved with its classifier, maybe by DDP) as the headless
    network names it: the classifier's tensors dropped."""
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    heads = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    keep = model.state_dict().keys()
    return {k: v for k, v in state.items() if k in keep or not any(k.startswith(f"{h}.") for h in heads)}


def declared_name(name: str, declare: dict[str, Any]) -> str:
    """`name` with `--declare` keys added: they win over the name's own, and an embedding point declared
    there replaces the name's."""
    kind, ref, in_name = split_name(name)
    if any(k in declare for k in POINT_KEYS):
        in_name = {k: v for k, v in in_name.items() if k not in POINT_KEYS}
    return _name(kind, ref, {**in_name, **declare})
