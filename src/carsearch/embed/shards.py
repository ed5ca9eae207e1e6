"""HDF5 embedding shards: one file per fixed range of records, written atomically.

Layout (DESIGN.md): /embeddings float32 (n, d) L2-normalised, /ids int64, /class_ids int32 (the
dataset's class numbers, -1 when unlabeled), /paths, /labels, /make, /model, /year, /sha256 (utf-8
strings); provenance in the file attributes. Files carry no timestamps,
so the same inputs give byte-identical shards.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from carsearch.datasets.attributes import ATTRIBUTES, attribute_fields
from carsearch.errors import CarsearchError
from carsearch.fsutil import atomic_path, sha256_file
from carsearch.h5state import open_h5

# The per-image text columns, in the order shards and index metadata store them.
STRING_FIELDS = ("paths", "labels", *ATTRIBUTES, "sha256")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


@dataclass
@attribute_fields("list[str]", after="labels", default_factory=list)  # make, model, year
class ShardRows:
    """Rows of one shard (or of a whole collection, once concatenated)."""

    vectors: np.ndarray  # (n, d) float32, L2-normalised: the shard's /embeddings
    ids: np.ndarray
    class_ids: np.ndarray
    paths: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, mask: np.ndarray) -> ShardRows:
        """The rows where `mask` is true."""
        rows = np.flatnonzero(mask)
        return ShardRows(
            vectors=self.vectors[rows],
            ids=self.ids[rows],
            class_ids=self.class_ids[rows],
            **{name: [getattr(self, name)[r] for r in rows] for name in STRING_FIELDS},
        )


def write_h5(path: Path, arrays: dict[str, np.ndarray | list[str]], attrs: dict) -> str:
    """Write numeric arrays and utf-8 string lists to `path` atomically, with no timestamps (so the same
    inputs give the same bytes). Dict and list attributes are stored as JSON. Returns the file's sha256."""
    try:
        return _write_h5(path, arrays, attrs)
    except OSError as e:
        if e.filename:
            raise
        # HDF5 reports the C library's errno inside its message ("errno = 28"): keep it, name the file.
        m = re.search(r"errno = (\d+)", str(e))
        code = int(m.group(1)) if m else (e.errno or 0)
        raise OSError(code, os.strerror(code) if code else str(e), str(path)) from e


def _write_h5(path: Path, arrays: dict[str, np.ndarray | list[str]], attrs: dict) -> str:
    str_dtype = h5py.string_dtype("utf-8")
    with atomic_path(path) as tmp, open_h5(tmp, "w") as f:
        for name, values in arrays.items():
            if isinstance(values, np.ndarray) and values.dtype != object:
                f.create_dataset(name, data=np.ascontiguousarray(values), track_times=False)
            else:
                data = np.array(list(values), dtype=object)
                f.create_dataset(name, data=data, shape=(len(data),), dtype=str_dtype, track_times=False)
        for key, value in attrs.items():
            if value is None:  # HDF5 attributes have no null: an absent attribute means None
                continue
            f.attrs[key] = json.dumps(value) if isinstance(value, dict | list) else value
    return sha256_file(path)


def read_h5(path: Path) -> tuple[dict[str, np.ndarray | list[str]], dict]:
    """Read back what `write_h5` wrote (strings as lists of str)."""
    with open_h5(path, "r") as f:
        arrays = {
            name: list(ds.asstr()[:]) if h5py.check_string_dtype(ds.dtype) else ds[:]
            for name, ds in f.items()
        }
        attrs = {k: _attr(v) for k, v in f.attrs.items()}
    return arrays, attrs


def write_shard(path: Path, rows: ShardRows, attrs: dict) -> str:
    """Write `rows` to `path` (temporary name, fsync, rename). Returns the file's sha256."""
    arrays: dict[str, np.ndarray | list[str]] = {
        "embeddings": np.asarray(rows.vectors, np.float32),
        "ids": np.asarray(rows.ids, np.int64),
        "class_ids": np.asarray(rows.class_ids, np.int32),
    }
    arrays.update({name: getattr(rows, name) for name in STRING_FIELDS})
    return write_h5(path, arrays, attrs)


def read_shard_ids(path: Path) -> np.ndarray:
    """Only the /ids of a shard."""
    try:
        with open_h5(path, "r") as f:
            return f["ids"][:]
    except (OSError, KeyError) as e:
        raise _damaged(path, e) from None


def read_shard_ids_and(path: Path, field: str) -> tuple[np.ndarray, np.ndarray]:
    """The /ids (int64) and one string field (str: /sha256, /paths, ...) of a shard: a few dozen bytes a
    row."""
    try:
        with open_h5(path, "r") as f:
            return f["ids"][:], f[field].asstr()[:].astype(str)
    except (OSError, KeyError) as e:
        raise _damaged(path, e) from None


def read_shard_ids_and_sha256(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The /ids (int64) and /sha256 (str) of a shard."""
    return read_shard_ids_and(path, "sha256")


def _damaged(path: Path, error: Exception) -> CarsearchError:
    return CarsearchError(
        f"embedding shard {path} is damaged or not a carsearch shard ({error}); re-run embed."
    )


def read_shard(path: Path) -> tuple[ShardRows, dict]:
    """Read one shard; a damaged file is refused with its name."""
    try:
        arrays, attrs = read_h5(path)
        rows = ShardRows(
            vectors=arrays["embeddings"],
            ids=arrays["ids"],
            class_ids=arrays["class_ids"],
            **{n: arrays[n] for n in STRING_FIELDS},
        )
    except (OSError, KeyError) as e:
        raise _damaged(path, e) from None
    return rows, attrs


def _attr(value: object) -> object:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except ValueError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value
