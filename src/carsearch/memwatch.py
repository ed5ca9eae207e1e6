"""Resident memory of this process: now, and the peak growth over a block of work (sampled in a thread,
since ru_maxrss only ever rises and cannot tell one index build from the next in the same process)."""

from __future__ import annotations

import os
import resource
import threading
from types import TracebackType

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size now (Linux /proc), else the process peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakGrowth:
    """`with PeakGrowth() as m: ...` then `m.bytes`: the most resident memory rose above its level at the
    start, sampled every `interval` seconds (short spikes between samples can be missed)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.bytes = interval, 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakGrowth:
        self._start = self._peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, rss_bytes())

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, rss_bytes())
        self.bytes = self._peak - self._start
