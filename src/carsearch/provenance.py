"""Library versions and other facts recorded in every artifact."""

from __future__ import annotations

import platform
from importlib import metadata

_PACKAGES = ("carsearch", "torch", "torchvision", "timm", "faiss-cpu", "h5py", "numpy", "pillow")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that determine an artifact's bytes."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
