"""The trained network: a headless backbone and an optional projection to --embed-dim."""

from __future__ import annotations

import torch
from torch import nn


class EmbeddingNet(nn.Module):
    """backbone -> (linear projection) -> embedding. The Encoder L2-normalises the output."""

    def __init__(self, backbone: nn.Module, backbone_dim: int, embed_dim: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone_dim, embed_dim) if embed_dim else nn.Identity()
        if embed_dim:
            nn.init.orthogonal_(self.head.weight)  # starts as a rotation-like projection of the features
            nn.init.zeros_(self.head.bias)
        self.dim = embed_dim or backbone_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def freeze_batchnorm(model: nn.Module) -> None:
    """Keep BatchNorm statistics and affine parameters as pretrained: batches of a few dozen images
    (on a CPU) give statistics too noisy to learn from."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


def set_backbone_trainable(net: EmbeddingNet, trainable: bool) -> None:
    """Freeze or unfreeze the backbone's weights (BatchNorm stays frozen either way)."""
    for m in net.backbone.modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            for p in m.parameters(recurse=False):
                p.requires_grad_(trainable)
