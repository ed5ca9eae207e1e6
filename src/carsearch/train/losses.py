"""Metric-learning losses for few images per class.

proxy-anchor and normalized-softmax (the head's and the full fine-tune's historical pair) are written
here; cosface, arcface and the PML forms come from pytorch-metric-learning; cosine-ce is a cosine
classifier (NormFace) under torch's cross-entropy with label smoothing, which PML's losses lack. Every
loss is a module `loss(embeddings (B, d) float, labels (B,) int64) -> scalar` whose parameters (proxies or
class weights) train with it; the cosine classifiers also give `logits(embeddings)` (B, C).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from carsearch.train.settings import LOSSES

# Losses that learn from any batch (a class weight per class), so batches need no P x K structure.
CLASSIFIER_LOSSES = ("normalized-softmax", "cosine-ce", "cosface", "arcface")


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


class CosineCE(nn.Module):
    """Cosine classifier (NormFace, Wang et al. 2017): cross-entropy over s * cos(x, w_c), with label
    smoothing (Szegedy et al. 2016) through torch's own cross_entropy."""

    def __init__(self, n_classes: int, dim: int, scale: float = 16.0, label_smoothing: float = 0.1) -> None:
        super().__init__()
        self.proxies = nn.Parameter(torch.empty(n_classes, dim))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")
        self.scale, self.label_smoothing = scale, label_smoothing

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(x.float(), dim=1) @ F.normalize(self.proxies.float(), dim=1).T

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(x), y, label_smoothing=self.label_smoothing)


def make_loss(
    name: str,
    n_classes: int,
    dim: int,
    scale: float = 16.0,
    margin: float = 0.0,
    label_smoothing: float = 0.1,
) -> nn.Module:
    """The loss called `name` for `n_classes` classes of `dim`-d embeddings. `scale`, `margin` and
    `label_smoothing` apply to the cosine classifiers (cosine-ce; cosface, arcface: PML's, margin in
    cosine units for cosface and degrees for arcface; 0 takes PML's default). Raises CarsearchError."""
    from carsearch.errors import CarsearchError

    if name == "proxy-anchor":
        return ProxyAnchor(n_classes, dim)
    if name == "normalized-softmax":
        return NormalizedSoftmax(n_classes, dim)
    if name == "cosine-ce":
        return CosineCE(n_classes, dim, scale, label_smoothing)
    if name in ("cosface", "arcface", "pml-proxy-anchor"):
        from pytorch_metric_learning import losses

        if name == "pml-proxy-anchor":
            return losses.ProxyAnchorLoss(n_classes, dim)
        kind = losses.CosFaceLoss if name == "cosface" else losses.ArcFaceLoss
        return kind(
            num_classes=n_classes, embedding_size=dim, scale=scale, **({"margin": margin} if margin else {})
        )
    raise CarsearchError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}.")


def class_weights(loss: nn.Module) -> torch.Tensor | None:
    """The loss's class weights (proxies) as unit rows, (n_classes, dim) float32 on the CPU; None for a
    loss without one weight per class. PML's CosFace / ArcFace keep theirs as `W` (dim, n_classes)."""
    w = getattr(loss, "proxies", None)
    if w is None and isinstance(getattr(loss, "W", None), torch.Tensor):
        w = loss.W.T
    if w is None:
        return None
    return F.normalize(w.detach().float(), dim=1).cpu()
