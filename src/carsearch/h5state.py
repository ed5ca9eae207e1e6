"""HDF5 files that another program has, or had, open for writing, and storage without file locks.

Opening an HDF5 file for writing (h5py 'r+' / 'a', HDFView, a notebook) sets the file-consistency flags in
its superblock (bytes 20-23 for superblock versions 0 and 1, the versions h5py writes by default) and
leaves them set if that program is killed. The data are intact, but the file's sha256 no longer matches
the one carsearch recorded, and a damaged file and a held-open one looked the same ("changed or
damaged"). `check_recorded` tells them apart: the sha256 with those flags cleared is compared as well,
and an advisory lock probe says whether a writer still holds the file.

On storage without locks (NFS without lockd, some Lustre / FUSE / SMB mounts) `flock` fails with ENOLCK;
`open_h5` then opens without HDF5's own locking (HDF5_USE_FILE_LOCKING=FALSE does the same) — carsearch's
folder lock still serialises its writers (fsutil.exclusive_lock).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
from pathlib import Path

import h5py

from carsearch.errors import CarsearchError
from carsearch.fsutil import sha256_file

log = logging.getLogger(__name__)

_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_HELD = "is open for writing in another program (h5py in 'r+'/'a' mode, HDFView, a notebook)"
_FLAGS_V01 = slice(20, 24)  # superblock versions 0 and 1: file consistency flags (4 bytes), no checksum


def unmarked_sha256(path: Path) -> str | None:
    """sha256 of the file with its superblock's open-for-writing flags cleared; None when the file is not
    an HDF5 file with a version 0/1 superblock at offset 0, or the flags are already clear."""
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:8] != _SIGNATURE or head[8] not in (0, 1) or head[_FLAGS_V01] == bytes(4):
            return None
        h = hashlib.sha256(head[:20] + bytes(4) + head[24:])
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def held_for_writing(path: Path) -> bool:
    """Another process holds HDF5's write lock on the file right now (an advisory lock probe)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False  # no locks on this storage: nothing to learn from them
    finally:
        os.close(fd)


def check_recorded(path: Path, expected: str, what: str, remedy: str) -> None:
    """Check `path` against the sha256 an artifact recorded for it; refuse in one sentence naming the case:
    held open for writing by another program now, changed or damaged. A file whose only difference is the
    open-for-writing mark of a program that ended without closing it is read as it is (with a warning)."""
    if sha256_file(path) == expected:
        return
    if unmarked_sha256(path) == expected:
        if held_for_writing(path):
            raise CarsearchError(
                f"{what} {path} {_HELD}; its data are intact: close it there, then run again."
            )
        log.warning(
            "%s %s is marked as open for writing by a program that ended without closing it; its data match "
            "the recorded sha256, so it is read as it is (`h5clear -s %s` clears the mark).",
            what,
            path,
            path,
        )
        return
    raise CarsearchError(
        f"{what} {path} does not match the sha256 recorded for it; it was changed or damaged: {remedy}"
    )


def open_h5(path: str | os.PathLike[str], mode: str = "r") -> h5py.File:
    """h5py.File(path, mode), falling back to no HDF5 file locking where the storage has no locks
    (ENOLCK), and naming the file that another program holds open for writing."""
    try:
        return h5py.File(path, mode)
    except OSError as e:
        text = str(e)
        if f"errno = {errno.ENOLCK}" in text or "No locks available" in text:
            return h5py.File(path, mode, locking=False)
        if f"errno = {errno.EAGAIN}" in text and "lock" in text:
            raise CarsearchError(f"{path} {_HELD}; close it there, then run again.") from None
        raise
