"""Progress on stderr: a bar on a terminal, a log line every half minute in logs and pipes."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("carsearch")


class Progress:
    """Counts units of work; renders as a tqdm bar on a TTY and as periodic log lines elsewhere."""

    def __init__(self, total: int, desc: str, unit: str = "img", enabled: bool = True, every: float = 30.0):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.done, self.extra = 0, ""
        self._t0 = self._last = time.perf_counter()
        self._bar = None
        self._enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False, file=sys.stderr
            )

    def update(self, n: int, **postfix: object) -> None:
        self.done += n
        if postfix:
            self.extra = ", ".join(f"{k} {v}" for k, v in postfix.items())
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)
        elif self._enabled and time.perf_counter() - self._last >= self.every:
            self._last = time.perf_counter()
            rate = self.done / max(1e-9, self._last - self._t0)
            log.info(
                "%s: %d/%d %s (%.1f %s/s)%s",
                self.desc,
                self.done,
                self.total,
                self.unit,
                rate,
                self.unit,
                f", {self.extra}" if self.extra else "",
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
