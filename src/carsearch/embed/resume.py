"""What makes an embed run resumable: its fingerprint, the settings a rerun takes from the folder it
continues, the refusal of a changed setting (naming the option), the shards an earlier run finished
(sha256-checked) and their failures."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from carsearch import SCHEMA_VERSION, defaults
from carsearch.datasets import Dataset
from carsearch.embed.encoder import Encoder
from carsearch.embed.shards import read_shard_ids_and, shard_name
from carsearch.embed.store import FAILURES, MANIFEST, read_manifest
from carsearch.errors import CarsearchError, ProvenanceMismatch
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


def fingerprint_sha256(fingerprint: dict) -> str:
    """One digest of a run's fingerprint: what a part of a shard in progress records of its run."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


# embed's settings (keyword: option) that a rerun takes from the folder it continues when it is not given
# them, and their defaults for a new folder.
OPTIONS = {
    "format": "--format",
    "labels_file": "--labels",
    "split": "--split",
    "bbox_crop": "--bbox-crop",
    "backbone": "--backbone",
    "weights": "--weights",
    "crop": "--crop",
    "flip": "--flip",
    "precision": "--precision",
    "shard_size": "--shard-size",
    "id_start": "--id-start",
    "max_pixels": "--max-pixels",
}
SETTING_DEFAULTS: dict[str, object] = {
    "format": "auto",
    "labels_file": None,
    "split": "all",
    "bbox_crop": False,
    "backbone": defaults.BACKBONE,
    "weights": None,
    "crop": defaults.CROP,
    "flip": False,
    "precision": defaults.PRECISION,
    "shard_size": defaults.SHARD_SIZE,
    "id_start": 0,
    "max_pixels": defaults.MAX_PIXELS,
}


def earlier_manifest(out: Path) -> dict | None:
    """The manifest of an earlier run in `out`, if there is one."""
    return read_manifest(out) if (out / MANIFEST).is_file() else None


def recorded_settings(manifest: dict) -> dict:
    """The settings an embedding folder was made with, as embed's keyword arguments (those it records)."""
    fp, ds = manifest.get("fingerprint", {}), manifest.get("dataset", {})
    prep = fp.get("preprocessing") or {}
    found = {
        "format": fp.get("format"),
        "labels_file": ds.get("labels_file"),
        "split": ds.get("split"),
        "bbox_crop": ds.get("bbox_crop"),
        "backbone": fp.get("backbone"),
        "weights": fp.get("weights"),
        "crop": prep.get("crop"),
        "flip": bool(prep.get("flip", False)) if prep else None,
        "precision": fp.get("precision"),
        "shard_size": fp.get("shard_size"),
        "id_start": fp.get("id_start"),
        "max_pixels": fp.get("max_pixels"),
    }
    return {k: v for k, v in found.items() if v is not None}


def resolve_settings(given: dict, manifest: dict | None, out: Path) -> tuple[dict, dict]:
    """(settings, taken): each setting of OPTIONS as given (not None), else as the folder being continued
    records it, else its default; `taken` holds those taken from the folder that a new folder would not
    get by default (worth saying). A given setting the folder records otherwise is refused here, before
    any network is loaded."""
    recorded = recorded_settings(manifest) if manifest else {}
    settings, taken = {}, {}
    for name, default in SETTING_DEFAULTS.items():
        value = given.get(name)
        if value is None and name in recorded:
            value = recorded[name]
            if value != default and default != "auto":  # format and precision "auto" resolve per run
                taken[name] = value
        settings[name] = default if value is None else value
    if "weights" in taken and taken["weights"] == _first_weights(settings["backbone"]):
        del taken["weights"]  # the backbone's own pretrained weights: the default
    for name in ("backbone", "crop", "flip", "shard_size", "id_start", "max_pixels", "format", "precision"):
        value, old = given.get(name), recorded.get(name)
        if value is None or old is None or value == old or value == "auto":
            continue  # "auto" (format, precision) is compared once it is resolved
        field = name if name in FINGERPRINT_FIELDS else "preprocessing"
        raise mismatch(field, option_text(name, old, value), out)
    return settings, taken


