"""Converted networks run by their runtime (embed/runtimes.py converts and caches them): OpenVINO's CPU
plugin, ONNX Runtime's CPU execution provider. uint8 NHWC pixels in, features or embeddings out."""

from __future__ import annotations

import abc
import functools
import logging
import threading
from pathlib import Path

import numpy as np

from carsearch.errors import CarsearchError

log = logging.getLogger(__name__)


class CompiledNetwork(abc.ABC):
    """A cached conversion loaded by its runtime: `features` (uint8 NHWC -> float32 (n, d), not
    normalised), `precision` what it runs at, `label` the runtime as said to the user."""

    label = ""
    precision = "fp32"

    @abc.abstractmethod
    def features(self, pixels: np.ndarray) -> np.ndarray: ...

    def embed(self, pixels: np.ndarray, flip: bool) -> np.ndarray:
        """L2-normalised embeddings; with `flip`, the image's and its mirror image's summed, as
        `Encoder.encode` does with PyTorch."""
        y = _unit(self.features(pixels))
        if flip:
            y = y + _unit(self.features(pixels[:, :, ::-1]))
        return _unit(y)


@functools.cache
def _core():  # one OpenVINO Core per process
    import openvino as ov

    return ov.Core()


class OpenVINONetwork(CompiledNetwork):
    """A cached conversion compiled for the CPU at `precision` (bf16 only where the CPU runs it)."""

    label = "OpenVINO"

    def __init__(self, folder: Path, precision: str) -> None:
        core = _core()
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise CarsearchError(
                "OpenVINO runs bf16 only on CPUs with AVX-512 BF16 or AMX, which this one lacks; use "
                "--precision fp32, or --runtime torch."
            )
        self.precision = precision
        hint = {"bf16": "bf16", "fp32": "f32"}[precision]
        config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = core.compile_model(core.read_model(str(folder / "model.xml")), "CPU", config)
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request: one batch at a time

    def features(self, pixels: np.ndarray) -> np.ndarray:
        with self._lock:
            out = self._request.infer([np.ascontiguousarray(pixels)])
            return np.array(out[0], dtype=np.float32)  # a copy: the request reuses its output buffer


class OnnxRuntimeNetwork(CompiledNetwork):
    """A cached ONNX export run by ONNX Runtime's CPU execution provider, in fp32: its CPU kernels for
    these networks' convolutions take float only (ONNX's Conv itself has no bfloat16 before opset 22)."""

    label = "ONNX Runtime"

    def __init__(self, folder: Path, precision: str) -> None:
        import onnxruntime as ort

        if precision == "bf16":
            _fp32_note()
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: not the optimiser's notes
        self.session = ort.InferenceSession(
            str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )  # its run() may be called from several threads at once

    def features(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"pixels": np.ascontiguousarray(pixels)})[0]


@functools.cache
def _fp32_note() -> None:  # said once per process
    log.info(
        "ONNX Runtime has no bf16 CPU kernels for these networks' convolutions: it runs them in fp32 "
        "(--runtime openvino runs bf16)."
    )


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # as torch's F.normalize
