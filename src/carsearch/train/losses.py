"""Metric-learning losses for few images per class.

proxy-anchor, normalized-softmax, cosface and arcface come from pytorch-metric-learning (the first two
fed float32 and initialised as carsearch always did, so figures reproduce); cosine-ce is a cosine
classifier (NormFace) under torch's cross-entropy with label smoothing, which PML's losses lack. Every
loss is a module `loss(embeddings (B, d) float, labels (B,) int64) -> scalar` whose parameters (proxies or
class weights) train with it; the cosine classifiers also give `logits(embeddings)` (B, C).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml
from torch import nn

from carsearch.train.settings import LOSSES

# Losses that learn from any batch (a class weight per class), so batches need no P x K structure.
CLASSIFIER_LOSSES = ("normalized-softmax", "cosine-ce", "cosface", "arcface")


class ProxyAnchor(pml.ProxyAnchorLoss):
    """Proxy-Anchor loss (Kim et al., CVPR 2020), pytorch-metric-learning's (margin 0.1, alpha 32, proxies
    kaiming-normal), fed float32 embeddings: PML casts its proxies to the embeddings' dtype, which under
    bf16 autocast would round the learned proxies themselves."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float(), y)


def _kaiming_per_class(w: torch.Tensor) -> None:
    # PML keeps the normalised-softmax weights as W (dim, classes) and draws them from N(0, 1); carsearch
    # has always drawn one kaiming-normal row per class (classes, dim), as Proxy-Anchor's proxies are.
    # Same draws, transposed into PML's layout, so runs reproduce.
    with torch.no_grad():
        w.copy_(nn.init.kaiming_normal_(torch.empty(w.shape[1], w.shape[0]), mode="fan_out").T)


class NormalizedSoftmax(pml.NormalizedSoftmaxLoss):
    """Cosine classifier: cross-entropy over cos(x, w_c) / 0.05 (NormFace; Zhai & Wu 2019 for retrieval),
    pytorch-metric-learning's, fed float32 embeddings (see ProxyAnchor). A training state saved when the
    weights were `proxies` (classes, dim) still loads."""

    def __init__(self, n_classes: int, dim: int, temperature: float = 0.05) -> None:
        super().__init__(n_classes, dim, temperature=temperature, weight_init_func=_kaiming_per_class)
        self._register_load_state_dict_pre_hook(_proxies_to_w)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float(), y)


def _proxies_to_w(state: dict, prefix: str, *_args) -> None:
    if prefix + "proxies" in state:
        state[prefix + "W"] = state.pop(prefix + "proxies").T.contiguous()


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

    if name in ("proxy-anchor", "pml-proxy-anchor"):
        return ProxyAnchor(n_classes, dim)
    if name == "normalized-softmax":
        return NormalizedSoftmax(n_classes, dim)
    if name == "cosine-ce":
        return CosineCE(n_classes, dim, scale, label_smoothing)
    if name in ("cosface", "arcface"):
        kind = pml.CosFaceLoss if name == "cosface" else pml.ArcFaceLoss
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
