"""Fault injection for crash tests: `CARSEARCH_KILL_AT=POINT[:N]` makes the process SIGKILL itself the N-th
time (default 1st) it reaches the named point. Tests use it to kill real processes at exact moments of a
write (between two renames, after a shard) instead of guessing with timers. Unset, it costs one lookup."""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "CARSEARCH_KILL_AT"
_seen: Counter[str] = Counter()


def reached(point: str) -> None:
    """Mark that execution reached `point`; die here if CARSEARCH_KILL_AT names it (and its count)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _seen[point] += 1
    if _seen[point] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
