"""Checkpoint folders, one more weights source of the registry: model.safetensors (the whole network) +
best.safetensors (its best validation epoch) + checkpoint.json (what it is) + train_state.pt (optimizer,
schedule, epoch: for --resume). Each file is written atomically; `carsearch train` writes them through
this module and every stage loads them through `load_backbone(..., weights=CKPT_DIR)`."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from carsearch import SCHEMA_VERSION
from carsearch.errors import CarsearchError
from carsearch.fsutil import atomic_path, read_descriptor, sha256_file, write_json_atomic
from carsearch.models.files import BEST_FILE, INFO_FILE, KIND, MODEL_FILE, STATE_FILE
from carsearch.models.network import EmbeddingNet
from carsearch.models.preprocess import Preprocessing
from carsearch.models.registry import Loaded, build_headless
from carsearch.models.weights import WeightsInfo

__all__ = ["BEST_FILE", "INFO_FILE", "KIND", "MODEL_FILE", "STATE_FILE"]


def save_weights(folder: Path, state: dict[str, torch.Tensor], name: str = MODEL_FILE) -> str:
    """A network's state dict as safetensors (no pickle); returns the file's sha256."""
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(folder / name) as tmp:
        save_file(state, str(tmp))
    return sha256_file(folder / name)


def save_info(folder: Path, info: dict) -> None:
    write_json_atomic(folder / INFO_FILE, {"kind": KIND, "schema_version": SCHEMA_VERSION, **info})


def save_state(folder: Path, state: dict) -> None:
    with atomic_path(folder / STATE_FILE) as tmp:
        torch.save(state, tmp)


def load_state(folder: Path) -> dict:
    try:
        return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CarsearchError(
            f"{folder} has no {STATE_FILE} to resume from; start without --resume."
        ) from None
    except Exception as e:  # damaged or foreign file
        raise CarsearchError(
            f"{folder / STATE_FILE} cannot be loaded ({e}); start again without --resume."
        ) from e


def read_info(folder: Path) -> dict:
    return read_descriptor(
        folder / INFO_FILE,
        KIND,
        "checkpoint description",
        "train it again.",
        missing=f"{folder} is not a carsearch checkpoint (no {INFO_FILE}).",
    )


def architecture(net: EmbeddingNet, backbone: str) -> dict:
    """What checkpoint.json records so that `build_net` can rebuild `net` (nested heads included)."""
    inner = net.backbone
    return {
        "backbone": backbone,
        "backbone_dim": net.backbone_dim,
        "embed_dim": net.projection_dim if isinstance(net.head, torch.nn.Linear) else None,
        "head_input": net.head_input,
        "with_features": net.with_features,
        "base": architecture(inner, backbone) if isinstance(inner, EmbeddingNet) else None,
    }


def build_net(info: dict) -> EmbeddingNet:
    """The architecture a checkpoint describes, with random weights (they are loaded next)."""
    base = info.get("base")
    inner = build_net(base) if base else build_headless(info["backbone"])
    return EmbeddingNet(
        inner,
        info["backbone_dim"],
        info.get("embed_dim"),
        info.get("head_input", "raw"),
        bool(info.get("with_features", False)),
    )


def load_checkpoint(folder: Path, expected_backbone: str | None = None, best: bool = True) -> Loaded:
    """A checkpoint folder as a registry entry: the trained network, its preprocessing and dimension.

    `best` loads the weights of the best validation epoch (best.safetensors) when there is one.
    """
    folder = folder.resolve()
    info = read_info(folder)
    if expected_backbone and info["backbone"] != expected_backbone:
        raise CarsearchError(
            f"{folder} holds a fine-tuned {info['backbone']}; pass --backbone {info['backbone']} to use it."
        )
    name = BEST_FILE if best and (folder / BEST_FILE).is_file() else MODEL_FILE
    path = folder / name
    if not path.is_file():
        raise CarsearchError(f"{folder} has no {name}; the training run did not finish an epoch.")
    expected = info.get("files", {}).get(name)
    digest = sha256_file(path)
    if expected and digest != expected:
        raise CarsearchError(f"{path} does not match the sha256 in {INFO_FILE}; it was changed or damaged.")
    net = build_net(info)
    try:
        net.load_state_dict(load_file(str(path)), strict=True)
    except (RuntimeError, OSError) as e:
        raise CarsearchError(f"{path} does not fit the network {INFO_FILE} describes ({e}).") from None
    prep = Preprocessing.from_dict(info["preprocessing"])
    return Loaded(net, WeightsInfo(str(folder), digest, str(path)), prep, net.dim)
