"""The resumable embed job: dataset -> HDF5 shards + manifest.json + failures.jsonl.

The shard is the unit of work and of resume: shard i always holds records [i*S, (i+1)*S) of the sorted
record list (minus the images that failed), so a killed job redoes only the shard it was writing, and
the result is identical to an uninterrupted run.
"""

from __future__ import annotations

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
from torch.utils.data import DataLoader

from carsearch import SCHEMA_VERSION, defaults, faults
from carsearch.datasets import Dataset, read_dataset
from carsearch.embed import resume
from carsearch.embed.encoder import Encoder
from carsearch.embed.images import TRANSIENT_REASONS
from carsearch.embed.reader import Batch, RecordImages, collate
from carsearch.embed.shards import ShardRows, write_shard
from carsearch.embed.store import FAILURES, MANIFEST, MANIFEST_KIND
from carsearch.errors import CarsearchError
from carsearch.fsutil import (
    exclusive_lock,
    remove_stale_tmp,
    write_json_atomic,
    write_text_atomic,
)
from carsearch.progress import Progress
from carsearch.provenance import library_versions

log = logging.getLogger(__name__)


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
    retried_shards: int = 0  # finished shards embedded again by --retry-failed
    changed_images: int = 0  # images found changed by --verify (their shards embedded again)
    records: int = 0  # images the dataset lists

    @property
    def transient_failures(self) -> int:
        """Skipped images whose reason may go away (a file restored, a permission fixed)."""
        return sum(n for reason, n in self.failed.items() if reason in TRANSIENT_REASONS)

    def to_json(self) -> dict:
        return {**asdict(self), "transient_failures": self.transient_failures}


def embed_dataset(
    data_dir: str | Path,
    out: str | Path,
    *,
    format: str = "auto",
    labels_file: str | Path | None = None,
    split: str = "all",
    bbox_crop: bool = False,
    backbone: str = defaults.BACKBONE,
    weights: str | None = None,
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
    retry_failed: bool = False,
    verify: bool = False,
    flip: bool = False,
    progress: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
) -> EmbedResult:
    """Embed every image of `data_dir` into shards under `out`, resuming an earlier run of the same settings.

    `limit` embeds only the first `limit` records (a later run without it goes on from there).
    `retry_failed` embeds again the finished shards that skipped images (a file restored, a link fixed);
    `verify` re-hashes the images of finished shards and embeds again those whose files changed.
    `flip` averages each image's embedding with its mirror image's (test-time augmentation, 2x the time).
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
    encoder = Encoder.load(backbone, weights, crop, device, precision, weights_sha256, flip)
    fingerprint = resume.fingerprint(dataset, encoder, shard_size, id_start, max_pixels)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out):
        if overwrite:
            resume.clear(out)
        manifest = resume.check_resume(out, fingerprint)
        remove_stale_tmp(out)
        plans = _plans(len(dataset.records), shard_size, limit)
        resumed = resume.done_shards(out, manifest, plans, dataset.root, retry_failed, verify)
        result = _run(
            dataset,
            encoder,
            out,
            fingerprint,
            manifest,
            plans,
            resumed.done,
            batch_size,
            workers,
            progress,
            on_batch,
        )
        result.retried_shards, result.changed_images = resumed.retried, resumed.changed
        return result


def _plans(n: int, size: int, limit: int | None) -> list[resume.ShardPlan]:
    """Shard i holds records [i*size, (i+1)*size); under --limit the run stops early in one of them."""
    stop_at = min(n, limit) if limit else n
    return [
        resume.ShardPlan(i, i * size, min((i + 1) * size, n), min((i + 1) * size, stop_at))
        for i in range(math.ceil(n / size))
    ]


def _run(
    dataset: Dataset,
    encoder: Encoder,
    out: Path,
    fingerprint: dict,
    manifest: dict | None,
    plans: list[resume.ShardPlan],
    done: dict[int, dict],
    batch_size: int,
    workers: int | None,
    progress: bool,
    on_batch: Callable[[int, int], None] | None,
) -> EmbedResult:
    n = len(dataset.records)
    size = fingerprint["shard_size"]
    # A shard this run reaches: under --limit the run may stop before a shard's first record.
    todo = [p for p in plans if p.index not in done and p.run_stop > p.start]
    failures = resume.read_failures(out, set(done))
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
        log.info(
            "resuming %s: %d of %d shards already finished (their images are not read again; --verify "
            "re-hashes them to catch files changed since).",
            out,
            len(done),
            len(plans),
        )
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
            RecordImages(dataset.root, dataset.records, encoder.preprocessing, fingerprint["max_pixels"]),
            batch_sampler=batches,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=encoder.device.type == "cuda",
            prefetch_factor=4 if workers else None,
        )
        bar = Progress(total, "embed", "img", enabled=progress)
        plan_iter = iter(todo)
        plan = next(plan_iter)
        buf: list[tuple[Batch, np.ndarray]] = []
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
                    faults.reached("embed.shard_saved")
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
        records=n,
    )
    return result


def _finish_shard(
    out: Path,
    plan: resume.ShardPlan,
    buf: list[tuple[Batch, np.ndarray]],
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
