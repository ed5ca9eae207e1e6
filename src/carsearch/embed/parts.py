"""A shard in progress, saved in parts, so that an interrupted job resumes inside the shard it was writing.

While a shard is embedded, the rows embedded since the last save are written every `--save-every` seconds,
and when the run is interrupted (Ctrl-C), as a part file `shard-00003.part-000160.h5` (the shard's records
from offset 160 on, up to the next part), written like a shard: temporary name, fsync, rename. A part
ends where a batch ends, so a rerun cuts the rest of the shard into the batches an uninterrupted run would
have cut, and the finished shard has the same bytes. The finished shard replaces its parts: the shard is
written, the manifest lists it, then its parts are deleted. Readers of a folder never see parts: a
collection is its finished shards.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from carsearch.embed.shards import STRING_FIELDS, ShardRows, read_shard, write_shard
from carsearch.errors import CarsearchError
from carsearch.h5state import open_h5

log = logging.getLogger(__name__)

_PART = re.compile(r"^shard-(\d+)\.part-(\d+)\.h5$")


@dataclass
class Piece:
    """Rows of the consecutive records [start, stop) of one shard, and the records of that range that
    were skipped (record index, reason, detail)."""

    start: int
    stop: int
    rows: ShardRows
    failures: list[tuple[int, str, str]]

    @property
    def images(self) -> int:
        return self.stop - self.start


def part_name(shard: int, offset: int) -> str:
    return f"shard-{shard:05d}.part-{offset:06d}.h5"


def part_files(out: Path) -> dict[int, list[tuple[int, Path]]]:
    """Part files in `out` by shard index: (offset, path), in order of offset."""
    found: dict[int, list[tuple[int, Path]]] = {}
    for p in out.glob("shard-*.part-*.h5"):
        m = _PART.match(p.name)
        if m:
            found.setdefault(int(m.group(1)), []).append((int(m.group(2)), p))
    return {k: sorted(v) for k, v in found.items()}


def write_part(out: Path, shard: int, shard_start: int, piece: Piece, fingerprint_sha256: str) -> Path:
    """Save `piece` of shard `shard` (whose first record is `shard_start`) durably."""
    path = out / part_name(shard, piece.start - shard_start)
    attrs = {
        "shard": shard,
        "record_start": piece.start,
        "record_stop": piece.stop,
        "fingerprint_sha256": fingerprint_sha256,
        "failures": [list(f) for f in piece.failures],
    }
    write_shard(path, piece.rows, attrs)
    return path


def saved_pieces(
    out: Path, shard: int, start: int, stop: int, fingerprint_sha256: str, files: list[tuple[int, Path]]
) -> list[Piece]:
    """The pieces of shard `shard` an earlier run saved, read back in order from the shard's first record
    `start` and ending by `stop`. A part that does not continue that chain (made with other settings,
    going past `stop`, damaged, or following one of those) is deleted: its records are embedded again."""
    pieces: list[Piece] = []
    at, broken = start, False
    for _, path in files:
        piece = None if broken else _read_piece(path, fingerprint_sha256)
        if piece is not None and piece.start == at and piece.stop <= stop:
            pieces.append(piece)
            at = piece.stop
        else:
            broken = True
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return pieces


def _read_piece(path: Path, fingerprint_sha256: str) -> Piece | None:
    try:
        rows, attrs = read_shard(path)
    except CarsearchError as e:
        log.warning(
            "%s: part of a shard in progress is unreadable (%s); its images are embedded again.", path, e
        )
        return None
    if attrs.get("fingerprint_sha256") != fingerprint_sha256:
        return None
    failures = [(int(i), str(r), str(d)) for i, r, d in attrs.get("failures", [])]
    return Piece(int(attrs["record_start"]), int(attrs["record_stop"]), rows, failures)


def saved_images(out: Path) -> int:
    """How many images the parts in `out` hold (what a rerun will not read again), from their attributes."""
    n = 0
    for files in part_files(out).values():
        for _, path in files:
            with contextlib.suppress(OSError, KeyError, CarsearchError), open_h5(path) as f:
                n += int(f.attrs["record_stop"]) - int(f.attrs["record_start"])
    return n


def remove_parts(out: Path, shard: int) -> None:
    """Delete the parts of a finished shard (after the manifest lists it)."""
    for _, path in part_files(out).get(shard, []):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def join_rows(pieces: list[Piece], dim: int) -> ShardRows:
    """The rows of consecutive pieces, as one shard's."""
    parts = [p.rows for p in pieces]
    return ShardRows(
        vectors=np.concatenate([r.vectors for r in parts]) if parts else np.zeros((0, dim), np.float32),
        ids=np.concatenate([r.ids for r in parts]) if parts else np.zeros(0, np.int64),
        class_ids=np.concatenate([r.class_ids for r in parts]) if parts else np.zeros(0, np.int32),
        **{name: [v for r in parts for v in getattr(r, name)] for name in STRING_FIELDS},
    )
