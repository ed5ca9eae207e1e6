"""The resumable embed job: dataset -> HDF5 shards + manifest.json + failures.jsonl.

The shard is the unit of work and of resume: shard i always holds records [i*S, (i+1)*S) of the sorted
record list (minus the images that failed). The shard in progress is saved in parts every --save-every
seconds and on Ctrl-C (embed/parts.py), so a killed job redoes at most that many seconds of work, an
interrupted one none, and the result is identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from torch.utils.data import DataLoader

from carsearch import SCHEMA_VERSION, defaults
from carsearch.datasets import Dataset, read_dataset
from carsearch.embed import resume
from carsearch.embed.encoder import Encoder
from carsearch.embed.engines import Engine, ManifestWriter, Ran, RunSettings, Tally
from carsearch.embed.images import TRANSIENT_REASONS
from carsearch.embed.parts import Piece, part_files, remove_parts, saved_pieces
from carsearch.embed.reader import RecordImages, collate, ctrl_c, decoding_workers, ignore_interrupts
from carsearch.embed.settings import EmbedJob
from carsearch.embed.shard_work import OpenShard, plan_batches
from carsearch.embed.store import MANIFEST_KIND
from carsearch.errors import CarsearchError
from carsearch.fsutil import exclusive_lock, remove_stale_tmp
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
    runtime: str = "torch"  # this run's (embed/runtimes.py); each shard's is in the manifest
    failed_this_run: dict[str, int] = field(default_factory=dict)
    retried_shards: int = 0  # finished shards embedded again by --retry-failed
    changed_images: int = 0  # images found changed by --verify (their shards embedded again)
    records: int = 0  # images the dataset lists
    engine: str = "local"
    workers: int = 0  # local: decoding processes; ray: actors, each holding one network
    workers_lost: int = 0  # ray: workers that died; their shards were embedded by new ones
    left_out: dict[str, int] = field(default_factory=dict)  # files of the folder not read as images
    resumed_images: int = 0  # images of unfinished shards an earlier run saved (not read again)

    @property
    def transient_failures(self) -> int:
        """Skipped images whose reason may go away (a file restored, a permission fixed)."""
        return sum(n for reason, n in self.failed.items() if reason in TRANSIENT_REASONS)

    def to_json(self) -> dict:
        return {**asdict(self), "transient_failures": self.transient_failures}


def embed_dataset(
    job: EmbedJob,
    *,
    engine: Engine | None = None,
    progress: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
) -> EmbedResult:
    """Run `job` (embed/settings.py): embed every image of `job.data_dir` into shards under `job.out`,
    resuming an earlier run of the same settings. Returns what the run did.

    `engine` chooses where the shards are computed (`Engine()`, the default: here; `Engine("ray", ...)`: a
    Ray cluster, whose `job.workers` actors embed on `job.device`). `progress` draws a progress bar;
    `on_batch(images_done, images_total)` is called after each batch (the Ray engine: each shard).
    Raises ProvenanceMismatch (naming the option) for a setting given differently from the folder's,
    CarsearchError for an --out inside the dataset folder or an unreadable dataset or network.
    """
    engine = engine or Engine()
    out = Path(job.out).expanduser().resolve()
    given = job.given(list(resume.OPTIONS))
    s, taken = resume.resolve_settings(given, None if job.overwrite else resume.earlier_manifest(out), out)
    if taken:
        log.info(
            "continuing %s with the settings it was made with: %s",
            out,
            " ".join(resume.OPTIONS[k] + ("" if v is True else f" {v}") for k, v in taken.items()),
        )
    dataset = read_dataset(
        job.data_dir, s["format"], labels_file=s["labels_file"], split=s["split"], bbox_crop=s["bbox_crop"]
    )
    if out == dataset.root:
        raise CarsearchError(
            f"--out {out} would write into the dataset folder itself; choose another folder."
        )
    device, runtime, worker_device, precision = job.device, job.runtime, job.device, s["precision"]
    if engine.name == "ray":
        # The driver only needs the network's provenance; its workers run it on `device`. The precision
        # they use is decided here, so that the fingerprint holds what the shards will.
        if precision == "auto" and (engine.gpus_per_worker or device.startswith("cuda")):
            precision = "bf16"
        if runtime == "auto" and (engine.gpus_per_worker or device.startswith("cuda")):
            runtime = "torch"  # OpenVINO runs on CPUs
        device = "cpu"
    encoder = Encoder.load(
        s["backbone"], s["weights"], s["crop"], device, precision, job.weights_sha256, s["flip"], runtime
    )
    fingerprint = resume.fingerprint(dataset, encoder, s["shard_size"], s["id_start"], s["max_pixels"])
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out):
        if job.overwrite:
            resume.clear(out)
        manifest = resume.check_resume(out, fingerprint, [r.path for r in dataset.records])
        remove_stale_tmp(out)
        plans = _plans(len(dataset.records), s["shard_size"], job.limit)
        resumed = resume.done_shards(out, manifest, plans, dataset.root, job.retry_failed, job.verify)
        read_with = {k: s[k] for k in ("labels_file", "split", "bbox_crop")}
        how = RunSettings(
            engine, job.batch_size, job.workers, worker_device, job.save_every, read_with, progress, on_batch
        )
        result = _run(dataset, encoder, out, fingerprint, manifest, plans, resumed.done, how)
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
    how: RunSettings,
) -> EmbedResult:
    n = len(dataset.records)
    # A shard this run reaches: under --limit the run may stop before a shard's first record.
    todo = [p for p in plans if p.index not in done and p.run_stop > p.start]
    pieces = _saved_pieces(out, todo, fingerprint)
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
            **how.read_with,
        },
        "shard_size": fingerprint["shard_size"],
        "versions": library_versions(),
        "created": (manifest or {}).get("created", now),
    }
    writer = ManifestWriter(out, state, plans, done, resume.read_failures(out, set(done)))
    earlier = sorted({e.get("runtime", "torch") for e in done.values()} - {encoder.runtime})
    if earlier:
        log.info(
            "the finished shards were embedded with %s, this run embeds with %s (their embeddings agree; "
            "manifest.json names each shard's runtime).",
            " and ".join(earlier),
            encoder.runtime,
        )
    saved = sum(p.images for ps in pieces.values() for p in ps)
    if done or saved:
        log.info(
            "resuming %s: %d of %d shards already finished%s (their images are not read again; --verify "
            "re-hashes finished shards to catch files changed since).",
            out,
            len(done),
            len(plans),
            f", {saved} images of unfinished shards saved" if saved else "",
        )
    total = sum(p.run_stop - p.start for p in todo) - saved
    t0 = time.perf_counter()
    engine = how.engine
    tally = Tally(total, how.progress, how.on_batch)
    ran = Ran(0, how.worker_device if engine.name == "ray" else str(encoder.device))
    try:
        if todo and engine.name == "ray":
            from carsearch.embed.ray_engine import run_on_ray

            ran = run_on_ray(dataset, encoder, out, fingerprint, todo, how, writer, tally)
        elif todo:
            ran = _run_local(dataset, encoder, out, fingerprint, todo, pieces, how, writer, tally)
    finally:
        tally.close()
    seconds = time.perf_counter() - t0
    body, images = writer.body, tally.images
    return EmbedResult(
        out=str(out),
        rows=body["rows"],
        shards=len(writer.entries),
        new_shards=len(writer.entries) - len(done),
        resumed_shards=len(done),
        failed=body["failures"],
        images=images,
        seconds=round(seconds, 3),
        images_per_second=round(images / seconds, 2) if images and seconds > 0 else 0.0,
        complete=body["complete"],
        backbone=encoder.backbone,
        precision=encoder.precision,
        device=ran.device,
        runtime=encoder.runtime,
        failed_this_run=dict(sorted(tally.failed.items())),
        records=n,
        engine=engine.name,
        workers=ran.workers,
        workers_lost=ran.workers_lost,
        left_out=dataset.left_out,
        resumed_images=saved,
    )


def _saved_pieces(out: Path, todo: list[resume.ShardPlan], fingerprint: dict) -> dict[int, list[Piece]]:
    """What earlier runs saved of the shards this run writes; the parts of other shards (finished ones
    whose parts outlived their manifest entry, shards of another --limit) are deleted."""
    files, digest = part_files(out), resume.fingerprint_sha256(fingerprint)
    pieces = {
        p.index: saved_pieces(out, p.index, p.start, p.run_stop, digest, files.get(p.index, [])) for p in todo
    }
    for index in set(files) - set(pieces):
        remove_parts(out, index)
    return pieces


def _run_local(
    dataset: Dataset,
    encoder: Encoder,
    out: Path,
    fingerprint: dict,
    todo: list[resume.ShardPlan],
    pieces: dict[int, list[Piece]],
    how: RunSettings,
    writer: ManifestWriter,
    tally: Tally,
) -> Ran:
    """One process embeds; DataLoader workers decode, streaming batches across shard boundaries. The shard
    in progress is saved every `how.save_every` seconds and when the run stops early (Ctrl-C, a decoding
    worker killed), so a rerun goes on from there."""
    workers = defaults.default_workers() if how.workers is None else how.workers
    shards = [OpenShard(out, p, dataset, encoder, fingerprint, pieces[p.index], how.save_every) for p in todo]
    for shard in [s for s in shards if s.begin >= s.plan.run_stop]:  # saved whole by an interrupted run
        writer.add(shard.finish())
    shards = [s for s in shards if s.begin < s.plan.run_stop]
    if not shards:
        return Ran(workers, str(encoder.device))
    loader = DataLoader(
        RecordImages(dataset.root, dataset.records, encoder.preprocessing, fingerprint["max_pixels"]),
        batch_sampler=[b for s in shards for b in plan_batches(s.plan, how.batch_size, s.begin)],
        num_workers=workers,
        collate_fn=collate,
        pin_memory=encoder.device.type == "cuda",
        prefetch_factor=4 if workers else None,
        worker_init_fn=ignore_interrupts,
    )
    shard_iter = iter(shards)
    shard = next(shard_iter)
    with ctrl_c() as interrupted:
        try:
            batches = None  # the loader's iterator: its workers start inside the watched block
            with decoding_workers(
                "what was embedded is kept: run the same command again to resume after it",
                lambda: getattr(batches, "_workers", ()),  # torch's multiprocessing iterator's processes
            ):
                batches = iter(loader)
                for batch in batches:
                    shard.add(batch, encoder.encode(batch.pixels))
                    tally.update(len(batch.index), Counter(r for _, r, _ in batch.failures))
                    if batch.index[-1] == shard.plan.run_stop - 1:
                        writer.add(shard.finish())
                        shard = next(shard_iter, shard)
                    if interrupted[0]:  # a Ctrl-C that a finalizer swallowed
                        raise KeyboardInterrupt
            if interrupted[0]:  # ... or during the last shard's writing: the user still asked to stop
                raise KeyboardInterrupt
        except BaseException as e:
            if shard.buf:
                # A full disk fails this too: then the error that stopped the run is the news.
                with contextlib.suppress(Exception):
                    kept = shard.save()
                    log.info(
                        "saved %d images of %s in progress: the same command resumes after them.",
                        kept,
                        shard.plan.file,
                    )
            if interrupted[0] and not isinstance(e, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            raise
    return Ran(workers, str(encoder.device))
