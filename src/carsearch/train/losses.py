"""Metric-learning losses for few images per class: Proxy-Anchor and normalised softmax."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("proxy-anchor", "normalized-softmax")


class ProxyAnchor(nn.Module):
    """Proxy-Anchor loss (Kim et al., CVPR 2020): one learnable proxy per class; each proxy pulls the
    batch's embeddings of its class and pushes the others, with log-sum-exp weighting (alpha, margin delta).
    """

    def __init__(self, n_classes: int, dim: int, margin: float = 0.1, alpha: float = 32.0) -> None:
        super().__init__()
        self.proxies = nn.Parameter(torch.empty(n_classes, dim))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")
        self.margin, self.alpha = margin, alpha

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cos = F.normalize(x.float(), dim=1) @ F.normalize(self.proxies, dim=1).T  # (B, C)
        pos = F.one_hot(y, cos.shape[1]).bool()
        with_pos = pos.any(dim=0)
        # log(1 + sum exp(.)) as logsumexp over [0, terms]: stable for alpha * cos up to any size.
        neg_inf = torch.finfo(cos.dtype).min
        pos_terms = torch.where(pos, -self.alpha * (cos - self.margin), neg_inf)
        neg_terms = torch.where(~pos, self.alpha * (cos + self.margin), neg_inf)
        zero = torch.zeros(1, cos.shape[1], device=cos.device, dtype=cos.dtype)
        pos_loss = torch.logsumexp(torch.cat([zero, pos_terms]), dim=0)[
            with_pos
        ].sum() / with_pos.sum().clamp(min=1)
        neg_loss = torch.logsumexp(torch.cat([zero, neg_terms]), dim=0).sum() / cos.shape[1]
        return pos_loss + neg_loss


class NormalizedSoftmax(nn.Module):
    """Cosine classifier: cross-entropy over s * cos(x, w_c) (NormFace; Zhai & Wu 2019 for retrieval)."""

    def __init__(self, n_classes: int, dim: int, temperature: float = 0.05) -> None:
        super().__init__()
        self.proxies = nn.Parameter(torch.empty(n_classes, dim))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")
        self.temperature = temperature

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = F.normalize(x.float(), dim=1) @ F.normalize(self.proxies, dim=1).T / self.temperature
        return F.cross_entropy(logits, y)


def make_loss(name: str, n_classes: int, dim: int) -> nn.Module:
    from carsearch.errors import CarsearchError

    if name == "proxy-anchor":
        return ProxyAnchor(n_classes, dim)
    if name == "normalized-softmax":
        return NormalizedSoftmax(n_classes, dim)
    raise CarsearchError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}.")
