"""Inference runtimes: the network built in PyTorch runs as it is (`torch`), converted to OpenVINO, or
exported to ONNX and run by ONNX Runtime.

A conversion is an artifact like the others: made once from the torch module (uint8 NHWC pixels in,
normalisation folded into the graph), cached on disk under `cache_root()/<runtime>/<key>/` keyed by the
weights' sha256, the network input's preprocessing (size, mean, std) and the runtime's, exporter's and
torch versions, written durably (temporary folder, fsync, rename) and checked by sha256 each time it is
read. One code path serves both runtimes; a `Converter` holds what differs (the files, how they are
written, how they are run). `auto` is decided in `auto_runtime` alone; CARSEARCH_RUNTIME decides what
`auto` means for every command.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from carsearch import defaults
from carsearch.embed.compiled import CompiledNetwork, OnnxRuntimeNetwork, OpenVINONetwork
from carsearch.errors import CarsearchError
from carsearch.fsutil import fsync_dir, sha256_file
from carsearch.models import Preprocessing

log = logging.getLogger(__name__)

RUNTIMES = defaults.RUNTIMES
ENV_RUNTIME = "CARSEARCH_RUNTIME"  # what `auto` means, for every command and the Python API
ENV_CACHE = "CARSEARCH_CACHE"  # where conversions are kept (default ~/.cache/carsearch)
CONVERSION_FORMAT = 1  # bumped when what a conversion holds changes
ONNX_OPSET = 17
_INFO = "conversion.json"
_NAMES = {"openvino": "OpenVINO", "onnxruntime": "ONNX Runtime", "onnx": "onnx"}  # distributions, as said


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def openvino_version() -> str | None:
    """The installed OpenVINO's version, None when it is not installed."""
    return _version("openvino")


def onnxruntime_version() -> str | None:
    """The installed ONNX Runtime's version, None when it is not installed."""
    return _version("onnxruntime")


def runtime_version(runtime: str) -> str:
    if runtime == "torch":
        return str(torch.__version__)  # a str, not a TorchVersion
    return _version(runtime) or ""  # also an ONNX backbone's own runtime (models/file_nets.py)


def auto_runtime(device: torch.device) -> str:
    """What `auto` runs (when CARSEARCH_RUNTIME does not say), decided here alone: OpenVINO on the CPU when
    installed, PyTorch elsewhere. Measured (docs/benchmarks.md, inference runtimes; issue 21): OpenVINO
    bf16 embeds 1.7-1.8x as fast as eager PyTorch bf16; ONNX Runtime runs fp32 only on the CPU, faster than
    PyTorch for efficientnet_lite0 (1.1x) but slower for resnet50 (0.7x), so `auto` never picks it."""
    return "openvino" if device.type == "cpu" and openvino_version() else "torch"


def resolve_runtime(runtime: str, device: torch.device) -> str:
    """`auto`: CARSEARCH_RUNTIME when set, else `auto_runtime`. An explicit choice the machine cannot run
    is refused in one sentence."""
    if runtime not in RUNTIMES:
        raise CarsearchError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}.")
    if runtime == "auto":
        runtime = os.environ.get(ENV_RUNTIME) or "auto"
        if runtime not in RUNTIMES:
            raise CarsearchError(
                f"{ENV_RUNTIME}={runtime!r} is not a runtime; set it to one of {', '.join(RUNTIMES)}."
            )
    if runtime == "auto":
        return auto_runtime(device)
    if runtime in CONVERTERS:
        if device.type != "cpu":
            raise CarsearchError(
                f"--runtime {runtime} runs on the CPU, not {device.type}; use --device cpu, or --runtime "
                "torch on the GPU."
            )
        missing = [_NAMES[d] for d in CONVERTERS[runtime].packages if not _version(d)]
        if missing:
            raise CarsearchError(
                f"--runtime {runtime} needs {' and '.join(missing)}, which "
                f"{'is' if len(missing) == 1 else 'are'} not installed: pip install 'carsearch[{runtime}]' "
                "(or use --runtime torch)."
            )
    return runtime