def _first_weights(backbone: str) -> str | None:
    from carsearch.models import get_backbone

    try:
        return get_backbone(backbone).weight_choices[0]
    except CarsearchError:
        return None


def option_text(name: str, old: object, new: object) -> str:
    """'--crop squash, not --crop center': how a folder's setting and this run's differ, as options."""
    opt = OPTIONS[name]

    def show(v: object) -> str:
        return (opt if v else f"no {opt}") if isinstance(v, bool) else f"{opt} {v}"

    return f"{show(old)}, not {show(new)}: leave out {opt} to continue it with the folder's settings"


def mismatch(field: str, what: str, out: Path | None = None) -> ProvenanceMismatch:
    return ProvenanceMismatch(
        f"{out or 'this folder'} was made with {what}; pass --overwrite to start again, or choose another "
        "--out.",
        field,
    )


def check_resume(out: Path, fingerprint: dict, paths: list[str] | None = None) -> dict | None:
    """The earlier manifest if this run may resume it; a refusal naming the first differing field if not.
    `paths`: this run's record paths, to say how the dataset changed when its records differ."""
    if not (out / MANIFEST).exists():
        return None
    manifest = read_manifest(out)
    old = manifest["fingerprint"]
    for name in FINGERPRINT_FIELDS:
        was, now = old.get(name), fingerprint.get(name)
        if was != now:
            if name in ("records", "records_sha256") and paths is not None and manifest.get("complete"):
                raise ProvenanceMismatch(_dataset_change(out, manifest, paths), name)
            raise mismatch(name, _difference(name, was, now), out)
    return manifest


def _dataset_change(out: Path, manifest: dict, paths: list[str]) -> str:
    """How a finished folder's dataset changed since (photos added, removed; else labels), and the way to
    embed only what was added: ids are record positions, so new photos get a folder (and ids) of their own."""
    earlier: set[str] = {row["path"] for row in read_failures(out, {e["index"] for e in manifest["shards"]})}
    for entry in manifest["shards"]:
        earlier.update(read_shard_ids_and(out / entry["file"], "paths")[1].tolist())
    added, removed = len(set(paths) - earlier), len(earlier - set(paths))
    root, fp = manifest["dataset"]["root"], manifest["fingerprint"]
    if not added and not removed:
        return (
            f"{out} was made from another version of {root}: the same photos, now with other labels or "
            "another layout; pass --overwrite to embed them again."
        )
    change = f"{added} photo{'s' * (added != 1)} added" if added else ""
    if removed:
        change += f"{' and ' if change else ''}{removed} removed"
    if removed:
        way = "pass --overwrite to embed the folder again."
    else:
        next_id = fp["id_start"] + fp["records"]
        way = (
            "to embed only the new ones, move them into a folder of their own and run `carsearch embed NEW "
            f"--out NEW_EMB --id-start {next_id}`, then `carsearch index add INDEX NEW_EMB`; or pass "
            "--overwrite to embed the whole folder again."
        )
    return f"{out} was made from an earlier version of {root}: {change} since. {way[0].upper()}{way[1:]}"


def _difference(name: str, was: object, now: object) -> str:
    """How one fingerprint field differs, in the words of the option that sets it where one does."""
    if name in ("records", "records_sha256"):
        return "another version of its dataset (the dataset's files or labels changed since)"
    if name == "dataset_root":
        return f"the dataset {was}, not {now}: give DATA_DIR {was} to continue it"
    if name in OPTIONS:
        return option_text(name, was, now)
    if name == "preprocessing" and isinstance(was, dict) and isinstance(now, dict):
        key = next(k for k in sorted({*was, *now}) if was.get(k) != now.get(k))
        if key in ("crop", "flip"):
            return option_text(key, was.get(key, False), now.get(key, False))
        return f"preprocessing {key} {was.get(key)!r}, not {now.get(key)!r} (another carsearch version?)"
    if name == "weights_sha256":
        return f"other weights (sha256 {str(was)[:12]}..., now {str(now)[:12]}...): the weights file changed"
    return f"{name} {was!r}, not {now!r}"


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
