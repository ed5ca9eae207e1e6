"""The metric-learning losses are pytorch-metric-learning's: checked against the papers' formulas written
out here in plain torch, in float32 under bf16 inputs, and able to resume a state saved before."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from carsearch.train.losses import class_weights, make_loss


def _proxy_anchor_oracle(x: torch.Tensor, y: torch.Tensor, proxies: torch.Tensor) -> torch.Tensor:
    """Kim et al. 2020, eq. 4, one proxy at a time: (1/|P+|) sum over proxies with positives of
    log(1 + sum_pos exp(-a(s - d))) + (1/|P|) sum over all proxies of log(1 + sum_neg exp(a(s + d)))."""
    alpha, margin = 32.0, 0.1
    cos = F.normalize(x.double(), dim=1) @ F.normalize(proxies.double(), dim=1).T
    pos_total, neg_total, with_pos = 0.0, 0.0, 0
    for c in range(proxies.shape[0]):
        own = y == c
        if own.any():
            with_pos += 1
            pos_total += torch.log1p(torch.exp(-alpha * (cos[own, c] - margin)).sum())
        neg_total += torch.log1p(torch.exp(alpha * (cos[~own, c] + margin)).sum())
    return pos_total / with_pos + neg_total / proxies.shape[0]


def _normalized_softmax_oracle(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Zhai & Wu 2019: cross-entropy of cos(x, w_c) / 0.05, averaged over the batch."""
    logits = F.normalize(x.double(), dim=1) @ F.normalize(weights.double(), dim=1).T / 0.05
    return -(logits.log_softmax(dim=1)[torch.arange(len(y)), y]).mean()


@pytest.mark.parametrize("name", ["proxy-anchor", "normalized-softmax"])
def test_losses_are_the_published_formulas(name: str) -> None:
    torch.manual_seed(0)
    loss = make_loss(name, 12, 16)
    x = torch.randn(40, 16)
    y = torch.randint(0, 12, (40,))
    y[:6] = 3  # a class with several images in the batch
    w = class_weights(loss)
    assert w.shape == (12, 16)
    oracle = _proxy_anchor_oracle if name == "proxy-anchor" else _normalized_softmax_oracle
    assert loss(x, y).item() == pytest.approx(oracle(x, y, w).item(), rel=1e-5)
    # bf16 embeddings (autocast) are scored in float32, and the class weights stay float32.
    bf16 = loss(x.bfloat16(), y)
    assert bf16.dtype == torch.float32 and class_weights(loss).dtype == torch.float32
    assert bf16.item() == pytest.approx(oracle(x.bfloat16().float(), y, w).item(), rel=1e-5)


def test_class_weights_start_as_kaiming_rows_for_both() -> None:
    """Both draw one kaiming-normal row per class from the same generator state, so a run's start (and
    its figures) does not depend on which library holds the weights."""
    torch.manual_seed(7)
    expected = torch.nn.init.kaiming_normal_(torch.empty(12, 16), mode="fan_out")
    for name in ("proxy-anchor", "normalized-softmax"):
        torch.manual_seed(7)
        torch.testing.assert_close(class_weights(make_loss(name, 12, 16)), F.normalize(expected, dim=1))


def test_a_normalized_softmax_state_saved_as_proxies_still_loads() -> None:
    proxies = torch.randn(12, 16)
    loss = make_loss("normalized-softmax", 12, 16)
    loss.load_state_dict({"proxies": proxies})
    torch.testing.assert_close(class_weights(loss), F.normalize(proxies, dim=1))
