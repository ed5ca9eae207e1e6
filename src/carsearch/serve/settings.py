"""How the server runs: one frozen object that `carsearch serve` and its worker processes pass whole."""

from __future__ import annotations

from dataclasses import dataclass

from carsearch import defaults


@dataclass(frozen=True)
class ServeSettings:
    """The server's settings (defaults.py holds every default).

    max_upload_bytes: a request body's limit (413 past it). max_pixels: an upload's size once decoded,
    checked from its header; max_decodes: uploads decoded at once (together they bound the memory a burst
    of uploads takes). body_timeout: seconds a client may take to send its body. batch_size: concurrent
    queries that share a forward pass, waiting at most batch_wait_ms for each other (1: no batching).
    device, precision, runtime: where and how the network runs (embed/runtimes.py). token: turns on the
    write routes (live updates); None keeps the index folder read-only.
    """

    max_upload_bytes: int = int(defaults.MAX_UPLOAD_MB * 1e6)
    max_pixels: int = defaults.UPLOAD_MAX_PIXELS
    max_decodes: int = defaults.MAX_DECODES
    body_timeout: float = defaults.BODY_TIMEOUT
    batch_size: int = defaults.SERVE_BATCH
    batch_wait_ms: float = defaults.SERVE_BATCH_WAIT_MS
    device: str = defaults.DEVICE
    precision: str = defaults.PRECISION
    runtime: str = defaults.RUNTIME
    token: str | None = None
