"""The hostile corpus, built in code: broken and exotic images, malformed CSVs, links, odd names, full and
read-only disks. Each case checks its outcome: a reason per skipped file, one sentence per refused command
(no traceback), nothing finished lost. docs/reliability.md tabulates the cases."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from carsearch.cli import cli
from carsearch.embed import load_embeddings
from tests.conftest import DEV, pick, write_csv_dataset

PHOTOS = sorted((DEV / "images").iterdir())[:12]


def _jpeg(img: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _png(img: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _cli(*args: str) -> tuple[int, str]:
    """Run the CLI in-process; an exception that escaped as a traceback fails the test here."""
    r = CliRunner().invoke(cli, list(args))
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"traceback instead of a sentence: {r.exception!r}\n{r.output}")
    # --json documents go to stdout alone; errors and warnings (stderr) join them in `output`.
    return r.exit_code, r.stdout if "--json" in args else r.output


def _sentence(output: str) -> str:
    """The one-sentence error a refused command prints."""
    lines = [ln for ln in output.strip().splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A csv-layout dataset of good, exotic and broken images, links and bad paths, with the reason each
    bad one must be skipped for."""
    base = tmp_path_factory.mktemp("hostile")
    root = base / "data"
    img = root / "images"
    img.mkdir(parents=True)
    car = Image.open(PHOTOS[0]).convert("RGB")
    good = {}
    for i, p in enumerate(PHOTOS[:6]):
        good[f"images/good{i}.jpg"] = p.read_bytes()
    exif = Image.Exif()
    exif[0x0112] = 6
    exotic = {
        "images/cmyk.jpg": _jpeg(car.convert("CMYK")),
        "images/palette.png": _png(car.resize((64, 48)).quantize(16), transparency=0),
        "images/grey16.png": _png(Image.fromarray(np.asarray(car.convert("L"), np.uint16) * 257)),
        "images/rotated.jpg": _jpeg(car, exif=exif.tobytes()),
    }
    bad = {
        "images/truncated.jpg": (PHOTOS[1].read_bytes()[:3000], "truncated"),
        "images/empty.jpg": (b"", "empty"),
        "images/text.jpg": (b"not a photo\n" * 40, "not_an_image"),
        "images/huge.png": (_png(Image.new("L", (12000, 9000))), "too_many_pixels"),
    }
    for rel, data in {**good, **exotic}.items():
        (root / rel).write_bytes(data)
    for rel, (data, _) in bad.items():
        (root / rel).write_bytes(data)
    (img / "folder.jpg").mkdir()  # a folder with an image's name
    outside = base / "outside"
    outside.mkdir()
    (outside / "linked.jpg").write_bytes(PHOTOS[7].read_bytes())
    (img / "linked.jpg").symlink_to(outside / "linked.jpg")  # followed: a DVC / annex style link
    (img / "dangling.jpg").symlink_to(outside / "gone.jpg")
    listed = {
        **{rel: "good" for rel in good},
        **{rel: "good" for rel in exotic},
        "images/linked.jpg": "good",
        **{rel: reason for rel, (_, reason) in bad.items()},
        "images/folder.jpg": "not_an_image",
        "images/dangling.jpg": "missing",
        "images/absent.jpg": "missing",
        "../outside/linked.jpg": "outside_root",
        "/etc/hostname": "outside_root",
        "images/../../outside/linked.jpg": "outside_root",
    }
    rows = ["image,class_name"]
    for i, rel in enumerate(listed):
        rows.append(f"{rel},Make{i % 3} Model 20{10 + i % 3}")
    rows.append("images/good0.jpg,Other Label 2001")  # listed twice with another label: a warning
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return {"root": root, "base": base, "listed": listed}


@pytest.fixture(scope="module")
def embedded(corpus: dict) -> Path:
    out = corpus["base"] / "emb"
    code, output = _cli(
        "embed",
        str(corpus["root"]),
        "--out",
        str(out),
        "--backbone",
        "efficientnet_lite0",
        "--workers",
        "0",
        "--max-pixels",
        "100000000",
        "--json",
    )
    assert code == 0, output
    return out


