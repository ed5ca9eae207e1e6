"""The Ray engine (`embed --engine ray`): actors on a Ray cluster embed whole shards.

A worker is an actor holding one network; the unit of work is the shard, as for the local engine. Each
worker reads its shard's images, embeds them and writes the shard itself (temporary name, fsync, rename)
into the output folder, which must be on storage every node shares; the driver (this process) writes the
manifest when a worker reports a shard, so a resume skips exactly the reported ones. A worker or node
that dies has its shards handed to a fresh worker, which goes on from the parts the dead one saved
(embed/parts.py): a shard's bytes do not depend on who wrote it.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from pathlib import Path

from carsearch import defaults
from carsearch.datasets import Dataset
from carsearch.embed.encoder import Encoder
from carsearch.embed.engines import Engine, ManifestWriter, Ran, RunSettings, Tally
from carsearch.embed.resume import ShardPlan
from carsearch.embed.shard_work import ShardDone, embed_plan
from carsearch.errors import CarsearchError
from carsearch.fsutil import remove_stale_tmp

log = logging.getLogger(__name__)


class ShardWorker:
    """The actor: one network, loaded once, embedding the shards it is handed."""

    def __init__(
        self,
        dataset: Dataset,
        provenance: dict,
        device: str,
        out: str,
        fingerprint: dict,
        batch_size: int,
        threads: int,
        save_every: float = defaults.SAVE_EVERY,
    ) -> None:
        # A refusal here is kept and raised by embed(): raised from __init__, Ray would report it as a
        # dead actor (to be retried) with a traceback, rather than as this one sentence.
        self.error: Exception | None = None
        try:
            self.encoder = _load(dataset, provenance, device, out)
        except (CarsearchError, OSError) as e:
            self.error = e
        self.dataset, self.out, self.fingerprint = dataset, Path(out), fingerprint
        self.batch_size, self.threads, self.save_every = batch_size, threads, save_every

    def pid(self) -> int:
        return os.getpid()

    def embed(self, plan: ShardPlan) -> ShardDone:
        if self.error is not None:
            raise self.error
        return embed_plan(
            self.out,
            plan,
            self.dataset,
            self.encoder,
            self.fingerprint,
            self.batch_size,
            self.threads,
            self.save_every,
        )


def _load(dataset: Dataset, provenance: dict, device: str, out: str) -> Encoder:
    """The driver's network on this node, refused if this node cannot see the folders or makes another."""
    for what, path in (("output folder", Path(out)), ("dataset folder", dataset.root)):
        if not path.is_dir():
            raise CarsearchError(
                f"the {what} {path} is not visible on Ray node {_node()}; put it on storage every node "
                "mounts at the same path."
            )
    runtime = provenance.get("runtime", "torch")
    encoder = Encoder.from_provenance(provenance, device, provenance["precision"], runtime)
    got = encoder.provenance()
    for key in ("weights_sha256", "dim", "precision", "runtime", "runtime_version"):
        if got.get(key) != provenance.get(key):
            raise CarsearchError(
                f"Ray node {_node()} made a different network ({key} {got.get(key)!r}, the driver's "
                f"{provenance.get(key)!r}); install the same weights and versions on every node."
            )
    return encoder


def _node() -> str:
    import socket

    return socket.gethostname()


