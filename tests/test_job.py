"""The resumable embed job: shards, manifest, failures, resume after interruption, refusals."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from carsearch.datasets import split_make_model_year
from carsearch.embed import embed_dataset, load_embeddings
from carsearch.embed.settings import EmbedJob
from carsearch.errors import CarsearchError, ProvenanceMismatch
from carsearch.fsutil import sha256_file
from tests.conftest import DEV, pick, write_csv_dataset

SETTINGS = {"backbone": "efficientnet_lite0", "shard_size": 5, "batch_size": 2}


def _shard_hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.glob("shard-*.h5"))}


@pytest.fixture(scope="module")
def _embedded_once(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The 24-image dataset (4 classes x 6 images), a pristine copy of it, and one uninterrupted run over
    it: embedded once for the module, handed to each test afresh by the two fixtures below."""
    base = tmp_path_factory.mktemp("job")
    pristine = write_csv_dataset(base / "pristine", pick([1, 14, 50, 151], 6))
    shutil.copytree(pristine, base / "data")
    embed_dataset(EmbedJob(base / "data", base / "ref", workers=1, **SETTINGS), progress=False)
    return pristine, base / "data", base / "ref"


@pytest.fixture
def small_dataset(_embedded_once: tuple[Path, Path, Path]) -> Path:
    """The 24-image dataset, as new, at the path the reference run read it from (a run records its
    dataset's root): a test may change it."""
    pristine, data, _ = _embedded_once
    shutil.rmtree(data)
    shutil.copytree(pristine, data)
    return data


@pytest.fixture
def reference(small_dataset: Path, _embedded_once: tuple[Path, Path, Path], tmp_path: Path) -> Path:
    """An uninterrupted run over the 24-image dataset (a copy of the module's: a test may change it)."""
    out = tmp_path / "ref"
    shutil.copytree(_embedded_once[2], out)
    return out


def test_shards_manifest_and_schema(small_dataset: Path, reference: Path) -> None:
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["complete"] and manifest["rows"] == 24 and len(manifest["shards"]) == 5
    assert manifest["failures"] == {}
    assert [s["rows"] for s in manifest["shards"]] == [5, 5, 5, 5, 4]
    assert manifest["fingerprint"]["backbone"] == "efficientnet_lite0"
    assert manifest["provenance"]["weights_sha256"]
    with h5py.File(reference / "shard-00001.h5") as f:
        assert set(f) == {
            "embeddings",
            "ids",
            "class_ids",
            "paths",
            "labels",
            "make",
            "model",
            "year",
            "sha256",
        }
        assert f["embeddings"].shape == (5, 1280) and f["embeddings"].dtype == np.float32
        assert list(f["ids"][:]) == [5, 6, 7, 8, 9]
        attrs = dict(f.attrs)
        assert attrs["backbone"] == "efficientnet_lite0" and attrs["dim"] == 1280
        assert json.loads(attrs["preprocessing"])["crop"] == "squash"
        assert "torch" in json.loads(attrs["versions"]) and attrs["schema_version"] == 1
    emb = load_embeddings(reference)
    assert emb.vectors.shape == (24, 1280)
    assert np.allclose(np.linalg.norm(emb.vectors, axis=1), 1, atol=1e-5)
    assert list(emb.ids) == list(range(24))
    with open(small_dataset / "labels.csv") as f:
        truth = {r["image"]: r["class_name"] for r in csv.DictReader(f)}
    assert all(truth[p] == lab for p, lab in zip(emb.paths, emb.labels, strict=True))
    assert all(s == sha256_file(small_dataset / p) for p, s in zip(emb.paths, emb.sha256, strict=True))
    assert set(emb.make) == {split_make_model_year(lab)[0] for lab in truth.values()}
    assert "AM General" in set(emb.make)


