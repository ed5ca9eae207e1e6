"""The memory watch the bench report's `build +RSS` column comes from: it sees a real allocation."""

from __future__ import annotations

import numpy as np

from carsearch.memwatch import PeakGrowth, peak_rss_bytes, rss_bytes


def test_peak_growth_sees_an_allocation_that_is_gone_at_the_end() -> None:
    with PeakGrowth() as grew:
        block = np.ones(40_000_000)  # 320 MB, every page touched
        held = rss_bytes()
        del block
    assert grew.bytes >= 250_000_000, grew.bytes
    assert rss_bytes() < held - 250_000_000  # freed: only the peak remembers it
    assert peak_rss_bytes() >= 0.99 * held  # getrusage and /proc count a few pages differently


def test_no_growth_when_nothing_is_allocated() -> None:
    with PeakGrowth() as grew:
        sum(range(1000))
    assert grew.bytes < 50_000_000
