"""The embedding network: a headless backbone and an optional linear projection to --embed-dim."""

from __future__ import annotations

import torch
from torch import nn

HEAD_INPUTS = ("raw", "normalized")


class EmbeddingNet(nn.Module):
    """backbone -> (linear projection) -> embedding. The Encoder L2-normalises the output.

    `with_features` (needs a projection): the embedding also carries the backbone's features (`embed`).

    `head_input` says what the projection was trained on: the backbone's raw features (a full fine-tune
    trains both together) or their L2-normalised form (a head trained on cached embeddings, which are
    stored normalised). The backbone may itself be an EmbeddingNet: a head trained on the embeddings of
    a fine-tuned checkpoint stacks on it.
    """

    def __init__(
        self,
        backbone: nn.Module,
        backbone_dim: int,
        embed_dim: int | None = None,
        head_input: str = "raw",
        with_features: bool = False,
    ) -> None:
        super().__init__()
        if head_input not in HEAD_INPUTS:
            raise ValueError(f"head_input must be one of {HEAD_INPUTS}")
        self.backbone = backbone
        self.head = nn.Linear(backbone_dim, embed_dim) if embed_dim else nn.Identity()
        if embed_dim:
            nn.init.orthogonal_(self.head.weight)  # starts as a rotation-like projection of the features
            nn.init.zeros_(self.head.bias)
        self.backbone_dim = backbone_dim
        self.head_input = head_input
        self.with_features = bool(with_features and embed_dim)
        self.dim = (embed_dim or backbone_dim) + (backbone_dim if self.with_features else 0)

    @property
    def projection_dim(self) -> int:
        """What the projection outputs (what a loss trains): embed_dim, or the features' dim without one."""
        return self.head.out_features if isinstance(self.head, nn.Linear) else self.backbone_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.backbone(x))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """The embedding of backbone features (n, backbone_dim): the projection (n, embed_dim); with
        `with_features`, the projection and the features themselves, each L2-normalised and concatenated
        (n, embed_dim + backbone_dim) / sqrt(2), so that the cosine of two embeddings is the mean of the
        two cosines. The projection is trained for the training classes; the features it is trained on
        keep more of what tells unseen models apart (docs/benchmarks.md, "Training presets": zero-shot
        Recall@1 65.1% -> 70.2% at the same closed-set top-1)."""
        projected = self.project(features)
        if not self.with_features:
            return projected
        normalize = nn.functional.normalize
        both = torch.cat([normalize(projected.float(), dim=1), normalize(features.float(), dim=1)], dim=1)
        return both * 0.5**0.5

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The head alone, on backbone features (as the backbone outputs them)."""
        if self.head_input == "normalized":
            features = nn.functional.normalize(features.float(), dim=1)
        return self.head(features)


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
