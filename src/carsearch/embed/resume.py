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


@dataclass
class Resumed:
    """Finished shards this run keeps, and why others are embedded again."""

    done: dict[int, dict]
    retried: int = 0  # shards with failures embedded again (--retry-failed)
    changed: int = 0  # images whose file changed since their shard was written (--verify)


def done_shards(
    out: Path,
    manifest: dict | None,
    plans: list[ShardPlan],
    root: Path,
    retry_failed: bool = False,
    verify: bool = False,
) -> Resumed:
    """Manifest entries still valid for this run: file present, sha256 matching, range covering the run;
    with `retry_failed`, none that skipped images; with `verify`, none holding an image whose file has
    changed since (its sha256 differs from the one stored in the shard)."""
    result = Resumed({})
    if manifest is None:
        return result
    by_index = {p.index: p for p in plans}
    for entry in manifest["shards"]:
        plan = by_index.get(entry["index"])
        if plan is None or entry["start"] != plan.start or entry["stop"] < plan.run_stop:
            continue
        path = out / entry["file"]
        if not (path.is_file() and sha256_file(path) == entry["sha256"]):
            log.warning("shard %s is missing or damaged; it will be embedded again.", path)
            continue
        if retry_failed and entry["failures"]:
            result.retried += 1
            continue
        if verify:
            changed = changed_images(path, root)
            if changed:
                log.warning(
                    "%s: %d image(s) changed since they were embedded; embedding again.", path, changed
                )
                result.changed += changed
                continue
        result.done[plan.index] = entry
    return result


def changed_images(shard: Path, root: Path) -> int:
    """How many images of a shard no longer match the sha256 stored for them (changed or gone)."""
    from carsearch.embed.shards import read_shard

    rows = read_shard(shard)[0]
    changed = 0
    for rel, digest in zip(rows.paths, rows.sha256, strict=True):
        try:
            changed += sha256_file(root / rel) != digest
        except OSError:
            changed += 1
    return changed


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
