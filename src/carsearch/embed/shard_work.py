"""One shard's work, shared by both engines: its images read and framed, embedded, written to its file.

The local engine streams batches across shards through a DataLoader and calls `finish_shard` at each
shard's end; a Ray worker runs `embed_plan` for a whole shard. Batches always start at the shard's first
record and hold `batch_size` records, so both engines feed the network the same batches and write the
same bytes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from carsearch import SCHEMA_VERSION
from carsearch.datasets import Dataset
from carsearch.embed.encoder import Encoder
from carsearch.embed.reader import Batch, RecordImages, collate
from carsearch.embed.resume import ShardPlan
from carsearch.embed.shards import ShardRows, write_shard
from carsearch.provenance import library_versions


@dataclass
class ShardDone:
    """A written shard: its manifest entry, its failures.jsonl rows, and what reading it took."""

    entry: dict
    failures: list[dict]
    images: int = 0
    failed: Counter = field(default_factory=Counter)


def plan_batches(plan: ShardPlan, batch_size: int) -> list[list[int]]:
    """The record indices of each batch of one shard, as both engines cut them."""
    return [
        list(range(s, min(s + batch_size, plan.run_stop)))
        for s in range(plan.start, plan.run_stop, batch_size)
    ]


def read_batches(images: RecordImages, batches: list[list[int]], threads: int) -> Iterator[Batch]:
    """Decode batches with `threads` threads (Pillow releases the GIL while decoding), one batch ahead."""
    if threads <= 1:
        for idx in batches:
            yield collate([images[i] for i in idx])
        return
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.map(images.__getitem__, idx) for idx in batches[:1]]
        for k in range(len(batches)):
            if k + 1 < len(batches):
                futures.append(pool.map(images.__getitem__, batches[k + 1]))
            yield collate(list(futures[k]))
            futures[k] = None  # let the decoded batch go


def embed_plan(
    out: Path,
    plan: ShardPlan,
    dataset: Dataset,
    encoder: Encoder,
    fingerprint: dict,
    batch_size: int,
    threads: int = 1,
) -> ShardDone:
    """Read, embed and write one whole shard (a Ray worker's unit of work)."""
    images = RecordImages(dataset.root, dataset.records, encoder.preprocessing, fingerprint["max_pixels"])
    buf = [
        (b, encoder.encode(b.pixels)) for b in read_batches(images, plan_batches(plan, batch_size), threads)
    ]
    done = finish_shard(out, plan, buf, dataset, encoder, fingerprint)
    done.images = sum(len(b.index) for b, _ in buf)
    done.failed = Counter(r for b, _ in buf for _, r, _ in b.failures)
    return done


def finish_shard(
    out: Path,
    plan: ShardPlan,
    buf: list[tuple[Batch, np.ndarray]],
    dataset: Dataset,
    encoder: Encoder,
    fingerprint: dict,
) -> ShardDone:
    """Write one shard from its batches (temporary name, fsync, rename); return its manifest entry and
    failure rows."""
    id_start = fingerprint["id_start"]
    rows_idx = [b.index[k] for b, _ in buf for k in b.ok]
    recs = [dataset.records[i] for i in rows_idx]
    digests = {i: d for b, _ in buf for i, d in zip(b.index, b.sha256, strict=True)}
    rows = ShardRows(
        embeddings=np.concatenate([v for _, v in buf])
        if rows_idx
        else np.zeros((0, encoder.dim), np.float32),
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
    failures = [
        {
            "shard": plan.index,
            "id": id_start + i,
            "path": dataset.records[i].path,
            "reason": reason,
            "detail": detail,
        }
        for i, reason, detail in shard_failures
    ]
    entry = {
        "file": plan.file,
        "index": plan.index,
        "start": plan.start,
        "stop": plan.run_stop,
        "rows": len(rows),
        "sha256": digest,
        "failures": dict(sorted(Counter(r for _, r, _ in shard_failures).items())),
        "runtime": encoder.runtime,
    }
    return ShardDone(entry, failures)
