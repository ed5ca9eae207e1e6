"""Reading embedding folders shard by shard for an index build whose memory follows the index, not the
collection (faiss contrib's `knn_ground_truth` streams its database the same way).

Pass 1 reads every shard once: the per-image metadata, and the vectors at a few chosen row positions (the
training sample, the tuning queries, the calibration sample). Pass 2 reads them again: each shard's vectors
are added to the index and searched exactly by the tuning queries, whose best neighbours are merged across
shards. At no time are more than one shard and the samples in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from carsearch.embed.shards import STRING_FIELDS, ShardRows, read_shard_ids, read_shard_ids_and_sha256
from carsearch.embed.store import read_listed_shard, read_manifest
from carsearch.eval.neighbors import exact_search
from carsearch.index.store import Gallery
from carsearch.provenance import check_compatible

log = logging.getLogger(__name__)

ADD_BATCH = 4096


@dataclass
class Source:
    """One embedding folder as an index build sees it: its manifest, not its vectors."""

    folder: Path
    manifest: dict

    @property
    def provenance(self) -> dict:
        return self.manifest["provenance"]


def open_sources(emb_dirs: list[str | Path]) -> list[Source]:
    """Manifests of the folders, refusing folders whose embeddings live in different spaces."""
    sources = []
    for d in emb_dirs:
        folder = Path(d).expanduser().resolve()
        manifest = read_manifest(folder)
        if not manifest.get("complete", False):
            log.warning("%s is incomplete; run embed again to finish it.", folder)
        sources.append(Source(folder, manifest))
    for other in sources[1:]:
        check_compatible(sources[0].provenance, other.provenance, str(sources[0].folder), str(other.folder))
    return sources


def unseen_files(digests: np.ndarray, known: set[str]) -> np.ndarray:
    """(n,) bool: rows whose file (sha256 hex) is not in `known`; rows without a sha256 (vectors added
    without a file) always count as unseen."""
    return np.array([not d or d not in known for d in digests.tolist()], bool)


class ShardStream:
    """The shards of several embedding folders in one order: folder by folder, shard by shard."""

    def __init__(
        self, sources: list[Source], exclude: np.ndarray | None = None, allow_duplicates: bool = True
    ) -> None:
        """`exclude`: ids left out of every pass (an audit's duplicates or suspects). Without
        `allow_duplicates`, a row whose file (sha256) an earlier folder already holds is left out too
        (`duplicates` counts them): the same photos embedded twice would come back twice in every search."""
        self.sources = sources
        self.entries = [(i, s, e) for i, s in enumerate(sources) for e in s.manifest["shards"]]
        self.duplicates = 0
        if not allow_duplicates and len(sources) > 1:
            repeated = self._repeated_files()
            self.duplicates = len(repeated)
            exclude = (
                repeated if exclude is None else np.concatenate([np.asarray(exclude, np.int64), repeated])
            )
        self.exclude = np.unique(np.asarray(exclude, np.int64)) if exclude is not None else None
        if self.exclude is not None and len(self.exclude) == 0:
            self.exclude = None
        self.n = sum(e["rows"] for _, _, e in self.entries)
        self.excluded = 0
        if self.exclude is not None:
            # Only the ids are read here (a few bytes a row), so that n is known before pass 1.
            self.excluded = sum(
                int(np.isin(read_shard_ids(src.folder / e["file"]), self.exclude).sum())
                for _, src, e in self.entries
            )
            self.n -= self.excluded
        self.d = int(sources[0].provenance["dim"])

    def _repeated_files(self) -> np.ndarray:
        """Ids of rows whose file (sha256) a row of an earlier folder holds (within a folder, the embed job
        already gave each file one row)."""
        seen: set[str] = set()
        repeated: list[np.ndarray] = []
        for i, source in enumerate(self.sources):
            mine: list[tuple[np.ndarray, np.ndarray]] = [
                read_shard_ids_and_sha256(source.folder / e["file"]) for j, _, e in self.entries if j == i
            ]
            for ids, digests in mine:
                repeated.append(ids[~unseen_files(digests, seen)])
            seen.update(d for _, digests in mine for d in digests if d)
        return np.concatenate(repeated) if repeated else np.zeros(0, np.int64)

    def _shards(self, verify: bool) -> Iterator[tuple[int, int, ShardRows]]:
        """(source index, first row position, rows) per shard."""
        start = 0
        for i, source, entry in self.entries:
            rows = read_listed_shard(source.folder, entry, verify)[0]
            if self.exclude is not None:
                rows = rows.select(~np.isin(rows.ids, self.exclude))
            yield i, start, rows
            start += len(rows)

    def metadata_and_rows(self, positions: np.ndarray) -> tuple[Gallery, np.ndarray]:
        """Pass 1: the gallery metadata of every row, and the vectors at `positions` (sorted, unique)."""
        picked = np.empty((len(positions), self.d), np.float32)
        parts: dict[str, list] = {f: [] for f in ("ids", *STRING_FIELDS, "source")}
        for i, start, rows in self._shards(verify=True):
            stop = start + len(rows)
            lo, hi = np.searchsorted(positions, [start, stop])
            picked[lo:hi] = rows.vectors[positions[lo:hi] - start]
            parts["ids"].append(np.asarray(rows.ids, np.int64))
            for f in STRING_FIELDS:
                parts[f].append(np.asarray(getattr(rows, f), dtype=object))
            parts["source"].append(np.full(len(rows), i, np.int32))
        gallery = Gallery(
            **{
                f: np.concatenate(v) if v else np.zeros(0, np.int64 if f == "ids" else object)
                for f, v in parts.items()
            }
        )
        return gallery, picked

    def add_and_search(
        self, index: faiss.Index, queries: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pass 2: add every shard's vectors (with their ids) to `index`; returns the exact k nearest ids of
        `queries` over all shards (similarities, ids), merged shard by shard."""
        heap = faiss.ResultHeap(len(queries), k, keep_max=True)
        q = np.ascontiguousarray(queries, np.float32)
        for _, _, rows in self._shards(verify=False):
            if len(rows) == 0:
                continue
            x = np.ascontiguousarray(rows.vectors, np.float32)
            ids = np.ascontiguousarray(rows.ids, np.int64)
            # In slices: faiss's encoders allocate several copies of what they are given (residuals,
            # rotated vectors); a whole 16k-row shard of 2048-d vectors would cost a gigabyte at once.
            for s in range(0, len(x), ADD_BATCH):
                index.add_with_ids(x[s : s + ADD_BATCH], ids[s : s + ADD_BATCH])
            sims, found = exact_search(x, ids, q, k, pad=True)  # the oracle, shard by shard
            heap.add_result(np.ascontiguousarray(sims, np.float32), np.ascontiguousarray(found, np.int64))
        heap.finalize()
        return heap.D, heap.I
