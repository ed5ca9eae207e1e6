"""Giving decoded images' memory back to the operating system, and keeping the garbage collector off the
objects loaded at startup.

glibc serves large allocations with mmap only above a threshold that it raises each time such a block is
freed (up to 32 MiB), after which a burst of big decodes lands on the heap and stays resident once freed:
a server that decoded six 243 MB uploads kept 4 GB. Fixing the threshold at 1 MiB sends every image-sized
block to mmap, which munmap returns at once; malloc_trim hands back what the heap still holds."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3
_libc = None


def _lib():
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
            _libc.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _libc = False
    return _libc


def tune_allocator(threshold: int = 1 << 20) -> bool:
    """Serve allocations of `threshold` bytes or more with mmap (glibc); False where that is not glibc."""
    libc = _lib()
    ok = bool(libc) and libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1
    if not ok:
        log.debug("mallopt unavailable: large decodes may stay resident after they are freed")
    return ok


def release() -> None:
    """Return freed heap memory to the operating system (glibc's malloc_trim)."""
    libc = _lib()
    if libc:
        libc.malloc_trim(0)


def freeze_startup_objects() -> int:
    """Move every object alive now (the imported libraries, the network, the index's metadata) into the
    collector's permanent generation (Python's `gc.freeze`, 3.7+), after one full collection; returns how
    many were frozen.

    Why: torch, timm and OpenVINO leave a few million tracked objects, and a full (generation-2) collection
    walks them all: 200-230 ms on 2 cores, stalling every request in flight. Without this the server's first
    burst of concurrent requests hit one, and it was the whole p99 under 8 clients with OpenVINO
    (benchmarks/serve_load.py: p99 300 ms, p50 47 ms; docs/benchmarks.md). Objects made later are
    collected as usual; frozen ones are still freed by reference counting, only cycles among them stay."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