def connect(address: str | None) -> bool:
    """Join the cluster at `address` (else RAY_ADDRESS), or start a local one in this process when neither
    is given. Returns whether this call started Ray (and so must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    except ConnectionError as e:
        raise CarsearchError(
            f"cannot reach the Ray cluster at {address} ({e}); start it with `ray start --head` or fix "
            "--ray-address / RAY_ADDRESS."
        ) from None
    return True


def worker_count(engine: Engine, workers: int | None, shards: int) -> int:
    """--workers, else as many workers as the cluster's CPUs (or GPUs) hold; never more than shards."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    if engine.gpus_per_worker > gpus:
        raise CarsearchError(
            f"--gpus-per-worker {engine.gpus_per_worker:g} but the Ray cluster has {gpus:g} GPUs; start "
            "nodes with GPUs or use --gpus-per-worker 0."
        )
    if engine.cpus_per_worker > cpus:
        raise CarsearchError(
            f"--cpus-per-worker {engine.cpus_per_worker:g} but the cluster has {cpus:g} CPUs."
        )
    if workers:
        n = workers
    elif engine.gpus_per_worker:
        n = int(gpus // engine.gpus_per_worker)
    else:
        n = int(cpus // engine.cpus_per_worker)
    return max(1, min(n, shards))


def run_on_ray(
    dataset: Dataset,
    encoder: Encoder,
    out: Path,
    fingerprint: dict,
    todo: list[ShardPlan],
    how: RunSettings,
    writer: ManifestWriter,
    tally: Tally,
) -> Ran:
    """Embed the `todo` shards on `how.workers` Ray workers (None: as many as the cluster holds) running
    the network on `how.worker_device`, recording each shard in the manifest as it is reported. Each worker
    saves its shard in progress every `how.save_every` seconds; a worker given a shard goes on from its
    saved parts."""
    import ray

    engine, device = how.engine, how.worker_device

    device = "cuda" if engine.gpus_per_worker else device
    if device == "auto":
        device = "cpu"  # a worker without a GPU share must not grab a GPU it was not given
    started = connect(engine.ray_address)
    actors: list = []
    queue, attempts, lost = deque(todo), dict.fromkeys((p.index for p in todo), 0), 0
    pending: dict = {}  # ObjectRef -> (slot, actor handle, plan)

    def fill(slot: int) -> None:
        busy = sum(1 for s, _, _ in pending.values() if s == slot)
        while queue and busy < defaults.RAY_SHARDS_IN_FLIGHT:
            plan = queue.popleft()
            pending[actors[slot].embed.remote(plan)] = (slot, actors[slot], plan)
            busy += 1

    try:  # from here on, whatever happens, the workers are killed and a cluster started here stopped
        n = worker_count(engine, how.workers, len(todo))
        actor = ray.remote(ShardWorker).options(
            num_cpus=engine.cpus_per_worker, num_gpus=engine.gpus_per_worker, max_restarts=0
        )
        args = (
            ray.put(dataset),
            encoder.provenance(),
            device,
            str(out),
            fingerprint,
            how.batch_size,
            max(1, int(engine.cpus_per_worker)),
            how.save_every,
        )
        actors.extend(actor.remote(*args) for _ in range(n))
        for slot in range(n):
            fill(slot)
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            slot, handle, plan = pending.pop(ref)
            try:
                done: ShardDone = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                # The worker ran and raised: a full disk, an unreadable model. The same on any worker.
                cause = getattr(e, "cause", None)
                raise (cause if isinstance(cause, CarsearchError | OSError) else e) from None
            except (
                ray.exceptions.RayActorError,
                ray.exceptions.WorkerCrashedError,
                ray.exceptions.NodeDiedError,
                ray.exceptions.ObjectLostError,
            ) as e:
                attempts[plan.index] += 1
                if attempts[plan.index] >= defaults.RAY_SHARD_ATTEMPTS:
                    raise CarsearchError(
                        f"shard {plan.index} was lost {attempts[plan.index]} times with its worker "
                        f"({type(e).__name__}); the finished shards are kept: run the same command to "
                        "resume."
                    ) from None
                if actors[slot] is handle:  # the first loss reported for this worker: replace it
                    log.warning("a Ray worker died (%s); its shards go to a new worker.", type(e).__name__)
                    ray.kill(handle, no_restart=True)
                    actors[slot] = actor.remote(*args)
                    lost += 1
                queue.appendleft(plan)
                fill(slot)
                continue
            writer.add(done)
            tally.update(done.images, done.failed)
            fill(slot)
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
        remove_stale_tmp(out)  # a killed worker's half-written shard
        if started:
            ray.shutdown()
    return Ran(n, device, lost)
