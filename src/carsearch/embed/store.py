"""Reading an embedding folder (manifest.json + shards) back as one set of vectors and metadata."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from carsearch.datasets.attributes import attribute_fields
from carsearch.datasets.levels import LabelLevels
from carsearch.embed.shards import STRING_FIELDS, ShardRows, read_shard
from carsearch.errors import CarsearchError
from carsearch.fsutil import read_descriptor
from carsearch.h5state import check_recorded

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
MANIFEST_KIND = "carsearch.embeddings"


@dataclass
@attribute_fields("np.ndarray", after="labels")  # make, model, year (datasets/attributes.ATTRIBUTES)
class EmbeddingSet(LabelLevels):
    """All rows of an embedding folder: vectors (n, d) float32 and per-row metadata arrays."""

    vectors: np.ndarray
    ids: np.ndarray
    class_ids: np.ndarray
    paths: np.ndarray
    labels: np.ndarray
    sha256: np.ndarray
    manifest: dict
    folder: Path

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def root(self) -> Path:
        return Path(self.manifest["dataset"]["root"])

    @property
    def provenance(self) -> dict:
        return self.manifest["provenance"]

    def subset(self, index: np.ndarray) -> EmbeddingSet:
        """Rows selected by a boolean mask or an index array."""
        pick = {name: getattr(self, name)[index] for name in ("vectors", "ids", "class_ids", *STRING_FIELDS)}
        return replace(self, **pick)


def read_manifest(folder: Path) -> dict:
    return read_descriptor(
        folder / MANIFEST,
        MANIFEST_KIND,
        "embeddings manifest",
        "re-run embed with --overwrite.",
        missing=lambda: not_embeddings(folder),
    )


def not_embeddings(folder: Path) -> str:
    """What to do with a folder given as an embedding folder that has no manifest: a photo folder is
    embedded into another folder first, an index folder is not its embeddings."""
    from carsearch.datasets import holds_photos

    make = f"make an embedding folder with `carsearch embed DATA_DIR --out {folder}`"
    if not folder.is_dir():
        return f"{folder} has no {MANIFEST} (the folder does not exist); {make}."
    if (folder / "index.json").is_file():
        return (
            f"{folder} is an index, not an embedding folder: give the embedding folder it was built from "
            f"(`carsearch index info {folder}` names it)."
        )
    if holds_photos(folder):
        return (
            f"{folder} holds photos, not embeddings: embed them first with `carsearch embed {folder} --out "
            "EMB_DIR` (a new folder) and give EMB_DIR here."
        )
    return f"{folder} has no {MANIFEST}; {make}."


def require_complete(folder: str | Path, allow_incomplete: bool = False) -> None:
    """Refuse an embedding folder whose embed run has not finished (unless `allow_incomplete`), saying how
    far it got and how to finish it."""
    folder = Path(folder).expanduser().resolve()
    manifest = read_manifest(folder)
    if manifest.get("complete", False) or allow_incomplete:
        return
    from carsearch.embed.parts import saved_images

    records, saved = manifest["dataset"]["records"], saved_images(folder)
    more = f" (and {saved} more saved in an unfinished one)" if saved else ""
    raise CarsearchError(
        f"{folder} is incomplete: {manifest.get('records_done', 0)} of {records} photos embedded in "
        f"finished shards{more}; run `carsearch embed {manifest['dataset']['root']} --out {folder}` again "
        "to finish it, or pass --allow-incomplete to index the finished shards."
    )


def read_listed_shard(folder: Path, entry: dict, verify: bool = True) -> tuple[ShardRows, dict]:
    """A shard a manifest lists, refused by name when it is missing, (with `verify`) does not match the
    sha256 the manifest records for it, or holds another number of rows than the manifest says."""
    path = folder / entry["file"]
    if not path.is_file():
        raise CarsearchError(f"shard {path} listed in the manifest is missing; re-run embed to rebuild it.")
    if verify:
        check_recorded(path, entry["sha256"], "shard", "re-run embed to rebuild it.")
    rows, attrs = read_shard(path)
    if len(rows) != entry["rows"]:
        raise CarsearchError(f"shard {path} holds {len(rows)} rows, its manifest says {entry['rows']}.")
    return rows, attrs


def load_embeddings(folder: str | Path, verify: bool = True, shards: list[str] | None = None) -> EmbeddingSet:
    """Load every finished shard of an embedding folder (or only the files named in `shards`).

    With `verify`, each shard's sha256 is checked against the manifest, so a damaged or swapped shard is
    refused by name rather than silently indexed.
    """
    folder = Path(folder).expanduser().resolve()
    manifest = read_manifest(folder)
    if not manifest.get("complete", False):
        log.warning(
            "%s is incomplete (%d of %d records embedded); run embed again to finish it.",
            folder,
            manifest.get("records_done", 0),
            manifest["dataset"]["records"],
        )
    entries = [e for e in manifest["shards"] if shards is None or e["file"] in shards]
    dim = int(manifest["provenance"]["dim"])
    # Vectors go straight into one array, shard by shard: concatenating at the end held them twice.
    vectors = np.empty((sum(e["rows"] for e in entries), dim), np.float32)
    parts, at = [], 0
    for entry in entries:
        rows = read_listed_shard(folder, entry, verify)[0]
        vectors[at : at + len(rows)] = rows.vectors
        at += len(rows)
        rows.vectors = None  # the shard's own copy can go now
        parts.append(rows)
    return EmbeddingSet(
        vectors=vectors,
        ids=np.concatenate([p.ids for p in parts]) if parts else np.zeros(0, np.int64),
        class_ids=np.concatenate([p.class_ids for p in parts]) if parts else np.zeros(0, np.int32),
        **{n: np.array([v for p in parts for v in getattr(p, n)], dtype=object) for n in STRING_FIELDS},
        manifest=manifest,
        folder=folder,
    )


def write_embedding_set(emb: EmbeddingSet, out: str | Path, note: str) -> Path:
    """Write `emb` (typically a subset: a protocol's gallery) as an embedding folder of one shard, with the
    same provenance and a manifest saying what it is (`note`), so every stage can take it as a collection."""
    from datetime import UTC, datetime

    from carsearch.embed.shards import ShardRows, shard_name, write_shard
    from carsearch.fsutil import write_json_atomic

    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = ShardRows(
        vectors=emb.vectors,
        ids=emb.ids,
        class_ids=emb.class_ids,
        **{name: [str(v) for v in getattr(emb, name)] for name in STRING_FIELDS},
    )
    attrs = {k: v for k, v in emb.provenance.items() if k != "weights_source"}
    digest = write_shard(out / shard_name(0), rows, {**attrs, "subset_of": str(emb.folder)})
    now = datetime.now(UTC).isoformat(timespec="seconds")
    entry = {"file": shard_name(0), "index": 0, "start": 0, "stop": len(emb), "rows": len(emb)}
    write_json_atomic(
        out / MANIFEST,
        {
            **emb.manifest,
            "shards": [{**entry, "sha256": digest, "failures": {}}],
            "rows": len(emb),
            "failures": {},
            "subset_of": {"embeddings": str(emb.folder), "note": note},
            "created": now,
            "updated": now,
        },
    )
    return out
