"""Encoder: a backbone on a device, turning uint8 image batches into L2-normalised embeddings.

The embed job and query-time search share it, so a query is always preprocessed and embedded exactly
as the collection was.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from carsearch import defaults
from carsearch.embed import runtimes
from carsearch.errors import CarsearchError, ProvenanceMismatch
from carsearch.models import CROP_MODES, Loaded, Preprocessing, get_backbone, load_backbone

log = logging.getLogger(__name__)

DEVICES = defaults.DEVICES
PRECISIONS = defaults.PRECISIONS


def resolve_device(device: str) -> torch.device:
    if device not in DEVICES and not device.startswith("cuda:"):
        raise CarsearchError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}.")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CarsearchError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu.")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 convolutions then run about twice as fast as fp32 on the CPU."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch without these probes
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 autocast where the hardware runs it natively (CUDA, AVX-512 BF16, AMX), else fp32."""
    if precision not in PRECISIONS:
        raise CarsearchError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


class Encoder:
    """A headless network ready for inference: eval mode, channels-last, inference mode, autocast.

    `Encoder.load(backbone, weights, ...)` builds one from the registry; `Encoder(loaded, ...)` wraps a
    network in hand (training's validation wraps the network it trains, with `freeze=False`). `runtime`
    (embed/runtimes.py) runs it in PyTorch, converted to OpenVINO or exported to ONNX Runtime; `Encoder(...)`
    keeps PyTorch unless told, `Encoder.load` picks (`auto`)."""

    def __init__(
        self,
        loaded: Loaded,
        backbone: str,
        crop: str | None = None,
        device: str | torch.device = defaults.DEVICE,
        precision: str = defaults.PRECISION,
        freeze: bool = True,
        runtime: str = "torch",
    ) -> None:
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.backbone = backbone
        self.weights = loaded.weights
        self.preprocessing: Preprocessing = (
            loaded.preprocessing.with_crop(crop) if crop else loaded.preprocessing
        )
        self.dim = loaded.dim
        self.model = loaded.model.eval().to(self.device, memory_format=torch.channels_last)
        if freeze:
            for p in self.model.parameters():
                p.requires_grad_(False)
        self.runtime = runtimes.resolve_runtime(runtime, self.device)
        own = getattr(self.model, "runtime", None)  # a network that brings its runtime: an ONNX file's
        if own and runtime not in ("auto", "torch", own):
            raise CarsearchError(f"{backbone} runs in {own}, not {runtime}; use --runtime auto.")
        if own:
            self.runtime, self.precision = own, "fp32"  # (ONNX Runtime on the CPU: fp32)
        self._net: runtimes.CompiledNetwork | None = None
        if self.runtime in runtimes.CONVERTERS and not own:  # (an ONNX file is run as it is)
            try:
                self._net = runtimes.load_converted(
                    self.runtime,
                    self.model,
                    backbone,
                    self.weights.sha256,
                    self.dim,
                    self.preprocessing,
                    self.precision,
                )
                self.precision = self._net.precision  # ONNX Runtime: fp32 whatever was asked
            except runtimes.ConversionFailed as e:
                if runtime != "auto":
                    raise CarsearchError(f"{e}; use --runtime torch.") from None
                log.warning("%s; embedding with PyTorch instead.", e)
                self.runtime = "torch"

    @classmethod
    def load(
        cls,
        backbone: str = defaults.BACKBONE,
        weights: str | None = None,
        crop: str = defaults.CROP,
        device: str = defaults.DEVICE,
        precision: str = defaults.PRECISION,
        weights_sha256: str | None = None,
        flip: bool = False,
        runtime: str = defaults.RUNTIME,
    ) -> Encoder:
        """The registry's network `backbone` with `weights`, framed by `crop` (with test-time `flip`), run
        by `runtime`."""
        if crop not in CROP_MODES:
            raise CarsearchError(f"unknown crop mode {crop!r}; choose one of {', '.join(CROP_MODES)}.")
        # Cheap checks first: a typo in --device must not wait for (or trigger) a weights download.
        dev = resolve_device(device)
        resolve_precision(precision, dev)
        runtimes.resolve_runtime(runtime, dev)
        backbone = get_backbone(backbone).name  # a file backbone's full name: absolute path, declared keys
        loaded = load_backbone(backbone, weights, weights_sha256)
        enc = cls(loaded, backbone, crop, dev, precision, runtime=runtime)
        enc.preprocessing = enc.preprocessing.with_flip(flip)
        log.debug(
            "%s runs in %s %s (%s, %s)",
            backbone,
            enc.runtime,
            runtimes.runtime_version(enc.runtime),
            enc.precision,
            enc.device,
        )
        return enc

    @classmethod
    def from_provenance(
        cls,
        prov: dict,
        device: str = defaults.DEVICE,
        precision: str = defaults.PRECISION,
        runtime: str = defaults.RUNTIME,
    ) -> Encoder:
        """The encoder an artifact was made with, so that queries land in the same embedding space (in any
        runtime: their embeddings agree, tests/test_runtimes.py)."""
        prep = Preprocessing.from_dict(prov["preprocessing"])
        enc = cls.load(
            prov["backbone"],
            prov["weights"],
            prep.crop,
            device,
            precision,
            prov.get("weights_sha256"),
            prep.flip,
            runtime,
        )
        if enc.preprocessing != prep:
            raise ProvenanceMismatch(
                f"the {prov['backbone']} preprocessing of this version ({enc.preprocessing.to_dict()}) "
                "differs "
                f"from the one the collection was embedded with ({prep.to_dict()}); re-embed the collection.",
                "preprocessing",
            )
        return enc

    def provenance(self) -> dict:
        """What an artifact must record so that the same embeddings can be made again."""
        return {
            "backbone": self.backbone,
            "weights": self.weights.id,
            "weights_sha256": self.weights.sha256,
            "weights_source": self.weights.source,
            "preprocessing": self.preprocessing.to_dict(),
            "dim": self.dim,
            "precision": self.precision,
            "runtime": self.runtime,
            "runtime_version": runtimes.runtime_version(self.runtime),
        }

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> np.ndarray:
        """uint8 NHWC batch -> float32 (n, dim), each row L2-normalised."""
        if pixels.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        if self._net is not None:
            return self._net.embed(pixels.numpy(), self.preprocessing.flip)
        x = pixels.to(self.device, non_blocking=True)
        x = self.preprocessing.normalize(x)
        normalize = torch.nn.functional.normalize
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            y = normalize(self.model(x).float(), dim=1)
            if self.preprocessing.flip:
                # The mirror image's embedding joins the image's: both orders give the same sum, so a car
                # and its mirror image embed identically.
                y = y + normalize(self.model(torch.flip(x, dims=[3])).float(), dim=1)
        y = normalize(y, dim=1)
        return y.cpu().numpy()

    def encode_arrays(self, arrays: np.ndarray, batch_size: int = defaults.BATCH_SIZE) -> np.ndarray:
        """Embed preprocessed uint8 images (n, size, size, 3), `batch_size` at a time."""
        out = [
            self.encode(torch.from_numpy(arrays[i : i + batch_size]))
            for i in range(0, len(arrays), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def encode_images(
        self, images: Sequence[Image.Image], batch_size: int = defaults.BATCH_SIZE
    ) -> np.ndarray:
        """Embed decoded RGB images (queries)."""
        out = []
        for i in range(0, len(images), batch_size):
            arrays = [self.preprocessing.apply(img) for img in images[i : i + batch_size]]
            out.append(self.encode(torch.from_numpy(np.stack(arrays))))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)
