"""Cutting a headless backbone into a frozen prefix and a trainable suffix at a stage boundary.

Partial fine-tuning on a CPU (carsearch train --train-blocks) computes the prefix's activations once per
image and view and trains only the suffix every epoch: the early, high-resolution layers cost most of the
forward pass and their features barely change when fine-tuned. The suffix ends with the backbone's own
global pooling, so prefix -> suffix equals the backbone's forward pass.

Stages are the network's own: timm EfficientNet's `blocks.0` .. `blocks.6` (then conv_head, bn2, pooling),
torchvision ResNet's `layer1` .. `layer4` (then avgpool). Other families are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from carsearch.errors import CarsearchError


@dataclass(frozen=True)
class Cut:
    """A backbone split after stage `stages[len(stages) - trained]`: `prefix` (frozen) and `suffix`."""

    prefix: nn.Module
    suffix: nn.Module
    stages: tuple[str, ...]  # every stage name, in order
    trained: tuple[str, ...]  # the stages in the suffix


class _EfficientNetPrefix(nn.Module):
    def __init__(self, model: nn.Module, start: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(model.conv_stem, model.bn1)
        self.blocks = model.blocks[:start]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


class _EfficientNetSuffix(nn.Module):
    def __init__(self, model: nn.Module, start: int) -> None:
        super().__init__()
        self.blocks = model.blocks[start:]
        self.conv_head, self.bn2 = model.conv_head, model.bn2
        self.model = [model]  # a list, so the whole network is not registered twice as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv_head(self.blocks(x)))
        return self.model[0].forward_head(x, pre_logits=True)


class _ResNetPrefix(nn.Module):
    def __init__(self, model: nn.Module, start: int) -> None:
        super().__init__()
        layers = [model.layer1, model.layer2, model.layer3, model.layer4][:start]
        self.body = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, *layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _ResNetSuffix(nn.Module):
    def __init__(self, model: nn.Module, start: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[model.layer1, model.layer2, model.layer3, model.layer4][start:])
        self.avgpool = model.avgpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.layers(x)), 1)


def stage_names(model: nn.Module) -> tuple[str, ...]:
    """The stage names of a backbone that can be cut; empty for families that cannot."""
    if hasattr(model, "blocks") and hasattr(model, "conv_head") and hasattr(model, "forward_head"):
        return tuple(f"blocks.{i}" for i in range(len(model.blocks)))
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)) and hasattr(model, "avgpool"):
        return ("layer1", "layer2", "layer3", "layer4")
    return ()


def resolve_trained(model: nn.Module, train_blocks: str | int) -> int:
    """How many final stages `train_blocks` names: a count ("2") or the first trained stage ("blocks.5").

    Raises CarsearchError for a family that cannot be cut, a count out of range or an unknown stage."""
    names = stage_names(model)
    if not names:
        raise CarsearchError(
            f"{type(model).__name__} cannot be cut into stages for partial fine-tuning (EfficientNet and "
            "ResNet can); train it whole with --train-blocks all (--preset gpu)."
        )
    text = str(train_blocks)
    if text in names:
        return len(names) - names.index(text)
    if text.isdigit() and 1 <= int(text) <= len(names):
        return int(text)
    raise CarsearchError(
        f"--train-blocks {text!r} is neither a count from 1 to {len(names)} nor a stage of this network "
        f"({', '.join(names)})."
    )


def cut(model: nn.Module, trained: int) -> Cut:
    """Split a headless backbone so that its last `trained` stages (and what follows them) form the suffix.

    The two halves share the backbone's parameters (training the suffix trains the backbone itself)."""
    names = stage_names(model)
    if not 1 <= trained <= len(names):
        raise CarsearchError(f"cannot train the last {trained} of {len(names)} stages of this network.")
    start = len(names) - trained
    if names[0].startswith("blocks"):
        prefix, suffix = _EfficientNetPrefix(model, start), _EfficientNetSuffix(model, start)
    else:
        prefix, suffix = _ResNetPrefix(model, start), _ResNetSuffix(model, start)
    return Cut(prefix, suffix, names, names[start:])
