"""An index folder: index.faiss + metadata.h5 (id -> path, labels) + index.json (everything else).

index.json is written last and holds the sha256 of the other two, so a truncated, swapped or
half-written file is detected at load and refused by name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np

from carsearch import SCHEMA_VERSION
from carsearch.datasets.levels import LabelLevels
from carsearch.embed.shards import STRING_FIELDS, read_h5, write_h5
from carsearch.errors import CarsearchError
from carsearch.fsutil import atomic_path, read_descriptor, sha256_file, write_json_atomic
from carsearch.index.core import Index

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
META_FILE = "metadata.h5"
INFO_FILE = "index.json"
INDEX_KIND = "carsearch.index"


@dataclass
class Gallery(LabelLevels):
    """Per-id metadata of the indexed images, in one order; `source` points into index.json's sources."""

    ids: np.ndarray
    paths: np.ndarray
    labels: np.ndarray
    make: np.ndarray
    model: np.ndarray
    year: np.ndarray
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


def save_bundle(folder: Path, index: Index, gallery: Gallery, info: dict) -> dict:
    """Write the three files (each to a temporary name, then renamed); index.json last. Returns info."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / INDEX_FILE) as tmp:
        index.save(tmp)
    meta_sha = write_h5(
        folder / META_FILE,
        {
            "ids": gallery.ids.astype(np.int64),
            **{f: list(getattr(gallery, f)) for f in STRING_FIELDS},
            "source": gallery.source.astype(np.int32),
        },
        {"schema_version": SCHEMA_VERSION},
    )
    now = datetime.now(UTC).isoformat(timespec="seconds")
    info = {
        **info,
        "kind": INDEX_KIND,
        "schema_version": SCHEMA_VERSION,
        "metric": "inner_product",
        "factory": index.factory,
        "search_params": index.params,
        "dim": index.d,
        "ntotal": index.ntotal,
        "files": {
            INDEX_FILE: {
                "sha256": sha256_file(folder / INDEX_FILE),
                "bytes": (folder / INDEX_FILE).stat().st_size,
            },
            META_FILE: {"sha256": meta_sha, "bytes": (folder / META_FILE).stat().st_size},
        },
        "faiss_version": faiss.__version__,
        "created": info.get("created", now),
        "updated": now,
    }
    write_json_atomic(folder / INFO_FILE, info)
    return info


def read_info(folder: Path) -> dict:
    return read_descriptor(
        folder / INFO_FILE,
        INDEX_KIND,
        "index description",
        "rebuild the index with `carsearch index build`.",
        missing=f"{folder} has no {INFO_FILE}; build one with "
        f"`carsearch index build EMB_DIR --out {folder}`.",
    )


def _refuse(path: Path, what: str) -> CarsearchError:
    return CarsearchError(f"{path} {what}; rebuild the index with `carsearch index build`.")


def open_bundle(folder: str | Path, verify: bool = True) -> IndexBundle:
    """Load an index folder, checking each file against index.json (sha256, dimension, count, metric)."""
    folder = Path(folder).expanduser().resolve()
    info = read_info(folder)
    for name in (INDEX_FILE, META_FILE):
        path = folder / name
        if not path.is_file():
            raise _refuse(path, "is missing")
        if verify and sha256_file(path) != info["files"][name]["sha256"]:
            raise _refuse(
                path, f"does not match the sha256 recorded in {INFO_FILE} (truncated, swapped or changed)"
            )
    index_path = folder / INDEX_FILE
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
    try:
        arrays, _ = read_h5(folder / META_FILE)
        gallery = Gallery(
            ids=arrays["ids"],
            **{f: np.asarray(arrays[f], dtype=object) for f in STRING_FIELDS},
            source=arrays["source"],
        )
    except (OSError, KeyError):
        raise _refuse(folder / META_FILE, "is damaged") from None
    if len(gallery) != index.ntotal:
        raise _refuse(folder / META_FILE, f"lists {len(gallery)} images but the index holds {index.ntotal}")
    index.set_params(info.get("search_params", ""))
    return IndexBundle(folder, index, gallery, info)
