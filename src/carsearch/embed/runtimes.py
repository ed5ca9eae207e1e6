"""Inference runtimes: the network built in PyTorch runs as it is (`torch`) or converted to OpenVINO.

A conversion is an artifact like the others: converted once from the torch module (uint8 NHWC pixels
in, normalisation folded into the graph), cached on disk under `cache_root()/openvino/<key>/` keyed by
the weights' sha256, the network input's preprocessing (size, mean, std) and the runtime and torch
versions, written durably (temporary folder, fsync, rename) and checked by sha256 each time it is read.
`auto` picks OpenVINO on the CPU when it is installed (faster than eager PyTorch there: docs/benchmarks.md),
PyTorch elsewhere; CARSEARCH_RUNTIME decides what `auto` means for every command.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn

from carsearch.errors import CarsearchError
from carsearch.fsutil import fsync_dir, sha256_file
from carsearch.models import Preprocessing

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "openvino")
ENV_RUNTIME = "CARSEARCH_RUNTIME"  # what `auto` means, for every command and the Python API
ENV_CACHE = "CARSEARCH_CACHE"  # where conversions are kept (default ~/.cache/carsearch)
CONVERSION_FORMAT = 1  # bumped when what a conversion holds changes
_INFO = "conversion.json"
_FILES = ("model.xml", "model.bin")
_INSTALL = "pip install 'carsearch[openvino]'"


def openvino_version() -> str | None:
    """The installed OpenVINO's version, None when it is not installed."""
    try:
        return metadata.version("openvino")
    except metadata.PackageNotFoundError:
        return None


def runtime_version(runtime: str) -> str:
    if runtime == "onnxruntime":  # the runtime an ONNX backbone brings (models/file_nets.py)
        return metadata.version("onnxruntime")
    return (openvino_version() or "") if runtime == "openvino" else str(torch.__version__)  # not TorchVersion


