"""`embed --engine ray` on a real local Ray cluster (2 CPUs, no dashboard): the same shards as the local
engine, byte for byte; a worker killed by PID mid-run changes nothing; resume and fingerprint refusal."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from carsearch.cli import cli
from carsearch.embed import Engine, embed_dataset
from carsearch.embed.settings import EmbedJob
from carsearch.errors import CarsearchError, ProvenanceMismatch
from tests.conftest import DEV, pick, write_csv_dataset

ray = pytest.importorskip("ray")

SHARD = 3
RAY = Engine("ray")


@pytest.fixture(scope="module")
def cluster() -> object:
    """One real local cluster for the module (the engine joins a running one instead of starting its own)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 real photos, a truncated one and a listed file that is missing: 22 records, 8 shards of 3."""
    root = write_csv_dataset(tmp_path_factory.mktemp("raydata") / "data", pick([1, 14, 50, 151, 7], 4))
    whole = (DEV / "images" / "00001.jpg").read_bytes()
    (root / "images" / "cut.jpg").write_bytes(whole[: len(whole) // 3])
    with open(root / "labels.csv", "a", newline="") as f:
        w = csv.writer(f)
        w.writerow(["images/cut.jpg", 1, "x"])
        w.writerow(["images/gone.jpg", 1, "x"])
    return root


@pytest.fixture(scope="module")
def local_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "emb"
    embed_dataset(EmbedJob(data, out, backbone="efficientnet_lite0", shard_size=SHARD), progress=False)
    return out


def same_output(a: Path, b: Path) -> None:
    shards = sorted(p.name for p in a.glob("shard-*.h5"))
    assert shards == sorted(p.name for p in b.glob("shard-*.h5")) and len(shards) == 8
    for name in shards:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "failures.jsonl").read_text() == (b / "failures.jsonl").read_text()
    assert not list(b.glob(".*.tmp-*"))


def test_ray_shards_byte_identical_to_local(
    cluster: object, data: Path, local_run: Path, tmp_path: Path
) -> None:
    r = _ray_run(data, tmp_path / "emb")
    assert (r.engine, r.workers, r.complete, r.rows) == ("ray", 2, True, 20)
    assert r.failed == {"missing": 1, "truncated": 1}
    same_output(local_run, tmp_path / "emb")


def _ray_run(data: Path, out: Path, on_batch: object = None, **settings: object) -> object:
    """The whole collection embedded by two Ray workers, shards as the local reference run made them."""
    return embed_dataset(
        EmbedJob(data, out, backbone="efficientnet_lite0", shard_size=SHARD, workers=2, **settings),
        engine=RAY,
        progress=False,
        on_batch=on_batch,
    )


def _worker_pids() -> list[int]:
    """PIDs of the ShardWorker actors (Ray titles their processes `ray::ShardWorker...`)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "cmdline").read_bytes().startswith(b"ray::ShardWorker"):
                    pids.append(int(p.name))
            except OSError:
                continue
    return pids


def test_worker_killed_mid_run_changes_nothing(
    cluster: object, data: Path, local_run: Path, tmp_path: Path
) -> None:
    """The process killed is one of this run's workers: a ShardWorker process that was there before the run
    (the previous test's actor, still exiting, or here a stand-in that only bears its title) is left
    alone."""
    stand_in = subprocess.Popen(["bash", "-c", "exec -a 'ray::ShardWorker.embed' sleep 600"])
    try:
        wait_for_title(stand_in.pid)
        before = set(_worker_pids())
        killed: list[int] = []

        def kill_one(done: int, total: int) -> None:
            if not killed:  # after the first reported shard; each worker still holds queued shards
                pid = next(p for p in _worker_pids() if p not in before)  # a worker of this run
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

        r = _ray_run(data, tmp_path / "emb", on_batch=kill_one)
        assert stand_in.poll() is None  # not killed
    finally:
        stand_in.kill()
        stand_in.wait()
    assert killed and r.workers_lost == 1 and r.complete
    same_output(local_run, tmp_path / "emb")


def wait_for_title(pid: int) -> None:
    """Until the process `pid` bears its `exec -a` title (bash replaces itself with it)."""
    deadline = time.monotonic() + 60
    while not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ShardWorker"):
        assert time.monotonic() < deadline, "the stand-in process never took its title"
        time.sleep(0.01)


def test_resume_and_fingerprint_refusal(cluster: object, data: Path, local_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb"
    # Started by the local engine under --limit, finished by the Ray engine: the shards are the same.
    first = embed_dataset(
        EmbedJob(data, out, backbone="efficientnet_lite0", shard_size=SHARD, limit=7), progress=False
    )
    assert first.shards == 3 and not first.complete
    r = _ray_run(data, out)
    assert (r.resumed_shards, r.new_shards, r.complete) == (2, 6, True)  # shard 2 was cut short by --limit
    same_output(local_run, out)
    again = _ray_run(data, out)
    assert (again.images, again.resumed_shards) == (0, 8)
    with pytest.raises(ProvenanceMismatch, match="--max-pixels 89478485, not --max-pixels 1000"):
        _ray_run(data, out, max_pixels=1000)


def test_cli_engine_ray_and_refusals(cluster: object, data: Path, local_run: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["embed", str(data), "--backbone", "efficientnet_lite0", "--shard-size", str(SHARD)]
    res = runner.invoke(
        cli, [*base, "--out", str(tmp_path / "a"), "--engine", "ray", "--workers", "2", "--json"]
    )
    assert res.exit_code == 0, res.output
    assert '"engine": "ray"' in res.output
    same_output(local_run, tmp_path / "a")
    # No GPU in this cluster: refused before any work, in one sentence.
    res = runner.invoke(
        cli, [*base, "--out", str(tmp_path / "b"), "--engine", "ray", "--gpus-per-worker", "1"]
    )
    assert res.exit_code != 0 and "has 0 GPUs" in res.output
    assert not list((tmp_path / "b").glob("shard-*"))
    with pytest.raises(CarsearchError, match="need --engine ray"):
        Engine("local", ray_address="127.0.0.1:6379")