def cache_root() -> Path:
    """CARSEARCH_CACHE, else $XDG_CACHE_HOME/carsearch, else ~/.cache/carsearch."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "carsearch"


class FromPixels(nn.Module):
    """The network as converted: uint8 NHWC pixels -> float32 features (normalisation in the graph, as
    `Preprocessing.normalize` does it, so the runtime fuses it into the first convolution)."""

    def __init__(self, model: nn.Module, prep: Preprocessing) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor([m * 255 for m in prep.mean]).view(1, 3, 1, 1))
        self.register_buffer("inv_std", torch.tensor([1 / (v * 255) for v in prep.std]).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float()
        return self.model((x - self.mean) * self.inv_std).float()


# --- the two conversions: what differs ----------------------------------------------------------------


def _write_openvino(net: nn.Module, example: torch.Tensor, xml: Path) -> None:
    import openvino as ov

    s = example.shape[1]
    # Traced here without the tracer's own re-run check (2/3 of the conversion's time): the runtime's
    # agreement with PyTorch is what tests/test_runtimes.py checks.
    traced = torch.jit.trace(net, example, check_trace=False)
    converted = ov.convert_model(
        traced, example_input=example, input=[(ov.PartialShape([-1, s, s, 3]), ov.Type.u8)]
    )
    ov.save_model(converted, str(xml), compress_to_fp16=False)  # fp32 weights: fp32 runs match torch's


def _write_onnx(net: nn.Module, example: torch.Tensor, path: Path) -> None:
    # The TorchScript-based exporter (torch.export's needs onnxscript, and fails on more networks); the
    # batch is dynamic, the image size fixed.
    torch.onnx.export(
        net,
        (example,),
        str(path),
        dynamo=False,
        opset_version=ONNX_OPSET,
        input_names=["pixels"],
        output_names=["features"],
        dynamic_axes={"pixels": {0: "n"}, "features": {0: "n"}},
    )


@dataclass(frozen=True)
class Converter:
    """One runtime's conversion: the distributions it needs (the first is the runtime, whose version the
    provenance records), the files a conversion holds (the first is written by `write`), and the class
    that runs them."""

    runtime: str
    label: str
    packages: tuple[str, ...]
    files: tuple[str, ...]
    write: Callable[[nn.Module, torch.Tensor, Path], None]
    network: Callable[[Path, str], CompiledNetwork]


def conversion_key(
    model: nn.Module,
    backbone: str,
    weights_sha256: str | None,
    dim: int,
    prep: Preprocessing,
    runtime: str = "openvino",
) -> dict:
    """What a conversion depends on. Weights without a file (random init) are named by their values."""
    if weights_sha256 is None:
        h = hashlib.sha256()
        for name, t in model.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        weights_sha256 = "state:" + h.hexdigest()
    packages = CONVERTERS[runtime].packages
    return {
        "format": CONVERSION_FORMAT,
        "runtime": runtime,
        "runtime_version": _version(packages[0]),
        **{f"{d}_version": _version(d) for d in packages[1:]},  # the exporter's (onnx)
        "torch": str(torch.__version__),
        "backbone": backbone,
        "weights_sha256": weights_sha256,
        "architecture": hashlib.sha256(repr(model).encode()).hexdigest(),
        "dim": dim,
        "input": {"size": prep.size, "mean": list(prep.mean), "std": list(prep.std)},
    }


def cache_folder(key: dict) -> Path:
    """Where the conversion for `key` is kept."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_root() / key["runtime"] / digest


def cached_conversion(model: nn.Module, key: dict, prep: Preprocessing) -> Path:
    """The folder holding `model` converted for `key`: reused when there, converted (and kept) when not,
    refused when damaged."""
    conv = CONVERTERS[key["runtime"]]
    folder = cache_folder(key)
    if folder.exists():
        _check(conv, folder, key)
        log.debug("%s conversion reused from %s", conv.label, folder)
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(folder)
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        log.info("converting the %s network for %s (once; kept in %s)", key["backbone"], conv.label, folder)
        _convert(conv, model, prep, tmp / conv.files[0])
        info = {**key, "files": {name: sha256_file(tmp / name) for name in conv.files}}
        (tmp / _INFO).write_text(json.dumps(info, indent=2) + "\n")
        for name in (*conv.files, _INFO):
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.exists():
                raise
            # Another process converted the same network meanwhile: its folder is as good as ours.
        fsync_dir(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _check(conv, folder, key)
    return folder


def _convert(conv: Converter, model: nn.Module, prep: Preprocessing, path: Path) -> None:
    s = prep.size
    net = FromPixels(model, prep).eval()
    example = torch.zeros((1, s, s, 3), dtype=torch.uint8)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's deprecation and constant-folding notes
            conv.write(net, example, path)
    except OSError:
        raise  # the disk's errors are no converter's
    except Exception as e:  # the converter's own errors: an operation it does not know, a trace failure
        raise ConversionFailed(f"{conv.label} cannot convert this network ({type(e).__name__}: {e})") from e


class ConversionFailed(CarsearchError):
    """The converter refused the network (`auto` then stays with PyTorch)."""


def _check(conv: Converter, folder: Path, key: dict) -> None:
    remedy = "delete that folder and run again to convert the network anew."
    what = f"the {conv.label} conversion cached in {folder}"
    try:
        info = json.loads((folder / _INFO).read_text())
        files = info["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CarsearchError(f"{what} is damaged (no readable {_INFO}); {remedy}") from None
    for name in conv.files:
        path = folder / name
        if not path.is_file() or sha256_file(path) != files.get(name):
            raise CarsearchError(
                f"{what} is damaged ({name} is missing or does not match its sha256); {remedy}"
            )
    if {k: v for k, v in info.items() if k != "files"} != key:
        raise CarsearchError(f"{what} is for another network; {remedy}")


def _remove_stale(folder: Path) -> None:
    """Temporary folders of conversions whose process died (`.tmp-<name>-<pid>-<random>`)."""
    for p in folder.parent.glob(f".tmp-{folder.name}-*"):
        try:
            pid = int(p.name.split("-")[2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


CONVERTERS = {
    "openvino": Converter(
        "openvino", "OpenVINO", ("openvino",), ("model.xml", "model.bin"), _write_openvino, OpenVINONetwork
    ),
    "onnxruntime": Converter(
        "onnxruntime",
        "ONNX Runtime",
        ("onnxruntime", "onnx"),  # onnx: torch's exporter writes the file with it
        ("model.onnx",),
        _write_onnx,
        OnnxRuntimeNetwork,
    ),
}


def load_converted(
    runtime: str,
    model: nn.Module,
    backbone: str,
    weights_sha256: str | None,
    dim: int,
    prep: Preprocessing,
    precision: str,
) -> CompiledNetwork:
    """`model` converted for `runtime` (or found converted) and loaded; its `precision` says what it runs
    at (ONNX Runtime: fp32 whatever was asked)."""
    key = conversion_key(model, backbone, weights_sha256, dim, prep, runtime)
    return CONVERTERS[runtime].network(cached_conversion(model, key, prep), precision)
