"""The resumable embed job: dataset -> HDF5 shards + manifest.json + failures.jsonl.

The shard is the unit of work and of resume: shard i always holds records [i*S, (i+1)*S) of the sorted
record list (minus the images that failed), so a killed job redoes only the shard it was writing, and
the result is identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from carsearch import SCHEMA_VERSION, defaults
from carsearch.datasets import Dataset, Record, read_dataset
from carsearch.embed.encoder import Encoder
from carsearch.embed.images import BadImage, load_image, read_file, safe_join
from carsearch.embed.shards import ShardRows, shard_name, write_shard
from carsearch.embed.store import FAILURES, MANIFEST, MANIFEST_KIND, read_manifest
from carsearch.errors import CarsearchError, ProvenanceMismatch
from carsearch.fsutil import (
    exclusive_lock,
    remove_stale_tmp,
    sha256_file,
    write_json_atomic,
    write_text_atomic,
)
from carsearch.models import Preprocessing
from carsearch.progress import Progress
from carsearch.provenance import library_versions

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


@dataclass
class EmbedResult:
    """What one `embed` run did."""

    out: str
    rows: int  # rows in all finished shards
    shards: int  # finished shards
    new_shards: int  # shards written by this run
    resumed_shards: int  # shards found finished and skipped
    failed: dict[str, int]  # reason -> count, over all finished shards
    images: int  # images read by this run
    seconds: float
    images_per_second: float
    complete: bool
    backbone: str
    precision: str
    device: str
    failed_this_run: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


# --- image loading in DataLoader workers ---------------------------------------------------------------


class _RecordImages(torch.utils.data.Dataset):
    def __init__(self, root: Path, records: list[Record], prep: Preprocessing, max_pixels: int) -> None:
        self.root, self.records, self.prep, self.max_pixels = root, records, prep, max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str, str, str]:
        rec, digest = self.records[i], ""
        try:
            data = read_file(safe_join(self.root, rec.path))
            digest = hashlib.sha256(data).hexdigest()
            img = load_image(data, self.max_pixels, None if rec.bbox else self.prep.draft_size)
            if rec.bbox:
                x1, y1, x2, y2 = rec.bbox
                img = img.crop((max(0, x1), max(0, y1), min(img.width, x2 + 1), min(img.height, y2 + 1)))
            return i, self.prep.apply(img), digest, "", ""
        except BadImage as e:
            return i, None, digest, e.reason, e.detail


@dataclass
class _Batch:
    index: list[int]
    ok: list[int]  # positions in `index` whose image decoded
    pixels: torch.Tensor  # uint8 (len(ok), S, S, 3)
    sha256: list[str]
    failures: list[tuple[int, str, str]]  # (record index, reason, detail)

    def pin_memory(self) -> _Batch:
        self.pixels = self.pixels.pin_memory()
        return self


def _collate(items: list[tuple[int, np.ndarray | None, str, str, str]]) -> _Batch:
    ok = [k for k, it in enumerate(items) if it[1] is not None]
    arrays = [items[k][1] for k in ok]
    pixels = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros((0, 1, 1, 3), dtype=torch.uint8)
    return _Batch(
        index=[it[0] for it in items],
        ok=ok,
        pixels=pixels,
        sha256=[it[2] for it in items],
        failures=[(it[0], it[3], it[4]) for it in items if it[1] is None],
    )


# --- the job -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ShardPlan:
    index: int
    start: int
    stop: int  # exclusive; the full range of the shard
    run_stop: int  # exclusive; where this run stops in it (< stop only under --limit)

    @property
    def file(self) -> str:
        return shard_name(self.index)


def _clear(out: Path) -> None:
    """--overwrite: remove what an earlier run wrote (and only that)."""
    for p in [*out.glob("shard-*.h5"), out / MANIFEST, out / FAILURES]:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    remove_stale_tmp(out)


def _fingerprint(dataset: Dataset, encoder: Encoder, shard_size: int, id_start: int, max_pixels: int) -> dict:
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


def _check_resume(out: Path, fingerprint: dict) -> dict | None:
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


def _done_shards(out: Path, manifest: dict | None, plans: list[_ShardPlan]) -> dict[int, dict]:
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


def _read_failures(out: Path, keep: set[int]) -> list[dict]:
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


def embed_dataset(
    data_dir: str | Path,
    out: str | Path,
    *,
    format: str = "auto",
    labels_file: str | Path | None = None,
    split: str = "all",
    bbox_crop: bool = False,
    backbone: str = defaults.BACKBONE,
    weights: str = defaults.WEIGHTS,
    weights_sha256: str | None = None,
    crop: str = defaults.CROP,
    batch_size: int = defaults.BATCH_SIZE,
    workers: int | None = None,
    shard_size: int = defaults.SHARD_SIZE,
    device: str = defaults.DEVICE,
    precision: str = defaults.PRECISION,
    limit: int | None = None,
    overwrite: bool = False,
    id_start: int = 0,
    max_pixels: int = defaults.MAX_PIXELS,
    progress: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
) -> EmbedResult:
    """Embed every image of `data_dir` into shards under `out`, resuming an earlier run of the same settings.

    `limit` embeds only the first `limit` records (a later run without it goes on from there).
    `on_batch(images_done, images_total)` is called after each batch of this run.
    """
    if batch_size < 1 or shard_size < 1:
        raise CarsearchError("--batch-size and --shard-size must be at least 1.")
    if limit is not None and limit < 1:
        raise CarsearchError("--limit must be at least 1.")
    out = Path(out).expanduser().resolve()
    dataset = read_dataset(data_dir, format, labels_file=labels_file, split=split, bbox_crop=bbox_crop)
    if out == dataset.root:
        raise CarsearchError(
            f"--out {out} would write into the dataset folder itself; choose another folder."
        )
    encoder = Encoder.load(backbone, weights, crop, device, precision, weights_sha256)
    fingerprint = _fingerprint(dataset, encoder, shard_size, id_start, max_pixels)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out):
        if overwrite:
            _clear(out)
        manifest = _check_resume(out, fingerprint)
        remove_stale_tmp(out)
        return _run(
            dataset, encoder, out, fingerprint, manifest, batch_size, workers, limit, progress, on_batch
        )


def _run(
    dataset: Dataset,
    encoder: Encoder,
    out: Path,
    fingerprint: dict,
    manifest: dict | None,
    batch_size: int,
    workers: int | None,
    limit: int | None,
    progress: bool,
    on_batch: Callable[[int, int], None] | None,
) -> EmbedResult:
    n = len(dataset.records)
    size = fingerprint["shard_size"]
    stop_at = min(n, limit) if limit else n
    plans = [
        _ShardPlan(i, i * size, min((i + 1) * size, n), min((i + 1) * size, stop_at))
        for i in range(math.ceil(n / size))
    ]
    done = _done_shards(out, manifest, plans)
    todo = [p for p in plans if p.index not in done and p.start < stop_at]
    failures = _read_failures(out, set(done))
    now = datetime.now(UTC).isoformat(timespec="seconds")
    state = {
        "kind": MANIFEST_KIND,
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fingerprint,
        "provenance": encoder.provenance(),
        "dataset": {
            "root": str(dataset.root),
            "format": dataset.format,
            "records": n,
            "records_sha256": fingerprint["records_sha256"],
            "labeled": dataset.labeled,
        },
        "shard_size": size,
        "versions": library_versions(),
        "created": (manifest or {}).get("created", now),
    }

    def save(entries: dict[int, dict]) -> dict:
        # failures.jsonl first: if we die between the two writes, the manifest (the source of truth)
        # still lists only shards whose failures are on disk; extra lines are filtered on resume.
        write_text_atomic(out / FAILURES, "".join(json.dumps(f) + "\n" for f in failures))
        shards = [entries[i] for i in sorted(entries)]
        counts = Counter()
        for e in shards:
            counts.update(e["failures"])
        complete = len(shards) == len(plans) and all(
            e["stop"] == p.stop for e, p in zip(shards, plans, strict=True)
        )
        body = {
            **state,
            "shards": shards,
            "rows": sum(e["rows"] for e in shards),
            "records_done": sum(e["stop"] - e["start"] for e in shards),
            "failures": dict(sorted(counts.items())),
            "complete": complete,
            "updated": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        write_json_atomic(out / MANIFEST, body)
        return body

    entries = dict(done)
    body = save(entries)
    if done:
        log.info("resuming %s: %d of %d shards already finished.", out, len(done), len(plans))
    total = sum(p.run_stop - p.start for p in todo)
    workers = defaults.default_workers() if workers is None else workers
    t0, images, failed_run = time.perf_counter(), 0, Counter()
    if todo:
        batches = [
            list(range(s, min(s + batch_size, p.run_stop)))
            for p in todo
            for s in range(p.start, p.run_stop, batch_size)
        ]
        loader = DataLoader(
            _RecordImages(dataset.root, dataset.records, encoder.preprocessing, fingerprint["max_pixels"]),
            batch_sampler=batches,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=encoder.device.type == "cuda",
            prefetch_factor=4 if workers else None,
        )
        bar = Progress(total, "embed", "img", enabled=progress)
        plan_iter = iter(todo)
        plan = next(plan_iter)
        buf: list[tuple[_Batch, np.ndarray]] = []
        try:
            for batch in loader:
                vectors = encoder.encode(batch.pixels)
                buf.append((batch, vectors))
                images += len(batch.index)
                failed_run.update(r for _, r, _ in batch.failures)
                bar.update(len(batch.index), **({"failed": sum(failed_run.values())} if failed_run else {}))
                if on_batch is not None:
                    on_batch(images, total)
                if batch.index[-1] == plan.run_stop - 1:
                    entries[plan.index] = _finish_shard(
                        out, plan, buf, dataset, encoder, fingerprint, failures
                    )
                    body = save(entries)
                    buf = []
                    plan = next(plan_iter, plan)
        finally:
            bar.close()
    seconds = time.perf_counter() - t0
    result = EmbedResult(
        out=str(out),
        rows=body["rows"],
        shards=len(entries),
        new_shards=len(entries) - len(done),
        resumed_shards=len(done),
        failed=body["failures"],
        images=images,
        seconds=round(seconds, 3),
        images_per_second=round(images / seconds, 2) if images and seconds > 0 else 0.0,
        complete=body["complete"],
        backbone=encoder.backbone,
        precision=encoder.precision,
        device=str(encoder.device),
        failed_this_run=dict(sorted(failed_run.items())),
    )
    return result


def _finish_shard(
    out: Path,
    plan: _ShardPlan,
    buf: list[tuple[_Batch, np.ndarray]],
    dataset: Dataset,
    encoder: Encoder,
    fingerprint: dict,
    failures: list[dict],
) -> dict:
    """Write one shard from its batches; record its failures; return its manifest entry."""
    id_start = fingerprint["id_start"]
    rows_idx = [b.index[k] for b, _ in buf for k in b.ok]
    recs = [dataset.records[i] for i in rows_idx]
    digests = {i: d for b, _ in buf for i, d in zip(b.index, b.sha256, strict=True)}
    dim = encoder.dim
    rows = ShardRows(
        embeddings=np.concatenate([v for _, v in buf]) if rows_idx else np.zeros((0, dim), np.float32),
        ids=np.array([id_start + i for i in rows_idx], dtype=np.int64),
        class_ids=np.array([r.class_id for r in recs], dtype=np.int32),
        paths=[r.path for r in recs],
        labels=[r.label for r in recs],
        make=[r.make for r in recs],
        model=[r.model for r in recs],
        year=[r.year for r in recs],
        sha256=[digests[i] for i in rows_idx],
    )
    shard_failures = [f for b, _ in buf for f in b.failures]
    attrs = {
        **{k: v for k, v in encoder.provenance().items() if k != "weights_source"},
        "schema_version": SCHEMA_VERSION,
        "shard": plan.index,
        "record_start": plan.start,
        "record_stop": plan.run_stop,
        "dataset_root": fingerprint["dataset_root"],
        "versions": library_versions(),
    }
    digest = write_shard(out / plan.file, rows, attrs)
    for i, reason, detail in shard_failures:
        failures.append(
            {
                "shard": plan.index,
                "id": id_start + i,
                "path": dataset.records[i].path,
                "reason": reason,
                "detail": detail,
            }
        )
    return {
        "file": plan.file,
        "index": plan.index,
        "start": plan.start,
        "stop": plan.run_stop,
        "rows": len(rows),
        "sha256": digest,
        "failures": dict(sorted(Counter(r for _, r, _ in shard_failures).items())),
    }
