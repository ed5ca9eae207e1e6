"""Index folders survive a kill at any moment of a write: real `carsearch index ...` processes are killed
with SIGKILL at each step of build (over an existing index), add, remove and calibrate (fault-injection
points, not timers); the folder then opens as the old version or the new one, never neither, and the
next writer leaves no stray file behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from carsearch.index.build import build_index
from carsearch.index.settings import IndexSettings
from carsearch.index.store import open_bundle
from tests.conftest import embed_dev_subset

# Every step of a version switch: data file written, metadata's temporary written (before its rename),
# metadata written, index.json's temporary written (before its rename), index.json renamed.
POINTS = [
    "index.data_written",
    "atomic.before_rename:1",
    "index.meta_written",
    "atomic.before_rename:2",
    "index.info_written",
]


def _embed(root: Path, name: str, start: int, stop: int, id_start: int) -> Path:
    return embed_dev_subset(root, name, list(range(1, 9)), start, stop, id_start)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("atomic")
    out = {
        "a": _embed(root, "a", 0, 4, 0),
        "b": _embed(root, "b", 4, 6, 1000),
        "c": _embed(root, "c", 6, 8, 2000),
    }
    build_index([out["a"]], root / "pristine", IndexSettings(factory="Flat"))
    out["pristine"] = root / "pristine"
    return out


def _ops(f: dict[str, Path], idx: Path) -> dict[str, list[str]]:
    return {
        "build": ["index", "build", str(f["b"]), "--out", str(idx), "--factory", "Flat"],
        "add": ["index", "add", str(idx), str(f["b"])],
        "remove": ["index", "remove", str(idx), "0", "1", "2"],
        "calibrate": ["index", "calibrate", str(idx), "--queries", str(f["b"])],
    }


def _run(args: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CARSEARCH_KILL_AT"}
    if kill_at:
        env["CARSEARCH_KILL_AT"] = kill_at
    return subprocess.run(
        [sys.executable, "-m", "carsearch", "-q", *args], capture_output=True, text=True, env=env, timeout=120
    )


def _state(idx: Path) -> tuple:
    """What distinguishes two versions: the ids held, their count and the open-set threshold."""
    b = open_bundle(idx)
    query = np.ones((1, b.index.d), np.float32) / np.sqrt(b.index.d)
    _, ids = b.index.search(query, 1)  # the index answers a search with an id it holds
    assert ids[0, 0] in set(b.gallery.ids.tolist())
    return (
        b.info["ntotal"],
        tuple(sorted(b.gallery.ids.tolist())),
        (b.info.get("openset") or {}).get("threshold"),
    )


def _left_over(idx: Path) -> set[str]:
    named = {e["name"] for e in json.loads((idx / "index.json").read_text())["files"].values()}
    return {p.name for p in idx.iterdir()} - named - {"index.json", ".lock"}


@pytest.mark.parametrize("op", ["build", "add", "remove", "calibrate"])
def test_a_kill_at_any_step_leaves_the_old_or_the_new_version(
    op: str, folders: dict[str, Path], tmp_path: Path
) -> None:
    old = _state(folders["pristine"])
    ref = tmp_path / "ref"
    shutil.copytree(folders["pristine"], ref)
    done = _run(_ops(folders, ref)[op])
    assert done.returncode == 0, done.stderr
    new = _state(ref)
    assert new != old
    seen = set()
    for point in POINTS:
        idx = tmp_path / point.replace(":", "-")
        shutil.copytree(folders["pristine"], idx)
        killed = _run(_ops(folders, idx)[op], kill_at=point)
        assert killed.returncode == -signal.SIGKILL, (point, killed.returncode, killed.stderr)
        state = _state(idx)  # opens: never neither
        assert state in (old, new), point
        seen.add("new" if state == new else "old")
        # The next writer (a calibration on other held-out images) works and cleans up after the kill.
        after = _run(["index", "calibrate", str(idx), "--queries", str(folders["c"])])
        assert after.returncode == 0, after.stderr
        assert _left_over(idx) == set(), (point, _left_over(idx))
        assert _state(idx)[:2] == state[:2]
    assert seen == {"old", "new"}  # the kills fell on both sides of the switch
