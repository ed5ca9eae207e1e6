"""One shard's work, shared by both engines: its images read and framed, embedded, written to its file.

An `OpenShard` collects a shard's embedded batches, saves them as parts every `--save-every` seconds
(embed/parts.py) and writes the shard at its end. The local engine streams batches across shards through
a DataLoader into one `OpenShard` after another; a Ray worker runs `embed_plan` for a whole shard. Batches
always start at the shard's first record and hold `batch_size` records, so both engines feed the network
the same batches and write the same bytes, interrupted or not."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from carsearch import SCHEMA_VERSION, defaults, faults
from carsearch.datasets import Dataset
from carsearch.datasets.attributes import ATTRIBUTES
from carsearch.embed.encoder import Encoder
from carsearch.embed.parts import Piece, join_rows, part_files, saved_pieces, write_part
from carsearch.embed.reader import Batch, RecordImages, collate
from carsearch.embed.resume import ShardPlan, fingerprint_sha256
from carsearch.embed.shards import ShardRows, write_shard
from carsearch.provenance import library_versions


@dataclass
class ShardDone:
    """A written shard: its manifest entry, its failures.jsonl rows, and what reading it took."""

    entry: dict
    failures: list[dict]
    images: int = 0
    failed: Counter = field(default_factory=Counter)


def plan_batches(plan: ShardPlan, batch_size: int, begin: int | None = None) -> list[list[int]]:
    """The record indices of each batch of one shard from `begin` on (default: its first record), as both
    engines cut them: from the shard's first record, `batch_size` at a time (a saved part ends on one of
    these boundaries, so a resumed shard gets the batches of an uninterrupted run)."""
    first = plan.start if begin is None else begin
    return [
        list(range(s, min(s + batch_size, plan.run_stop))) for s in range(first, plan.run_stop, batch_size)
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


class OpenShard:
    """A shard being embedded: the pieces an earlier run saved, the batches embedded since the last save,
    saved as a part every `save_every` seconds (and by `save()` when the run is interrupted)."""

    def __init__(
        self,
        out: Path,
        plan: ShardPlan,
        dataset: Dataset,
        encoder: Encoder,
        fingerprint: dict,
        pieces: list[Piece],
        save_every: float = defaults.SAVE_EVERY,
    ) -> None:
        self.out, self.plan, self.dataset, self.encoder, self.fingerprint = (
            out,
            plan,
            dataset,
            encoder,
            fingerprint,
        )
        self.pieces = list(pieces)
        self.buf: list[tuple[Batch, np.ndarray]] = []
        self.save_every = save_every
        self.next_save = time.monotonic() + save_every

    @property
    def begin(self) -> int:
        """The first record no piece holds: where this run's batches of the shard start."""
        return self.pieces[-1].stop if self.pieces else self.plan.start

    def add(self, batch: Batch, embeddings: np.ndarray) -> None:
        batch.pixels = batch.pixels[:0]  # the pixels are embedded: only the rows stay in memory
        self.buf.append((batch, embeddings))
        if time.monotonic() >= self.next_save and batch.index[-1] + 1 < self.plan.run_stop:
            self.save()

    def save(self) -> int:
        """Save the batches embedded since the last save as a part; returns how many records the saved
        parts now hold."""
        if self.buf:
            piece = _piece(self.buf, self.dataset, self.fingerprint["id_start"], self.encoder.dim)
            write_part(
                self.out, self.plan.index, self.plan.start, piece, fingerprint_sha256(self.fingerprint)
            )
            self.pieces.append(piece)
            self.buf = []
            faults.reached("embed.part_saved")
        self.next_save = time.monotonic() + self.save_every
        return self.begin - self.plan.start

    def finish(self) -> ShardDone:
        """Write the whole shard (temporary name, fsync, rename); its manifest entry and failure rows."""
        pieces = self.pieces
        if self.buf:
            pieces = [*pieces, _piece(self.buf, self.dataset, self.fingerprint["id_start"], self.encoder.dim)]
        done = finish_shard(self.out, self.plan, pieces, self.dataset, self.encoder, self.fingerprint)
        self.pieces, self.buf = pieces, []  # written: nothing of it is left to save
        return done


def _piece(buf: list[tuple[Batch, np.ndarray]], dataset: Dataset, id_start: int, dim: int) -> Piece:
    """The rows of consecutive embedded batches."""
    rows_idx = [b.index[k] for b, _ in buf for k in b.ok]
    recs = [dataset.records[i] for i in rows_idx]
    digests = {i: d for b, _ in buf for i, d in zip(b.index, b.sha256, strict=True)}
    rows = ShardRows(
        vectors=np.concatenate([v for _, v in buf]) if rows_idx else np.zeros((0, dim), np.float32),
        ids=np.array([id_start + i for i in rows_idx], dtype=np.int64),
        class_ids=np.array([r.class_id for r in recs], dtype=np.int32),
        paths=[r.path for r in recs],
        labels=[r.label for r in recs],
        **{a: [getattr(r, a) for r in recs] for a in ATTRIBUTES},
        sha256=[digests[i] for i in rows_idx],
    )
    failures = [f for b, _ in buf for f in b.failures]
    return Piece(buf[0][0].index[0], buf[-1][0].index[-1] + 1, rows, failures)


def embed_plan(
    out: Path,
    plan: ShardPlan,
    dataset: Dataset,
    encoder: Encoder,
    fingerprint: dict,
    batch_size: int,
    threads: int = 1,
    save_every: float = defaults.SAVE_EVERY,
) -> ShardDone:
    """Read, embed and write one whole shard (a Ray worker's unit of work), going on from the parts an
    earlier worker saved."""
    files = part_files(out).get(plan.index, [])
    pieces = saved_pieces(out, plan.index, plan.start, plan.run_stop, fingerprint_sha256(fingerprint), files)
    shard = OpenShard(out, plan, dataset, encoder, fingerprint, pieces, save_every)
    images = RecordImages(dataset.root, dataset.records, encoder.preprocessing, fingerprint["max_pixels"])
    read, failed = 0, Counter()
    for b in read_batches(images, plan_batches(plan, batch_size, shard.begin), threads):
        shard.add(b, encoder.encode(b.pixels))
        read += len(b.index)
        failed.update(r for _, r, _ in b.failures)
    done = shard.finish()
    done.images, done.failed = read, failed
    return done


def finish_shard(
    out: Path,
    plan: ShardPlan,
    pieces: list[Piece],
    dataset: Dataset,
    encoder: Encoder,
    fingerprint: dict,
) -> ShardDone:
    """Write one shard from its pieces (temporary name, fsync, rename); return its manifest entry and
    failure rows."""
    id_start = fingerprint["id_start"]
    rows = join_rows(pieces, encoder.dim)
    shard_failures = [f for p in pieces for f in p.failures]
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