def resolve_runtime(runtime: str, device: torch.device) -> str:
    """`auto`: CARSEARCH_RUNTIME when set, else OpenVINO on the CPU when installed, else PyTorch.
    An explicit choice the machine cannot run is refused in one sentence."""
    if runtime not in RUNTIMES:
        raise CarsearchError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}.")
    if runtime == "auto":
        runtime = os.environ.get(ENV_RUNTIME) or "auto"
        if runtime not in RUNTIMES:
            raise CarsearchError(
                f"{ENV_RUNTIME}={runtime!r} is not a runtime; set it to one of {', '.join(RUNTIMES)}."
            )
    if runtime == "auto":
        return "openvino" if device.type == "cpu" and openvino_version() else "torch"
    if runtime == "openvino":
        if device.type != "cpu":
            raise CarsearchError(
                f"--runtime openvino runs on the CPU, not {device.type}; use --device cpu, or --runtime "
                "torch on the GPU."
            )
        if not openvino_version():
            raise CarsearchError(
                f"--runtime openvino needs OpenVINO, which is not installed: {_INSTALL} (or use --runtime "
                "torch)."
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


def conversion_key(
    model: nn.Module, backbone: str, weights_sha256: str | None, dim: int, prep: Preprocessing
) -> dict:
    """What a conversion depends on. Weights without a file (random init) are named by their values."""
    if weights_sha256 is None:
        h = hashlib.sha256()
        for name, t in model.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        weights_sha256 = "state:" + h.hexdigest()
    return {
        "format": CONVERSION_FORMAT,
        "runtime": "openvino",
        "runtime_version": openvino_version(),
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
    return cache_root() / "openvino" / digest


def cached_conversion(model: nn.Module, key: dict, prep: Preprocessing) -> Path:
    """The folder holding `model` converted for `key`: reused when there, converted (and kept) when not,
    refused when damaged."""
    folder = cache_folder(key)
    if folder.exists():
        _check(folder, key)
        log.debug("OpenVINO conversion reused from %s", folder)
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(folder)
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        log.info("converting the %s network to OpenVINO (once; kept in %s)", key["backbone"], folder)
        _convert(model, prep, tmp / _FILES[0])
        info = {**key, "files": {name: sha256_file(tmp / name) for name in _FILES}}
        (tmp / _INFO).write_text(json.dumps(info, indent=2) + "\n")
        for name in (*_FILES, _INFO):
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
    _check(folder, key)
    return folder


def _convert(model: nn.Module, prep: Preprocessing, xml: Path) -> None:
    import openvino as ov

    s = prep.size
    net = FromPixels(model, prep).eval()
    example = torch.zeros((1, s, s, 3), dtype=torch.uint8)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's deprecation and constant-folding notes
            # Traced here without the tracer's own re-run check (2/3 of the conversion's time): the
            # runtime's agreement with PyTorch is what tests/test_runtimes.py checks.
            traced = torch.jit.trace(net, example, check_trace=False)
            converted = ov.convert_model(
                traced, example_input=example, input=[(ov.PartialShape([-1, s, s, 3]), ov.Type.u8)]
            )
    except Exception as e:  # the converter's own errors: an operation it does not know, a trace failure
        raise ConversionFailed(f"OpenVINO cannot convert this network ({type(e).__name__}: {e})") from e
    ov.save_model(converted, str(xml), compress_to_fp16=False)  # fp32 weights: fp32 runs match torch's


class ConversionFailed(CarsearchError):
    """The converter refused the network (`auto` then stays with PyTorch)."""


def _check(folder: Path, key: dict) -> None:
    remedy = "delete that folder and run again to convert the network anew."
    try:
        info = json.loads((folder / _INFO).read_text())
        files = info["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CarsearchError(
            f"the OpenVINO conversion cached in {folder} is damaged (no readable {_INFO}); {remedy}"
        ) from None
    for name in _FILES:
        path = folder / name
        if not path.is_file() or sha256_file(path) != files.get(name):
            raise CarsearchError(
                f"the OpenVINO conversion cached in {folder} is damaged ({name} is missing or does not "
                f"match its sha256); {remedy}"
            )
    if {k: v for k, v in info.items() if k != "files"} != key:
        raise CarsearchError(f"the OpenVINO conversion cached in {folder} is for another network; {remedy}")


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


@functools.cache
def _core():  # one OpenVINO Core per process
    import openvino as ov

    return ov.Core()


class OpenVINONetwork:
    """A cached conversion compiled for the CPU at `precision` (bf16 only where the CPU runs it)."""

    def __init__(self, folder: Path, precision: str) -> None:
        core = _core()
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise CarsearchError(
                "OpenVINO runs bf16 only on CPUs with AVX-512 BF16 or AMX, which this one lacks; use "
                "--precision fp32, or --runtime torch."
            )
        hint = {"bf16": "bf16", "fp32": "f32"}[precision]
        config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = core.compile_model(core.read_model(str(folder / _FILES[0])), "CPU", config)
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request: one batch at a time

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 NHWC -> float32 (n, dim), not normalised."""
        with self._lock:
            out = self._request.infer([np.ascontiguousarray(pixels)])
            return np.array(out[0], dtype=np.float32)  # a copy: the request reuses its output buffer

    def embed(self, pixels: np.ndarray, flip: bool) -> np.ndarray:
        """L2-normalised embeddings; with `flip`, the image's and its mirror image's summed, as
        `Encoder.encode` does with PyTorch."""
        y = _unit(self.features(pixels))
        if flip:
            y = y + _unit(self.features(pixels[:, :, ::-1]))
        return _unit(y)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # as torch's F.normalize


def load_openvino(
    model: nn.Module,
    backbone: str,
    weights_sha256: str | None,
    dim: int,
    prep: Preprocessing,
    precision: str,
) -> OpenVINONetwork:
    """`model` converted (or found converted) and compiled."""
    key = conversion_key(model, backbone, weights_sha256, dim, prep)
    return OpenVINONetwork(cached_conversion(model, key, prep), precision)
