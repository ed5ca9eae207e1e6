"""Durable file writing: write to a temporary name in the same folder, flush, fsync, rename."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("carsearch")  # the name its messages always went out under
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tmp_name(path: Path) -> Path:
    """The temporary name used while `path` is being written (same folder, so rename is atomic)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    # The rename itself must reach the disk too, or a crash can lose the new name.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed over `path`.

    On an exception the temporary file is removed and `path` is left as it was.
    """
    from carsearch import faults

    path = Path(path)
    tmp = tmp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        faults.reached("atomic.before_rename")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def remove_stale_tmp(folder: Path, stem: str = "") -> int:
    """Delete temporary files left by a killed writer (names made by `tmp_name`). Returns the count."""
    n = 0
    for p in folder.glob(f".{stem}*.tmp-*"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            n += 1
    return n


@contextlib.contextmanager
def exclusive_lock(folder: Path) -> Iterator[None]:
    """One writer per output folder: a second process writing the same folder is refused, not interleaved.

    The lock is flock on FOLDER/.lock. Where the storage has no locks (ENOLCK: NFS without lockd, some
    Lustre / FUSE / SMB mounts) it is a lock file created with O_EXCL instead (FOLDER/.lock.owner, holding
    host and pid; removed on exit; a stale one of a dead process on this host is taken over).
    CARSEARCH_NO_LOCK=1 turns writer locking off, with a warning: two writers could then interleave."""
    from carsearch.errors import CarsearchError

    if os.environ.get("CARSEARCH_NO_LOCK") == "1":
        log.warning("CARSEARCH_NO_LOCK=1: %s is written without a writer lock.", folder)
        yield
        return
    with open(Path(folder) / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CarsearchError(
                f"another carsearch process is writing to {folder}; wait for it to finish or choose "
                "another output folder."
            ) from None
        except OSError as e:
            if e.errno != errno.ENOLCK:
                raise
            with _owner_file(Path(folder)):
                yield
            return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _owner_file(folder: Path) -> Iterator[None]:
    """The writer lock as a file created with O_EXCL, for storage without flock."""
    import socket

    from carsearch.errors import CarsearchError

    owner = folder / ".lock.owner"
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(owner, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            host, _, pid = owner.read_text().partition(" ") if owner.exists() else ("", "", "")
            if host == socket.gethostname() and pid.strip().isdigit() and not _alive(int(pid)):
                owner.unlink(missing_ok=True)  # left by a process of this host that died
                continue
            raise CarsearchError(
                f"the storage of {folder} has no file locks (ENOLCK), and {owner} says that carsearch "
                f"process {pid.strip() or '?'} on {host or '?'} is writing to it; if that process is gone, "
                "delete the file and run again (CARSEARCH_NO_LOCK=1 turns the writer lock off)."
            ) from None
    else:
        raise CarsearchError(f"could not take the writer lock {owner}; delete it and run again.")
    with os.fdopen(fd, "w") as f:
        f.write(me)
    log.info("%s has no file locks (ENOLCK): writer lock held by %s instead.", folder, owner.name)
    try:
        yield
    finally:
        owner.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_descriptor(
    path: Path, kind: str, what: str, remedy: str, missing: str | Callable[[], str] | None = None
) -> dict:
    """Read a carsearch JSON descriptor (manifest.json, index.json, checkpoint.json) and check its kind and
    schema version. Every refusal is one sentence naming the file, ending with `remedy`; a missing file's
    is `missing` (or what it returns, worked out only then: it may look at the folder)."""
    import json

    from carsearch import SCHEMA_VERSION
    from carsearch.errors import CarsearchError

    try:
        if not path.is_file():
            raise FileNotFoundError(path)
        data = json.loads(path.read_text())
    except FileNotFoundError:
        said = missing() if callable(missing) else missing
        raise CarsearchError(said or f"{path.parent} has no {path.name}; {remedy}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CarsearchError(f"{path} is damaged ({e}); {remedy}") from None
    if not isinstance(data, dict) or data.get("kind") != kind:
        raise CarsearchError(f"{path} is not a carsearch {what}.")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise CarsearchError(
            f"{path} has schema version {data.get('schema_version')}, this carsearch reads {SCHEMA_VERSION}; "
            f"{remedy}"
        )
    return data