def test_every_bad_file_is_skipped_with_its_reason(corpus: dict, embedded: Path) -> None:
    listed = corpus["listed"]
    manifest = json.loads((embedded / "manifest.json").read_text())
    expected: dict[str, int] = {}
    for reason in listed.values():
        if reason != "good":
            expected[reason] = expected.get(reason, 0) + 1
    # The pixel limit of 100 MP admits the 108 MP header? No: 12000 x 9000 = 108 MP > 100 MP.
    assert manifest["failures"] == dict(sorted(expected.items()))
    failures = [json.loads(line) for line in (embedded / "failures.jsonl").read_text().splitlines()]
    assert {f["path"]: f["reason"] for f in failures} == {p: r for p, r in listed.items() if r != "good"}
    emb = load_embeddings(embedded)
    assert sorted(emb.paths.tolist()) == sorted(p for p, r in listed.items() if r == "good")
    # The link was followed: its embedding is that of the file it points to.
    linked = emb.vectors[emb.paths.tolist().index("images/linked.jpg")]
    assert np.isfinite(linked).all() and abs(float(np.linalg.norm(linked)) - 1) < 1e-3


def test_a_file_listed_twice_with_two_labels_is_counted(
    corpus: dict, caplog: pytest.LogCaptureFixture
) -> None:
    from carsearch.datasets import read_dataset

    with caplog.at_level("WARNING"):
        ds = read_dataset(corpus["root"])
    assert "1 image(s) again with a different label" in caplog.text
    assert next(r for r in ds.records if r.path == "images/good0.jpg").label.startswith("Make")


def test_a_changed_image_is_found_by_verify_and_embedded_again(
    corpus: dict, embedded: Path, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    shutil.copytree(corpus["root"], root, symlinks=True)
    out = tmp_path / "emb"
    args = [
        "embed",
        str(root),
        "--out",
        str(out),
        "--backbone",
        "efficientnet_lite0",
        "--workers",
        "0",
        "--json",
    ]
    assert _cli(*args)[0] == 0
    (root / "images" / "good1.jpg").write_bytes(PHOTOS[9].read_bytes())  # same path, another photo
    code, output = _cli(*args, "--verify")
    assert code == 0 and json.loads(output)["changed_images"] == 1
    emb = load_embeddings(out)
    i = emb.paths.tolist().index("images/good1.jpg")
    import hashlib

    assert emb.sha256[i] == hashlib.sha256(PHOTOS[9].read_bytes()).hexdigest()


def test_a_dataset_of_links_embeds_and_a_run_that_embeds_nothing_says_why(tmp_path: Path) -> None:
    """Every image a link (a git-annex checkout): embedded like files. Then every link dangles: exit 1,
    one sentence, and after the files come back --retry-failed embeds them."""
    store, root = tmp_path / "annex", tmp_path / "data"
    store.mkdir()
    (root / "Audi A4 2010").mkdir(parents=True)
    for p in PHOTOS[:3]:
        (store / p.name).write_bytes(p.read_bytes())
        (root / "Audi A4 2010" / p.name).symlink_to(store / p.name)
    ok = _cli("embed", str(root), "--out", str(tmp_path / "e1"), "--backbone", "efficientnet_lite0", "--json")
    assert ok[0] == 0 and json.loads(ok[1])["rows"] == 3
    shutil.rmtree(store)
    args = ["embed", str(root), "--out", str(tmp_path / "e2"), "--backbone", "efficientnet_lite0"]
    code, output = _cli(*args)
    assert code == 1 and "embedded none of the 3 images (missing 3" in _sentence(output)
    store.mkdir()
    for p in PHOTOS[:3]:
        (store / p.name).write_bytes(p.read_bytes())
    code, output = _cli(*args, "--retry-failed", "--json")
    assert code == 0 and json.loads(output)["rows"] == 3 and json.loads(output)["retried_shards"] == 1


def test_a_name_that_is_not_utf8_is_skipped_and_the_rest_goes_on(tmp_path: Path) -> None:
    root = tmp_path / "data" / "Audi A4 2010"
    root.mkdir(parents=True)
    for p in PHOTOS[:2]:
        (root / p.name).write_bytes(p.read_bytes())
    with open(os.path.join(os.fsencode(root), b"caf\xe9.jpg"), "wb") as f:  # Latin-1, not UTF-8
        f.write(PHOTOS[2].read_bytes())
    code, output = _cli(
        "embed",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "e"),
        "--backbone",
        "efficientnet_lite0",
        "--json",
    )
    assert code == 0, output
    result = json.loads(output)
    assert result["rows"] == 2 and result["failed"] == {"name_not_utf8": 1}


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("csv_missing_cell", "line 3 has 1 cells where the header has 2"),
        ("labels_unreadable", "labels"),
        ("config_not_utf8", "is not UTF-8 text"),
        ("index_json_missing_key", "lacks 'provenance'"),
        ("factory_cannot_train", "faiss cannot train this index"),
        ("remove_id_overflow", "is not an image id"),
        ("damaged_shard", "is damaged or not a carsearch shard"),
    ],
)
def test_refusals_are_one_sentence(
    case: str, expected: str, corpus: dict, embedded: Path, tmp_path: Path
) -> None:
    data = tmp_path / "d"
    (data / "images").mkdir(parents=True)
    shutil.copyfile(PHOTOS[0], data / "images" / "a.jpg")
    emb_args = ["--backbone", "efficientnet_lite0", "--workers", "0"]
    if case == "csv_missing_cell":
        (data / "labels.csv").write_text("image,class_name\nimages/a.jpg,A B 2000\nimages/a.jpg\n")
        code, out = _cli("embed", str(data), "--out", str(tmp_path / "e"), *emb_args)
    elif case == "labels_unreadable":
        (data / "labels.csv").mkdir()
        code, out = _cli("embed", str(data), "--format", "csv", "--out", str(tmp_path / "e"), *emb_args)
    elif case == "config_not_utf8":
        (tmp_path / "c.toml").write_bytes(b"\xff\xfe[embed]\n")
        code, out = _cli(
            "--config", str(tmp_path / "c.toml"), "embed", str(data), "--out", str(tmp_path / "e")
        )
    elif case == "index_json_missing_key":
        _cli("index", "build", str(embedded), "--out", str(tmp_path / "i"))
        info = json.loads((tmp_path / "i" / "index.json").read_text())
        del info["provenance"]
        (tmp_path / "i" / "index.json").write_text(json.dumps(info))
        code, out = _cli("search", "--index", str(tmp_path / "i"), str(PHOTOS[0]))
    elif case == "factory_cannot_train":
        code, out = _cli(
            "index", "build", str(embedded), "--out", str(tmp_path / "i"), "--factory", "PCA64,Flat"
        )
    elif case == "remove_id_overflow":
        _cli("index", "build", str(embedded), "--out", str(tmp_path / "i"), "--factory", "Flat")
        code, out = _cli("index", "remove", str(tmp_path / "i"), "99999999999999999999")
    else:  # a shard whose bytes are garbage but whose manifest entry was made to match
        import hashlib

        emb = tmp_path / "emb"
        shutil.copytree(embedded, emb)
        shard = emb / "shard-00000.h5"
        shard.write_bytes(b"garbage" * 100)
        m = json.loads((emb / "manifest.json").read_text())
        m["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
        (emb / "manifest.json").write_text(json.dumps(m))
        code, out = _cli("index", "build", str(emb), "--out", str(tmp_path / "i"))
    assert code in (1, 2), out
    assert expected in _sentence(out)


# --- disks: real small and read-only file systems (tmpfs), where this machine lets us mount ----------------


@contextlib.contextmanager
def _tmpfs(where: Path, options: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}); needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _embed_cmd(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "carsearch",
        "embed",
        str(DEV),
        "--out",
        str(out),
        "--backbone",
        "efficientnet_lite0",
        "--limit",
        "200",
        "--shard-size",
        "40",
        "--precision",
        "fp32",
        "--workers",
        "0",
        *extra,
    ]


