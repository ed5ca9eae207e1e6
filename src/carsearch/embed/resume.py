"""What makes an embed run resumable: its fingerprint, the refusal of a changed setting, the shards an
earlier run finished (sha256-checked) and their failures."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from carsearch import SCHEMA_VERSION
from carsearch.datasets import Dataset
from carsearch.embed.encoder import Encoder
from carsearch.embed.shards import shard_name
from carsearch.embed.store import FAILURES, MANIFEST, read_manifest
from carsearch.errors import ProvenanceMismatch
from carsearch.fsutil import remove_stale_tmp, sha256_file

log = logging.getLogger(__name__)

# Settings that change the bytes of the shards: a resume with any of them different is refused.
FINGERPRINT_FIELDS = (
    "schema_version",
    "dataset_root",
    "format",
    "records",
    "records_sha256",
    "backbone",
    "weights",
    "weights_sha256",
    "preprocessing",
    "precision",
    "shard_size",
    "id_start",
    "max_pixels",
)


@dataclass(frozen=True)
class ShardPlan:
    index: int
    start: int
    stop: int  # exclusive; the full range of the shard
    run_stop: int  # exclusive; where this run stops in it (< stop only under --limit)

    @property
    def file(self) -> str:
        return shard_name(self.index)


def clear(out: Path) -> None:
    """--overwrite: remove what an earlier run wrote (and only that)."""
    for p in [*out.glob("shard-*.h5"), out / MANIFEST, out / FAILURES]:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    remove_stale_tmp(out)


def fingerprint(dataset: Dataset, encoder: Encoder, shard_size: int, id_start: int, max_pixels: int) -> dict:
    prov = encoder.provenance()
    return {
        "schema_version": SCHEMA_VERSION,
        "dataset_root": str(dataset.root),
        "format": dataset.format,
        "records": len(dataset.records),
        "records_sha256": dataset.records_sha256(),
        "backbone": prov["backbone"],
        "weights": prov["weights"],
        "weights_sha256": prov["weights_sha256"],
        "preprocessing": prov["preprocessing"],
        "precision": prov["precision"],
        "shard_size": shard_size,
        "id_start": id_start,
        "max_pixels": max_pixels,
    }


def check_resume(out: Path, fingerprint: dict) -> dict | None:
    """The earlier manifest if this run may resume it; a refusal naming the first differing field if not."""
    if not (out / MANIFEST).exists():
        return None
    manifest = read_manifest(out)
    old = manifest["fingerprint"]
    for name in FINGERPRINT_FIELDS:
        if old.get(name) != fingerprint.get(name):
            what = (
                "the dataset's files or labels changed"
                if name in ("records", "records_sha256")
                else (f"it was {old.get(name)!r}, now {fingerprint.get(name)!r}")
            )
            raise ProvenanceMismatch(
                f"{out} was started with a different {name} ({what}); run with the same settings to resume, "
                "pass --overwrite to start again, or choose another --out.",
                name,
            )
    return manifest


def done_shards(out: Path, manifest: dict | None, plans: list[ShardPlan]) -> dict[int, dict]:
    """Manifest entries still valid for this run: file present, sha256 matching, range covering the run."""
    if manifest is None:
        return {}
    by_index = {p.index: p for p in plans}
    done = {}
    for entry in manifest["shards"]:
        plan = by_index.get(entry["index"])
        if plan is None or entry["start"] != plan.start or entry["stop"] < plan.run_stop:
            continue
        path = out / entry["file"]
        if path.is_file() and sha256_file(path) == entry["sha256"]:
            done[plan.index] = entry
        else:
            log.warning("shard %s is missing or damaged; it will be embedded again.", path)
    return done


def read_failures(out: Path, keep: set[int]) -> list[dict]:
    path = out / FAILURES
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if row.get("shard") in keep:
                rows.append(row)
    return rows
