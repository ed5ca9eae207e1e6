"""The reader side of the embed job: DataLoader workers turn records into framed uint8 images, the
file's sha256, or a failure reason (clip-retrieval's reader)."""

from __future__ import annotations

import contextlib
import hashlib
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from carsearch.datasets import Record
from carsearch.embed.images import BadImage, load_image, read_file, safe_join
from carsearch.errors import CarsearchError
from carsearch.models import Preprocessing

# torch's words for a decoding process that died: "DataLoader worker (pid 123) is killed by signal:
# Killed." / "DataLoader worker (pid(s) 123) exited unexpectedly".
_WORKER_DIED = re.compile(
    r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) (is killed by signal: (\w+)|exited unexpectedly)"
)


@contextlib.contextmanager
def decoding_workers(
    resume_hint: str = "finished shards are kept: run the same command again",
    workers: Callable[[], Iterable[object]] | None = None,
) -> Iterator[None]:
    """Turn the death of a DataLoader worker (the OOM killer, a decoder that crashed) into one sentence
    that says what to do, instead of torch's multi-page traceback. Other errors pass through.

    `workers()` returns the loader's worker processes (its iterator's): a worker killed while the main
    process is fetching a batch's shared memory from it surfaces as a ConnectionError or EOFError rather
    than torch's "worker killed" error; with them, that case gets the same sentence, naming the dead one."""
    try:
        yield
    except RuntimeError as e:
        m = _WORKER_DIED.search(str(e))
        if m is None:
            raise
        how = f"was killed by signal {m.group(3)}" if m.group(3) else "exited unexpectedly"
        raise CarsearchError(_worker_died(m.group(1).strip(), how, resume_hint)) from None
    except (ConnectionError, EOFError):
        dead = _dead_worker(workers() if workers else ())
        if dead is None:
            raise
        code = dead.exitcode
        how = f"was killed by signal {signal.strsignal(-code)}" if code < 0 else "exited unexpectedly"
        raise CarsearchError(_worker_died(str(dead.pid), how, resume_hint)) from None


def _worker_died(pid: str, how: str, resume_hint: str) -> str:
    return (
        f"an image-decoding worker (pid {pid}) {how}, most likely out of memory; "
        f"{resume_hint}, perhaps with fewer --workers or a smaller --batch-size."
    )


def _dead_worker(processes: Iterable[object], wait: float = 2.0) -> object | None:
    """The first of `processes` (multiprocessing.Process) that has ended, waiting up to `wait` seconds
    for the one whose death was just felt; None when all still run."""
    deadline = time.monotonic() + wait
    while True:
        for p in processes:
            if getattr(p, "exitcode", None) is not None:
                return p
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def ignore_interrupts(_worker_id: int) -> None:
    """DataLoader worker_init_fn: Ctrl-C reaches the whole process group, but only the main process stops
    the run (a decoding worker that died of it would turn a Ctrl-C into a worker failure). When the main
    process stops while it is fetching a batch's shared memory, the worker's file-descriptor server
    (multiprocessing.resource_sharer, a thread that reports through sys.excepthook) loses its peer: that
    ConnectionError or EOFError is the stop itself, not a failure, and is not printed as a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    previous = sys.excepthook

    def quiet_lost_peer(kind: type[BaseException], value: BaseException, tb: object) -> None:
        if not issubclass(kind, (ConnectionError, EOFError)):
            previous(kind, value, tb)

    sys.excepthook = quiet_lost_peer


@contextlib.contextmanager
def ctrl_c() -> Iterator[list[bool]]:
    """Remember a Ctrl-C: yields a flag set by the SIGINT handler, which still raises KeyboardInterrupt.
    Python drops an exception raised inside a finalizer (a weakref callback), and a worker's exit can
    surface as another error first: with the flag the run raises KeyboardInterrupt again itself, and the
    dropped one is not printed ("Exception ignored in ...": sys.unraisablehook skips KeyboardInterrupt while
    watched). Only the main thread, and only where Ctrl-C has Python's default handler, is watched."""
    hit = [False]
    watch = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if watch else None
    if previous is not signal.default_int_handler:
        yield hit
        return

    def handler(_signum: int, _frame: object) -> None:
        hit[0] = True
        raise KeyboardInterrupt

    unraisable = sys.unraisablehook

    def quiet_interrupt(info: object) -> None:
        if not isinstance(getattr(info, "exc_value", None), KeyboardInterrupt):
            unraisable(info)

    signal.signal(signal.SIGINT, handler)
    sys.unraisablehook = quiet_interrupt
    try:
        yield hit
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = unraisable


class RecordImages(torch.utils.data.Dataset):
    def __init__(self, root: Path, records: list[Record], prep: Preprocessing, max_pixels: int) -> None:
        self.root, self.records, self.prep, self.max_pixels = root, records, prep, max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str, str, str]:
        rec, digest = self.records[i], ""
        try:
            data = read_file(safe_join(self.root, rec.path))
            digest = hashlib.sha256(data).hexdigest()
            img = load_image(data, self.max_pixels, None if rec.bbox else self.prep.draft_size)
            if rec.bbox:
                x1, y1, x2, y2 = rec.bbox
                img = img.crop((max(0, x1), max(0, y1), min(img.width, x2 + 1), min(img.height, y2 + 1)))
            return i, self.prep.apply(img), digest, "", ""
        except BadImage as e:
            return i, None, digest, e.reason, e.detail


@dataclass
class Batch:
    index: list[int]
    ok: list[int]  # positions in `index` whose image decoded
    pixels: torch.Tensor  # uint8 (len(ok), S, S, 3)
    sha256: list[str]
    failures: list[tuple[int, str, str]]  # (record index, reason, detail)

    def pin_memory(self) -> Batch:
        self.pixels = self.pixels.pin_memory()
        return self


def collate(items: list[tuple[int, np.ndarray | None, str, str, str]]) -> Batch:
    ok = [k for k, it in enumerate(items) if it[1] is not None]
    arrays = [items[k][1] for k in ok]
    pixels = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros((0, 1, 1, 3), dtype=torch.uint8)
    return Batch(
        index=[it[0] for it in items],
        ok=ok,
        pixels=pixels,
        sha256=[it[2] for it in items],
        failures=[(it[0], it[3], it[4]) for it in items if it[1] is None],
    )
