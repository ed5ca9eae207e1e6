"""What both embed engines share: the engine settings, the manifest writer of the driver, and the tally
of this run's images (progress bar and callback)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from carsearch import defaults, faults
from carsearch.embed.parts import remove_parts
from carsearch.embed.resume import ShardPlan
from carsearch.embed.shard_work import ShardDone
from carsearch.embed.store import FAILURES, MANIFEST
from carsearch.errors import CarsearchError
from carsearch.fsutil import write_json_atomic, write_text_atomic
from carsearch.progress import Progress

ENGINES = defaults.ENGINES


@dataclass(frozen=True)
class Engine:
    """Where shards get computed. `local`: this process runs the network, DataLoader processes decode.
    `ray`: actors on a Ray cluster (`ray_address`, else RAY_ADDRESS, else a local cluster started here)
    each hold one network and embed whole shards; this process writes the manifest. The batch size,
    the workers and the device are the embed job's own settings, the same for both engines."""

    name: str = "local"
    ray_address: str | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in ENGINES:
            raise CarsearchError(f"unknown engine {self.name!r}; choose one of {', '.join(ENGINES)}.")
        if self.name == "local" and (self.ray_address or self.gpus_per_worker):
            raise CarsearchError("--ray-address and --gpus-per-worker need --engine ray.")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise CarsearchError("--cpus-per-worker must be above 0 and --gpus-per-worker at least 0.")


@dataclass(frozen=True)
class RunSettings:
    """How one run embeds, as both engines need it (none of it changes the shards' bytes): the engine,
    images a forward pass, decoding processes (local) or actors (ray; None: as many as fit), the device
    the network runs on, seconds between saves of the shard in progress, how the dataset was read (for a
    rerun to reuse), the progress bar and the per-batch callback."""

    engine: Engine
    batch_size: int
    workers: int | None
    worker_device: str
    save_every: float
    read_with: dict
    progress: bool = True
    on_batch: Callable[[int, int], None] | None = None


@dataclass
class Ran:
    """What an engine used: its workers and their device, and (Ray) how many workers died."""

    workers: int
    device: str
    workers_lost: int = 0


class ManifestWriter:
    """The driver's record of the run: failures.jsonl, then manifest.json, rewritten after every shard
    (whose saved parts are deleted once the manifest lists it).

    failures.jsonl goes first: if the process dies between the two writes, the manifest (the source of
    truth) still lists only shards whose failures are on disk; extra lines are filtered on resume."""

    def __init__(
        self,
        out: Path,
        state: dict,
        plans: list[ShardPlan],
        done: dict[int, dict],
        failures: list[dict],
    ) -> None:
        self.out, self.state, self.plans = out, state, plans
        self.entries, self.failures = dict(done), failures
        self.body = self._save()

    def add(self, shard: ShardDone) -> None:
        """Record a written shard (in any order: entries are kept sorted by shard index)."""
        self.entries[shard.entry["index"]] = shard.entry
        # Ray workers report shards in any order; the file lists them by shard, as the local engine does.
        self.failures = sorted([*self.failures, *shard.failures], key=lambda f: (f["shard"], f["id"]))
        self.body = self._save()
        faults.reached("embed.shard_saved")
        remove_parts(self.out, shard.entry["index"])  # the manifest lists the shard: its parts can go

    def _save(self) -> dict:
        write_text_atomic(self.out / FAILURES, "".join(json.dumps(f) + "\n" for f in self.failures))
        shards = [self.entries[i] for i in sorted(self.entries)]
        counts: Counter = Counter()
        for e in shards:
            counts.update(e["failures"])
        complete = len(shards) == len(self.plans) and all(
            e["stop"] == p.stop for e, p in zip(shards, self.plans, strict=True)
        )
        body = {
            **self.state,
            "shards": shards,
            "rows": sum(e["rows"] for e in shards),
            "records_done": sum(e["stop"] - e["start"] for e in shards),
            "failures": dict(sorted(counts.items())),
            "complete": complete,
            "updated": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        write_json_atomic(self.out / MANIFEST, body)
        return body


class Tally:
    """Images read and failed by this run, with the progress bar and the caller's callback."""

    def __init__(self, total: int, progress: bool, on_batch: Callable[[int, int], None] | None) -> None:
        self.total, self.on_batch = total, on_batch
        self.images, self.failed = 0, Counter()
        self.bar = Progress(total, "embed", "img", enabled=progress)

    def update(self, images: int, failed: Counter) -> None:
        self.images += images
        self.failed.update(failed)
        self.bar.update(images, **({"failed": sum(self.failed.values())} if self.failed else {}))
        if self.on_batch is not None:
            self.on_batch(self.images, self.total)

    def close(self) -> None:
        self.bar.close()