def test_a_full_disk_is_one_sentence_and_the_same_command_resumes(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    subprocess.run(_embed_cmd(ref), check=True, capture_output=True)
    with _tmpfs(tmp_path / "small", "size=360k") as disk:
        out = disk / "emb"
        full = subprocess.run(_embed_cmd(out), capture_output=True, text=True)
        assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr
        assert "the disk is full: writing" in full.stderr and "run the same command again" in full.stderr
        assert not list(out.glob(".*.tmp-*"))  # nothing half-written is left
        subprocess.run(["mount", "-o", "remount,size=20m", str(disk)], check=True)
        again = subprocess.run(_embed_cmd(out, "--json"), capture_output=True, text=True)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["rows"] == 200
        same = [(p.name, p.read_bytes()) for p in sorted(out.glob("shard-*.h5"))]
        assert same == [(p.name, p.read_bytes()) for p in sorted(ref.glob("shard-*.h5"))]


def test_a_read_only_out_is_one_sentence(tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        r = subprocess.run(_embed_cmd(ro / "emb"), capture_output=True, text=True)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert "Read-only file system" in r.stderr and "choose a folder you can write to" in r.stderr


def test_classify_exits_1_when_any_query_failed_and_answers_the_rest(embedded: Path, tmp_path: Path) -> None:
    _cli("index", "build", str(embedded), "--out", str(tmp_path / "i"))
    (tmp_path / "bad.jpg").write_bytes(b"")
    code, out = _cli(
        "classify", "--index", str(tmp_path / "i"), str(PHOTOS[0]), str(tmp_path / "bad.jpg"), "--json"
    )
    answers = json.loads(out)
    assert code == 1 and answers[0]["error"] is None and answers[1]["error"].startswith("empty")


# --- HDF5 files another program has or had open; storage without file locks -------------------------------

_SHIM = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <sys/file.h>
/* Storage without locks (NFS without lockd): every flock() fails with ENOLCK, as the kernel says there. */
int flock(int fd, int operation) { (void)fd; (void)operation; errno = ENOLCK; return -1; }
"""


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "carsearch", "-q", *args], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.fixture(scope="module")
def lite_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 real photos embedded (lite0) in 3 shards."""
    tmp = tmp_path_factory.mktemp("locks")
    data = write_csv_dataset(tmp / "data", pick([1, 14, 50, 151], 6))
    r = _run(
        "embed",
        str(data),
        "--out",
        str(tmp / "emb"),
        "--backbone",
        "efficientnet_lite0",
        "--workers",
        "0",
        "--shard-size",
        "8",
    )
    assert r.returncode == 0, r.stderr
    return tmp / "emb"


def test_storage_without_locks_works_and_says_so(lite_small: Path, tmp_path: Path) -> None:
    """A real ENOLCK from every flock() (an LD_PRELOAD shim, as on NFS without lockd): embed, index build and
    search work (HDF5 opened without its locking, carsearch's writer lock an O_EXCL file); a lock file of a
    live writer refuses in one sentence; it was 'a file: No locks available' / 'damaged' before."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc builds the ENOLCK shim")
    shim = tmp_path / "enolck.so"
    (tmp_path / "enolck.c").write_text(_SHIM)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(shim), str(tmp_path / "enolck.c")], check=True)
    env = {**os.environ, "LD_PRELOAD": str(shim)}
    probe = subprocess.run(
        [sys.executable, "-c", "import fcntl, sys; fcntl.flock(sys.stdin.fileno(), fcntl.LOCK_EX)"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert "No locks available" in probe.stderr  # the shim is real: flock fails with ENOLCK
    data = Path(load_embeddings(lite_small).root)
    r = _run(
        "embed",
        str(data),
        "--out",
        str(tmp_path / "emb"),
        "--backbone",
        "efficientnet_lite0",
        "--workers",
        "0",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    r = _run("index", "build", str(tmp_path / "emb"), "--out", str(tmp_path / "idx"), "--frozen", env=env)
    assert r.returncode == 0, r.stderr
    photo = next((data / "images").iterdir())
    r = _run("search", "--index", str(tmp_path / "idx"), str(photo), "-k", "3", "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)[0]["neighbors"][0]["score"] > 0.99, r.stderr
    assert not (tmp_path / "idx" / ".lock.owner").exists()  # released
    (tmp_path / "idx" / ".lock.owner").write_text(f"{socket.gethostname()} {os.getppid()}")  # a live writer
    r = _run("index", "build", str(tmp_path / "emb"), "--out", str(tmp_path / "idx"), "--frozen", env=env)
    assert r.returncode == 1 and "has no file locks (ENOLCK)" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "idx" / ".lock.owner").write_text(f"{socket.gethostname()} 999999999")  # a dead one
    r = _run("index", "build", str(tmp_path / "emb"), "--out", str(tmp_path / "idx"), "--frozen", env=env)
    assert r.returncode == 0, r.stderr


def test_a_shard_held_open_or_left_open_is_not_called_damaged(lite_small: Path, tmp_path: Path) -> None:
    """A shard open for writing in another process (h5py 'r+'): one sentence saying so, not "damaged";
    after that process is killed (the open-for-writing mark stays set, the data are intact) the shard is
    read as it is, with a warning naming h5clear; a shard with changed data is still refused."""
    emb = tmp_path / "emb"
    shutil.copytree(lite_small, emb)
    shard = sorted(emb.glob("shard-*.h5"))[0]
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import h5py, time; f = h5py.File({str(shard)!r}, 'r+'); print('open', flush=True); "
            "time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        r = _run("index", "build", str(emb), "--out", str(tmp_path / "idx"), "--frozen")
        assert r.returncode == 1 and "is open for writing in another program" in r.stderr, r.stderr
        assert "damaged" not in r.stderr
    finally:
        holder.kill()
        holder.wait()
    r = _run("index", "build", str(emb), "--out", str(tmp_path / "idx"), "--frozen")
    assert r.returncode == 0, r.stderr
    assert "open for writing by a program that ended" in r.stderr and "h5clear" in r.stderr
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # a changed byte inside the data
    shard.write_bytes(bytes(data))
    r = _run("index", "build", str(emb), "--out", str(tmp_path / "idx2"), "--frozen")
    assert r.returncode == 1 and "changed or damaged" in r.stderr