def test_interrupted_then_resumed_equals_uninterrupted(
    small_dataset: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"

    def stop_mid_shard(done: int, total: int) -> None:
        if done > 6:  # shard 1 holds records 5..9; batches of 2 end at 7: this is its middle
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_dataset(
            EmbedJob(small_dataset, out, workers=0, **SETTINGS), progress=False, on_batch=stop_mid_shard
        )
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.h5"] and not manifest["complete"]
    assert not list(out.glob(".*.tmp-*")) and not (out / "shard-00001.h5").exists()
    # The interrupted shard's embedded batch (records 5 and 6) was saved as a part: nothing is redone.
    assert sorted(p.name for p in out.glob("*.part-*")) == ["shard-00001.part-000000.h5"]
    result = embed_dataset(EmbedJob(small_dataset, out, workers=1, **SETTINGS), progress=False)
    assert result.resumed_shards == 1 and result.new_shards == 4
    assert result.resumed_images == 2 and result.images == 17
    assert not list(out.glob("*.part-*"))
    assert _shard_hashes(out) == _shard_hashes(reference)


def test_killed_process_resumes_identically(tmp_path: Path) -> None:
    data = write_csv_dataset(tmp_path / "data", pick(list(range(1, 25)), 5))  # 120 images
    args = [
        "--backbone",
        "efficientnet_lite0",
        "--shard-size",
        "16",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--precision",
        "fp32",
        "--json",
    ]
    ref = tmp_path / "ref"
    cmd = [sys.executable, "-m", "carsearch", "-q", "embed", str(data)]
    subprocess.run([*cmd, "--out", str(ref), *args], check=True, capture_output=True)
    out = tmp_path / "killed"
    # Killed by SIGKILL right after its second shard is on disk (a fault-injection point, not a timer),
    # so a fast machine cannot finish the job first.
    env = {**os.environ, "CARSEARCH_KILL_AT": "embed.shard_saved:2"}
    proc = subprocess.run([*cmd, "--out", str(out), *args], capture_output=True, env=env, timeout=300)
    manifest_path = out / "manifest.json"
    shards_at_kill = len(json.loads(manifest_path.read_text())["shards"])
    assert shards_at_kill == 2
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    assert not json.loads(manifest_path.read_text())["complete"]
    done = subprocess.run([*cmd, "--out", str(out), *args], check=True, capture_output=True, text=True)
    summary = json.loads(done.stdout)
    assert summary["resumed_shards"] >= 2 and summary["complete"]
    assert not list(out.glob(".*.tmp-*"))
    assert _shard_hashes(out) == _shard_hashes(ref)


def test_ctrl_c_keeps_what_was_embedded_with_the_default_shard_size(tmp_path: Path) -> None:
    """A user presses Ctrl-C (SIGINT to the process group, decoding worker included) in the middle of the
    only shard of a small collection: what was embedded is kept, the rerun (without --backbone: the
    folder's settings are taken) embeds only the rest, and the shard equals an uninterrupted run's."""
    import time

    data = write_csv_dataset(tmp_path / "data", pick(list(range(1, 17)), 4))  # 64 images, one shard
    args = ["--batch-size", "4", "--workers", "1", "--precision", "fp32"]
    cmd = [sys.executable, "-m", "carsearch", "embed", str(data)]
    ref, out = tmp_path / "ref", tmp_path / "emb"
    made = subprocess.run(
        [*cmd, "--out", str(ref), "--backbone", "efficientnet_lite0", *args], capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    proc = subprocess.Popen(
        [*cmd, "--out", str(out), "--backbone", "efficientnet_lite0", "--save-every", "0.05", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # A terminal's foreground job has Ctrl-C at its default; a shell's background job (CI started with
        # `&` or nohup) inherits it ignored, and then Python rightly never sees the Ctrl-C.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while not list(out.glob("*.part-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the job finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "interrupted; run the same command again to resume" in err
    assert not (out / "shard-00000.h5").exists()
    kept = 0
    for part in out.glob("*.part-*"):
        with h5py.File(part) as f:
            kept += int(f.attrs["record_stop"]) - int(f.attrs["record_start"])
    assert 0 < kept < 64
    # What the user may try next: index build says the folder is unfinished, and how far it got.
    from click.testing import CliRunner

    from carsearch.cli import cli

    refused = CliRunner().invoke(cli, ["index", "build", str(out), "--out", str(tmp_path / "idx")])
    assert refused.exit_code == 1, refused.output
    assert f"0 of 64 photos embedded in finished shards (and {kept} more saved" in refused.stderr
    rerun = subprocess.run(
        [*cmd, "--out", str(out), *args, "--json"], capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["complete"] and summary["backbone"] == "efficientnet_lite0"
    assert summary["resumed_images"] == kept and summary["images"] == 64 - kept
    assert "--backbone efficientnet_lite0" in rerun.stderr  # says which settings it took from the folder
    assert not list(out.glob("*.part-*")) and _shard_hashes(out) == _shard_hashes(ref)


def test_limit_then_continue(small_dataset: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "limited"
    first = embed_dataset(EmbedJob(small_dataset, out, limit=7, **SETTINGS), progress=False)
    assert first.rows == 7 and not first.complete
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 5), (5, 7)]
    second = embed_dataset(EmbedJob(small_dataset, out, **SETTINGS), progress=False)
    assert second.complete and second.resumed_shards == 1 and second.rows == 24
    assert _shard_hashes(out) == _shard_hashes(reference)


@pytest.mark.parametrize(
    ("change", "field", "named"),
    [
        ({"crop": "center"}, "preprocessing", "--crop squash, not --crop center"),
        ({"flip": True}, "preprocessing", "no --flip, not --flip"),
        ({"shard_size": 6}, "shard_size", "--shard-size 5, not --shard-size 6"),
        ({"backbone": "resnet50"}, "backbone", "--backbone efficientnet_lite0, not --backbone resnet50"),
        ({"weights": "none"}, "weights", "--weights imagenet, not --weights none"),
        ({"precision": "other"}, "precision", "--precision"),
        ({"id_start": 1000}, "id_start", "--id-start 0, not --id-start 1000"),
    ],
)
def test_changed_settings_refused_naming_the_option(
    small_dataset: Path, reference: Path, change: dict, field: str, named: str
) -> None:
    """A setting given differently from the folder's is named as the option (never two whole dicts), and
    refused before the network is loaded where the option alone tells (resnet50 would be downloaded)."""
    used = json.loads((reference / "manifest.json").read_text())["fingerprint"]["precision"]
    if change.get("precision") == "other":
        change = {"precision": "fp32" if used == "bf16" else "bf16"}
    with pytest.raises(ProvenanceMismatch) as e:
        embed_dataset(EmbedJob(small_dataset, reference, **{**SETTINGS, **change}), progress=False)
    assert e.value.field == field
    message = str(e.value)
    assert named in message and "{" not in message, message
    assert f"leave out --{field.replace('_', '-')}" in message or field == "preprocessing"
    assert "--overwrite" in message


def test_a_rerun_takes_the_folders_settings(small_dataset: Path, reference: Path) -> None:
    """Settings not given are the folder's: no --backbone means efficientnet_lite0 here, not resnet50."""
    again = embed_dataset(EmbedJob(small_dataset, reference), progress=False)
    assert again.complete and again.backbone == "efficientnet_lite0" and again.images == 0
    assert again.resumed_shards == 5


def test_changed_dataset_refused_and_overwrite_restarts(small_dataset: Path, reference: Path) -> None:
    shutil.copyfile(DEV / "images" / "00001.jpg", small_dataset / "images" / "zz.jpg")
    with open(small_dataset / "labels.csv", "a") as f:
        f.write("images/zz.jpg,14,Audi TTS Coupe 2012\n")
    with pytest.raises(ProvenanceMismatch) as e:
        embed_dataset(EmbedJob(small_dataset, reference, **SETTINGS), progress=False)
    assert e.value.field == "records"
    # The refusal says what changed and how to embed only the new photo: ids 0-23 are taken.
    assert "1 photo added since" in str(e.value) and "--id-start 24" in str(e.value), str(e.value)
    assert "--overwrite" in str(e.value)
    # A photo removed as well: no way to add only the new one; the whole folder again.
    (small_dataset / "images" / "zz.jpg").rename(small_dataset / "images" / "zz2.jpg")
    text = (small_dataset / "labels.csv").read_text().replace("images/zz.jpg", "images/zz2.jpg")
    lines = text.splitlines(keepends=True)
    (small_dataset / "labels.csv").write_text(lines[0] + "".join(lines[2:]))
    with pytest.raises(ProvenanceMismatch, match="1 photo added and 1 removed since") as e:
        embed_dataset(EmbedJob(small_dataset, reference, **SETTINGS), progress=False)
    assert "--id-start" not in str(e.value) and "--overwrite" in str(e.value)
    result = embed_dataset(EmbedJob(small_dataset, reference, overwrite=True, **SETTINGS), progress=False)
    assert result.rows == 24 and result.resumed_shards == 0 and result.complete


def _bad_dataset(root: Path) -> Path:
    rows = pick([1, 14], 3)
    write_csv_dataset(root, rows)
    photo = (DEV / rows[0]["image"]).read_bytes()
    (root / "images" / "truncated.jpg").write_bytes(photo[: len(photo) // 3])
    (root / "images" / "empty.jpg").write_bytes(b"")
    (root / "images" / "notes.jpg").write_text("not a photo")
    (root.parent / "outside.jpg").write_bytes(photo)
    with open(root / "labels.csv", "a") as f:
        for name in ("truncated.jpg", "empty.jpg", "notes.jpg", "missing.jpg"):
            f.write(f"images/{name},14,Audi TTS Coupe 2012\n")
        f.write("../outside.jpg,14,Audi TTS Coupe 2012\n")
    return root


def test_bad_images_are_counted_listed_and_skipped(tmp_path: Path) -> None:
    data = _bad_dataset(tmp_path / "data")
    result = embed_dataset(EmbedJob(data, tmp_path / "emb", **SETTINGS), progress=False)
    expected = {"empty": 1, "missing": 1, "not_an_image": 1, "outside_root": 1, "truncated": 1}
    assert result.failed == expected and result.rows == 6 and result.complete
    lines = [json.loads(x) for x in (tmp_path / "emb" / "failures.jsonl").read_text().splitlines()]
    assert sorted(x["reason"] for x in lines) == sorted(expected)
    assert {x["path"] for x in lines} >= {"images/empty.jpg", "../outside.jpg"}
    emb = load_embeddings(tmp_path / "emb")
    failed_ids = {x["id"] for x in lines}
    assert not failed_ids & set(emb.ids.tolist()) and len(emb) == 6
    # The failures survive a resume (they belong to finished shards).
    again = embed_dataset(EmbedJob(data, tmp_path / "emb", **SETTINGS), progress=False)
    assert again.failed == expected and again.images == 0


def test_damaged_shard_is_refused_on_load_and_redone_on_resume(small_dataset: Path, reference: Path) -> None:
    good = _shard_hashes(reference)
    with open(reference / "shard-00002.h5", "r+b") as f:
        f.seek(-100, os.SEEK_END)
        f.write(b"\0" * 50)
    with pytest.raises(CarsearchError, match=r"shard-00002.h5 does not match the sha256"):
        load_embeddings(reference)
    result = embed_dataset(EmbedJob(small_dataset, reference, **SETTINGS), progress=False)
    assert result.new_shards == 1 and result.resumed_shards == 4
    assert _shard_hashes(reference) == good


def test_second_writer_is_refused(small_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(CarsearchError, match="another carsearch process is writing"):
            embed_dataset(EmbedJob(small_dataset, out, **SETTINGS), progress=False)


def test_output_inside_dataset_root_is_refused(small_dataset: Path) -> None:
    with pytest.raises(CarsearchError, match="into the dataset folder"):
        embed_dataset(EmbedJob(small_dataset, small_dataset, **SETTINGS), progress=False)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_a_killed_decoding_worker_is_one_sentence(tmp_path: Path) -> None:
    """The OOM killer (here: SIGKILL) takes a DataLoader worker mid-run: one sentence saying what happened
    and what to do, exit 1, no traceback; the rerun finishes the job."""
    import time

    from tests.conftest import _subset_labels, pick_range

    labels = _subset_labels(tmp_path / "labels.csv", pick_range(list(range(1, 197)), 0, 1))
    cmd = [
        sys.executable,
        "-m",
        "carsearch",
        "embed",
        str(DEV),
        "--labels",
        str(labels),
        "--out",
        str(tmp_path / "emb"),
        "--backbone",
        "efficientnet_lite0",
        "--workers",
        "1",
        "--batch-size",
        "8",
        "--shard-size",
        "64",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    killed = None
    while killed is None and time.time() < deadline and proc.poll() is None:
        workers = _children(proc.pid)
        if workers:
            time.sleep(0.5)  # let it decode a little first
            try:
                os.kill(workers[0], signal.SIGKILL)
            except ProcessLookupError:  # that child ended on its own meanwhile (a shard's loader): look again
                continue
            killed = workers[0]
        time.sleep(0.1)
    _, err = proc.communicate(timeout=300)
    assert killed is not None, err
    assert proc.returncode == 1, err
    assert "Traceback" not in err and f"image-decoding worker (pid {killed}) was killed by signal" in err
    assert "fewer --workers" in err and len(err.strip().splitlines()) <= 2, err
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert load_embeddings(tmp_path / "emb").manifest["complete"]


def test_a_worker_killed_mid_transfer_is_the_same_sentence() -> None:
    """A worker killed while the main process fetches a batch's shared memory from it: the main process
    sees ConnectionResetError, not torch's "worker killed"; with the loader's processes it is the same one
    sentence naming the dead worker. Without a dead worker the error passes through unchanged."""
    import multiprocessing
    import time

    from carsearch.embed.reader import decoding_workers

    worker = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(60,))
    worker.start()
    try:
        with pytest.raises(ConnectionResetError), decoding_workers("kept", lambda: [worker]):
            raise ConnectionResetError(104, "Connection reset by peer")
        os.kill(worker.pid, signal.SIGKILL)
        died = rf"worker \(pid {worker.pid}\) was killed by signal Killed"
        with pytest.raises(CarsearchError, match=died), decoding_workers("kept", lambda: [worker]):
            raise ConnectionResetError(104, "Connection reset by peer")
    finally:
        worker.kill()
        worker.join()
