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


# Fields that decide whether two sets of embeddings live in the same space.
COMPATIBILITY_FIELDS = ("backbone", "weights_sha256", "weights", "preprocessing", "dim")


def check_compatible(expected: dict, got: dict, expected_name: str, got_name: str) -> None:
    """Refuse to mix embeddings of another backbone, weights or preprocessing, naming the field."""
    from carsearch.errors import ProvenanceMismatch

    for name in COMPATIBILITY_FIELDS:
        if name == "weights" and expected.get("weights_sha256") and got.get("weights_sha256"):
            continue  # the same file may be named differently (a path vs "imagenet"): the sha256 decides
        if expected.get(name) != got.get(name):
            raise ProvenanceMismatch(
                f"{got_name} was embedded with a different {name} than {expected_name} "
                f"({got.get(name)!r} vs {expected.get(name)!r}); embed it with the same settings.",
                name,
            )
