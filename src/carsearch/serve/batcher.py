"""Dynamic batching: concurrent queries share one forward pass.

Each request decodes its upload (bounded by the decode slots) and frames it to the network's input size
(a small uint8 array), then hands it here and waits. One thread runs the network: it takes the first
waiting array and, while other requests are still decoding (they will arrive within milliseconds), waits
up to `max_wait` for them, up to `max_batch` in all. A lone request never waits: nobody is decoding, so
its batch of one runs at once, as fast as without batching.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np


class Batcher:
    """Request threads: `with batcher.arriving(): decode; future = batcher.submit(array)`, then
    `future.result()`; batches are embedded by `encode(stacked arrays)` in one thread."""

    def __init__(
        self,
        encode: Callable[[np.ndarray], np.ndarray],
        max_batch: int,
        max_wait: float,
        observe: Callable[[int, float], None] | None = None,
    ) -> None:
        self.encode, self.max_batch, self.max_wait = encode, max_batch, max_wait
        self.observe = observe  # (batch size, seconds the first query waited)
        self._queue: queue.Queue[tuple[np.ndarray, Future, float]] = queue.Queue()
        self._arriving = 0  # requests decoding now: their arrays are on the way
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="carsearch-batcher", daemon=True)
        self._thread.start()

    def arriving(self) -> _Arriving:
        """`with batcher.arriving(): decode...` tells the batch thread that one more array is coming."""
        return _Arriving(self)

    def submit(self, array: np.ndarray) -> Future:
        """Queue one framed uint8 image (size, size, 3); the future holds its embedding once its batch ran.
        Submit inside `arriving()`, so that the batch thread never stops waiting in between."""
        done: Future = Future()
        self._queue.put((array, done, time.perf_counter()))
        return done

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            deadline = time.perf_counter() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except queue.Empty:
                    pass
                left = deadline - time.perf_counter()
                if left <= 0 or self._arriving == 0:
                    break
                try:
                    batch.append(self._queue.get(timeout=min(left, 0.001)))
                except queue.Empty:
                    continue
            waited = time.perf_counter() - batch[0][2]
            try:
                vectors = self.encode(np.stack([a for a, _, _ in batch]))
            except BaseException as e:  # every waiting request gets the error, not a hang
                for _, f, _ in batch:
                    f.set_exception(e)
                continue
            if self.observe is not None:
                self.observe(len(batch), waited)
            for (_, f, _), v in zip(batch, vectors, strict=True):
                f.set_result(v)


class _Arriving:
    def __init__(self, batcher: Batcher) -> None:
        self.b = batcher

    def __enter__(self) -> None:
        with self.b._lock:
            self.b._arriving += 1

    def __exit__(self, *exc: object) -> None:
        with self.b._lock:
            self.b._arriving -= 1
