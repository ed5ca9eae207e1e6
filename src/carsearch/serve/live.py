"""Live changes to the served index: add a photo, delete one, switch to a rebuilt folder.

Searches hold a shared (read) lock; a change holds the exclusive one only while it changes the faiss index
and the metadata in memory and writes them to the folder. A change is acknowledged after the folder's new
version is on disk (data files fsynced and renamed, index.json renamed last: carsearch.index.store), so a
process killed right after the answer loses nothing; killed before it, the folder holds the old version.
Uploaded photos are kept in INDEX_DIR/uploads/, so that they can be shown and the index rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from carsearch.datasets.attributes import ATTRIBUTES
from carsearch.errors import CarsearchError
from carsearch.fsutil import exclusive_lock, write_bytes_atomic
from carsearch.index.store import Gallery, IndexBundle, open_bundle, save_bundle
from carsearch.provenance import check_compatible
from carsearch.search import Searcher

UPLOADS = "uploads"


class RWLock:
    """Many readers or one writer; a waiting writer stops new readers from starving it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class DuplicatePhoto(Exception):
    """The uploaded file is already in the index, as `image_id`."""

    def __init__(self, image_id: int) -> None:
        super().__init__(image_id)
        self.image_id = image_id


class LiveIndex:
    """The served Searcher and the folder it persists changes to."""

    def __init__(self, searcher: Searcher) -> None:
        self.searcher = searcher
        self.lock = RWLock()
        self._writes = threading.Lock()  # one change at a time (its embedding runs outside the RW lock)
        self.on_change: list[Callable[[], None]] = []  # e.g. caches keyed by image id

    @property
    def folder(self) -> Path:
        return self.searcher.bundle.folder

    def _commit(self, bundle: IndexBundle, gallery: Gallery, info: dict) -> dict:
        """Persist and publish a changed index (called under the write lock); on failure, reopen the folder
        so that memory matches what is on disk."""
        try:
            with exclusive_lock(bundle.folder):
                info = save_bundle(bundle.folder, bundle.index, gallery, info)
        except BaseException:
            self._publish(open_bundle(bundle.folder))
            raise
        self._publish(IndexBundle(bundle.folder, bundle.index, gallery, info))
        return info

    def _publish(self, bundle: IndexBundle) -> None:
        self.searcher.bundle = bundle
        self.searcher.forget_filters()
        for hook in self.on_change:
            hook()

    def add(
        self,
        data: bytes,
        suffix: str,
        vector: np.ndarray,
        meta: dict[str, str],
        allow_duplicates: bool = False,
    ) -> int:
        """Add one embedded photo with its labels; returns its new id once it is on disk. A file the index
        already holds (same sha256) raises DuplicatePhoto unless `allow_duplicates`."""
        digest = hashlib.sha256(data).hexdigest()
        with self._writes, self.lock.write():
            b = self.searcher.bundle
            g = b.gallery
            same = np.flatnonzero(g.sha256 == digest)
            if len(same) and not allow_duplicates:
                raise DuplicatePhoto(int(g.ids[same[0]]))
            # Never an id used before (a deleted photo's id could still be cached by clients).
            new_id = max(int(g.ids.max()) + 1 if len(g) else 0, int(b.info.get("next_id", 0)))
            sources = list(b.info["sources"])
            src = next((i for i, s in enumerate(sources) if s.get("uploads")), None)
            if src is None:
                src = len(sources)
                sources.append({"embeddings": None, "root": str(b.folder), "uploads": True, "shards": []})
            rel = f"{UPLOADS}/{new_id}{suffix}"
            (b.folder / UPLOADS).mkdir(exist_ok=True)
            write_bytes_atomic(b.folder / rel, data)
            # Without a label, the class name its parts make ("Audi TTS Coupe 2012").
            label = meta.get("label") or " ".join(meta[f] for f in ATTRIBUTES if meta.get(f))
            row = Gallery(
                ids=np.array([new_id], np.int64),
                paths=np.array([rel], dtype=object),
                labels=np.array([label], dtype=object),
                **{f: np.array([meta.get(f, "")], dtype=object) for f in ATTRIBUTES},
                sha256=np.array([digest], dtype=object),
                source=np.array([src], np.int32),
            )
            b.index.add(np.atleast_2d(vector), np.array([new_id], np.int64))
            self._commit(
                b, g.concat(row), {**b.info, "sources": sources, "memory_bytes": b.index.memory_bytes}
            )
            return new_id

    def delete(self, image_id: int) -> None:
        """Remove one photo (refused, with the reason, where the index type cannot forget)."""
        with self._writes, self.lock.write():
            b = self.searcher.bundle
            keep = b.gallery.ids != image_id
            if keep.all():
                raise KeyError(image_id)
            b.index.remove(np.array([image_id], np.int64))
            self._commit(
                b, b.gallery.take(np.flatnonzero(keep)), {**b.info, "memory_bytes": b.index.memory_bytes}
            )

    def reload(self, folder: str | Path | None = None) -> dict:
        """Switch to the folder's current version (or another folder embedded the same way)."""
        target = Path(folder).expanduser().resolve() if folder else self.folder
        fresh = open_bundle(target)  # read and checked before any request waits
        check_compatible(self.searcher.bundle.provenance, fresh.provenance, str(self.folder), str(target))
        with self._writes, self.lock.write():
            self._publish(fresh)
        return fresh.info


def refuse_if_shared(workers: int, token: str | None) -> None:
    """Writes change one process's index: with several server processes they would diverge."""
    if token and workers > 1:
        raise CarsearchError(
            "--token (live updates) needs --workers 1: each worker holds its own index copy."
        )
