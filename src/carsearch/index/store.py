"""An index folder: index.<v>.faiss + metadata.<v>.h5 (id -> path, labels) + index.json (everything else).

A version's data files are named after their content (v = the first 16 hex digits of their sha256) and
written first; index.json, written last by one atomic rename, names them and records their sha256s; only
then are the files no version names removed. So a process killed at any moment of a build, add, remove
or calibrate leaves the folder opening as the old version or the new one, never neither, and the next
writer removes what the killed one left. A truncated, swapped or changed file is refused by name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np

from carsearch import SCHEMA_VERSION, faults
from carsearch.datasets.attributes import attribute_fields
from carsearch.datasets.levels import LabelLevels
from carsearch.embed.shards import STRING_FIELDS, read_h5, write_h5
from carsearch.errors import CarsearchError
from carsearch.fsutil import (
    fsync_dir,
    read_descriptor,
    remove_stale_tmp,
    sha256_file,
    tmp_name,
    write_json_atomic,
)
from carsearch.h5state import check_recorded
from carsearch.index.core import Index

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"  # the names of folders written before versioned files (still read)
META_FILE = "metadata.h5"
INFO_FILE = "index.json"
INDEX_KIND = "carsearch.index"
ID_RANGE = (-(1 << 63), (1 << 63) - 1)  # image ids are int64: anything outside names no image


def is_image_id(value: int) -> bool:
    return ID_RANGE[0] <= value <= ID_RANGE[1]


REQUIRED_KEYS = ("dim", "ntotal", "factory", "provenance", "sources", "search_params")
ROLES = {"index": ("index", ".faiss"), "metadata": ("metadata", ".h5")}
_DATA_FILE = re.compile(r"^(index(\.[0-9a-f]{16})?\.faiss|metadata(\.[0-9a-f]{16})?\.h5)$")


@dataclass
@attribute_fields("np.ndarray", after="labels")  # make, model, year (datasets/attributes.ATTRIBUTES)
class Gallery(LabelLevels):
    """Per-id metadata of the indexed images, in one order; `source` points into index.json's sources."""

    ids: np.ndarray
    paths: np.ndarray
    labels: np.ndarray
    sha256: np.ndarray
    source: np.ndarray

    def __post_init__(self) -> None:
        self._order = np.argsort(self.ids, kind="stable")
        self._sorted = self.ids[self._order]

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id (-1 where the id is not in the gallery, e.g. faiss's -1 padding)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(self._sorted) == 0:
            return np.full(ids.shape, -1, dtype=np.int64)
        pos = np.searchsorted(self._sorted, ids).clip(0, len(self._sorted) - 1)
        return np.where(self._sorted[pos] == ids, self._order[pos], -1)

    def take(self, rows: np.ndarray) -> Gallery:
        return Gallery(**{f: getattr(self, f)[rows] for f in ("ids", *STRING_FIELDS, "source")})

    def concat(self, other: Gallery) -> Gallery:
        return Gallery(
            **{
                f: np.concatenate([getattr(self, f), getattr(other, f)])
                for f in ("ids", *STRING_FIELDS, "source")
            }
        )

    @classmethod
    def from_embeddings(cls, emb, source: int) -> Gallery:  # emb: carsearch.embed.EmbeddingSet
        return cls(
            ids=np.asarray(emb.ids, np.int64),
            **{f: np.asarray(getattr(emb, f), dtype=object) for f in STRING_FIELDS},
            source=np.full(len(emb.ids), source, dtype=np.int32),
        )


@dataclass
class IndexBundle:
    """A loaded index folder."""

    folder: Path
    index: Index
    gallery: Gallery
    info: dict

    @property
    def provenance(self) -> dict:
        return self.info["provenance"]

    def root_of(self, row: int) -> Path:
        """The dataset root the image at `row` is relative to."""
        return Path(self.info["sources"][int(self.gallery.source[row])]["root"])


def _write_version(folder: Path, role: str, write: Callable[[Path], object]) -> dict:
    """Write one data file under a temporary name, then rename it to its content-addressed name."""
    stem, suffix = ROLES[role]
    tmp = tmp_name(folder / f"{stem}{suffix}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        name = f"{stem}.{digest[:16]}{suffix}"
        os.replace(tmp, folder / name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(folder)
    return {"name": name, "sha256": digest, "bytes": (folder / name).stat().st_size}


def _remove_unnamed(folder: Path, info: dict) -> None:
    """Data files no longer named by index.json: older versions, or a killed writer's new ones."""
    keep = {entry["name"] for entry in info["files"].values()}
    for p in folder.iterdir():
        if _DATA_FILE.match(p.name) and p.name not in keep:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def save_bundle(folder: Path, index: Index, gallery: Gallery, info: dict) -> dict:
    """Write a new version of the folder (data files first, index.json last); returns index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(folder)  # what a killed writer left half-written
    data = _write_version(folder, "index", index.save)
    faults.reached("index.data_written")
    meta = _write_version(
        folder,
        "metadata",
        lambda tmp: write_h5(
            tmp,
            {
                "ids": gallery.ids.astype(np.int64),
                **{f: list(getattr(gallery, f)) for f in STRING_FIELDS},
                "source": gallery.source.astype(np.int32),
            },
            {"schema_version": SCHEMA_VERSION},
        ),
    )
    faults.reached("index.meta_written")
    now = datetime.now(UTC).isoformat(timespec="seconds")
    info = {
        **info,
        "kind": INDEX_KIND,
        "schema_version": SCHEMA_VERSION,
        "factory": index.factory,
        "search_params": index.params,
        "metric": "inner_product",
        "dim": index.d,
        "ntotal": index.ntotal,
        "files": {"index": data, "metadata": meta},
        "faiss_version": faiss.__version__,
        "created": info.get("created", now),
        "updated": now,
    }
    write_json_atomic(folder / INFO_FILE, info)  # the switch to the new version: one rename
    faults.reached("index.info_written")
    _remove_unnamed(folder, info)
    return info


def _files(info: dict) -> dict[str, dict]:
    """{role: {"name", "sha256"}} of an index.json, also of folders written before versioned names."""
    files = info.get("files") or {}
    if INDEX_FILE in files:
        return {
            "index": {**files[INDEX_FILE], "name": INDEX_FILE},
            "metadata": {**files[META_FILE], "name": META_FILE},
        }
    return files


def read_info(folder: Path) -> dict:
    return read_descriptor(
        folder / INFO_FILE,
        INDEX_KIND,
        "index description",
        "rebuild the index with `carsearch index build`.",
        missing=lambda: _not_an_index(folder),
    )


def _not_an_index(folder: Path) -> str:
    """What to do with a folder given as an index that has none: embeddings are built into an index in
    another folder, photos are embedded first."""
    from carsearch.datasets import holds_photos

    build = "`carsearch index build {} --out INDEX_DIR` (a new folder) and give INDEX_DIR"
    if (folder / "manifest.json").is_file():
        return f"{folder} holds embeddings, not an index: build one from them with {build.format(folder)}."
    if folder.is_dir() and holds_photos(folder):
        return (
            f"{folder} holds photos, not an index: embed them (`carsearch embed {folder} --out EMB_DIR`), "
            f"then build {build.format('EMB_DIR')}."
        )
    return f"{folder} has no {INFO_FILE}; build one with `carsearch index build EMB_DIR --out {folder}`."


_REBUILD = "rebuild the index with `carsearch index build`."


def _refuse(path: Path, what: str) -> CarsearchError:
    return CarsearchError(f"{path} {what}; {_REBUILD}")


def open_bundle(folder: str | Path, verify: bool = True) -> IndexBundle:
    """Load an index folder, checking each file against index.json (sha256, dimension, count, metric)."""
    folder = Path(folder).expanduser().resolve()
    for _ in range(3):
        try:
            return _open(folder, verify)
        except _Replaced:
            # A writer switched versions between our reading index.json and opening its files (and
            # removed the old ones): the new index.json names files that exist; read it again.
            continue
    return _open(folder, verify)


class _Replaced(Exception):
    """index.json changed while its files were being opened."""


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _open(folder: Path, verify: bool) -> IndexBundle:
    stamp = _stamp(folder / INFO_FILE)
    info = read_info(folder)
    try:
        files = _files(info)
        names = {role: files[role]["name"] for role in ROLES}
        for key in REQUIRED_KEYS:
            info[key]
    except (KeyError, TypeError) as e:
        raise CarsearchError(
            f"{folder / INFO_FILE} lacks {e} (damaged or edited); "
            "rebuild the index with `carsearch index build`."
        ) from None
    paths = {role: folder / name for role, name in names.items()}
    for role, path in paths.items():
        if not path.is_file():
            if _stamp(folder / INFO_FILE) != stamp:
                raise _Replaced(path)
            raise _refuse(path, "is missing")
        if verify:
            check_recorded(path, files[role]["sha256"], "index file", _REBUILD)
    index_path = paths["index"]
    try:
        # Not IO_FLAG_READ_ONLY: add / remove / calibrate open the same way and then change the index.
        index = Index.read(index_path, info["factory"])
    except RuntimeError:
        raise _refuse(index_path, "cannot be read by faiss (truncated or not an index)") from None
    if (
        index.d != info["dim"]
        or index.ntotal != info["ntotal"]
        or index.metric_type != faiss.METRIC_INNER_PRODUCT
    ):
        raise _refuse(
            index_path,
            f"holds {index.ntotal} vectors of {index.d} dimensions (metric {index.metric_type}), "
            f"but {INFO_FILE} "
            f"describes {info['ntotal']} of {info['dim']} with inner product",
        )
    meta_path = paths["metadata"]
    try:
        arrays, _ = read_h5(meta_path)
        gallery = Gallery(
            ids=arrays["ids"],
            **{f: np.asarray(arrays[f], dtype=object) for f in STRING_FIELDS},
            source=arrays["source"],
        )
    except (OSError, KeyError):
        raise _refuse(meta_path, "is damaged") from None
    if len(gallery) != index.ntotal:
        raise _refuse(meta_path, f"lists {len(gallery)} images but the index holds {index.ntotal}")
    index.set_params(info.get("search_params", ""))
    return IndexBundle(folder, index, gallery, info)
