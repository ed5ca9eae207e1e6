"""Shared fixtures: the real Stanford Cars dev images, and small datasets built from them in tmp folders."""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEV = Path(os.environ.get("CARSEARCH_DEV_DATA", REPO.parent / "shared" / "data" / "stanford-cars-dev"))


@pytest.fixture(scope="session", autouse=True)
def runtime_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Networks converted for OpenVINO are kept in a folder of this run, never the user's cache. The
    suite's many networks (each training test makes its own) run in PyTorch unless CARSEARCH_RUNTIME says
    otherwise: converting each would add seconds apiece. tests/test_runtimes.py runs OpenVINO, and `auto`."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CARSEARCH_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("CARSEARCH_RUNTIME", os.environ.get("CARSEARCH_RUNTIME") or "torch")
        yield


def dev_rows() -> list[dict[str, str]]:
    """labels.csv of the dev set: image, class_id, class_name."""
    if not (DEV / "labels.csv").is_file():
        pytest.fail(f"the real dev images are missing at {DEV} (set CARSEARCH_DEV_DATA)")
    with open(DEV / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def dev_class_names() -> list[str]:
    with open(DEV / "classes.csv", newline="") as f:
        return [r["class_name"] for r in csv.DictReader(f)]


def pick(classes: list[int], per_class: int) -> list[dict[str, str]]:
    """The first `per_class` images (by file name) of each class id in `classes`."""
    by_class: dict[int, list[dict[str, str]]] = defaultdict(list)
    for row in sorted(dev_rows(), key=lambda r: r["image"]):
        by_class[int(row["class_id"])].append(row)
    return [row for c in classes for row in by_class[c][:per_class]]


def write_csv_dataset(root: Path, rows: list[dict[str, str]], with_names: bool = True) -> Path:
    """A `csv` layout dataset under `root`: the real images copied, labels.csv (+ classes.csv)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for row in rows:
        shutil.copyfile(DEV / row["image"], root / row["image"])
    with open(root / "labels.csv", "w", newline="") as f:
        cols = ["image", "class_id", "class_name"] if with_names else ["image", "class_id"]
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    shutil.copyfile(DEV / "classes.csv", root / "classes.csv")
    return root


@pytest.fixture
def small_dataset(tmp_path: Path) -> Path:
    """24 real images: 4 classes x 6 images, csv layout."""
    return write_csv_dataset(tmp_path / "data", pick([1, 14, 50, 151], 6))


def write_class_folders(root: Path, classes: dict[str, int], per_class: int) -> Path:
    """A VMMRdb-style dataset under `root`: one folder per name in `classes`, holding the first `per_class`
    real dev images of the class id it maps to (copied)."""
    for folder, cls in classes.items():
        (root / folder).mkdir(parents=True)
        for row in pick([cls], per_class):
            shutil.copyfile(DEV / row["image"], root / folder / Path(row["image"]).name)
    return root


def _subset_labels(path: Path, rows: list[dict[str, str]]) -> Path:
    """A labels.csv listing dev images by their path under DEV (nothing is copied)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "class_id", "class_name"])
        w.writeheader()
        w.writerows(rows)
    return path


def pick_range(classes: list[int], start: int, stop: int) -> list[dict[str, str]]:
    """Images start..stop-1 (by file name) of each class."""
    by_class: dict[int, list[dict[str, str]]] = defaultdict(list)
    for row in sorted(dev_rows(), key=lambda r: r["image"]):
        by_class[int(row["class_id"])].append(row)
    return [row for c in classes for row in by_class[c][start:stop]]


@pytest.fixture(scope="session")
def dev_embeddings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real efficientnet_lite0 embeddings of 8 images of each of the 196 classes (1,568 images)."""
    from carsearch.embed import EmbedJob, embed_dataset

    folder = tmp_path_factory.mktemp("dev-gallery")
    labels = _subset_labels(folder / "labels.csv", pick_range(list(range(1, 197)), 0, 8))
    embed_dataset(
        EmbedJob(DEV, folder / "emb", labels_file=labels, backbone="efficientnet_lite0"), progress=False
    )
    return folder / "emb"


@pytest.fixture(scope="session")
def dev_heldout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Other images of the same classes (images 8..11 of each class), ids from 100000: held-out queries."""
    from carsearch.embed import EmbedJob, embed_dataset

    folder = tmp_path_factory.mktemp("dev-heldout")
    labels = _subset_labels(folder / "labels.csv", pick_range(list(range(1, 197)), 8, 12))
    embed_dataset(
        EmbedJob(DEV, folder / "emb", labels_file=labels, backbone="efficientnet_lite0", id_start=100_000),
        progress=False,
    )
    return folder / "emb"


@pytest.fixture(scope="session")
def unlabelled_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index of 12 real photos with no labels at all (a folder of listings: listing-01.jpg, ...)."""
    from carsearch.embed import EmbedJob, embed_dataset
    from carsearch.index.build import build_index

    folder = tmp_path_factory.mktemp("unlabelled")
    (folder / "photos").mkdir()
    for i in range(1, 13):
        shutil.copyfile(DEV / "images" / f"{i:05d}.jpg", folder / "photos" / f"listing-{i:02d}.jpg")
    embed_dataset(EmbedJob(folder / "photos", folder / "emb", backbone="efficientnet_lite0"), progress=False)
    build_index([folder / "emb"], folder / "idx")
    return folder / "idx"


@contextlib.contextmanager
def live_server(app) -> Iterator[str]:
    """Run an ASGI app with uvicorn on a free loopback port in a thread; yield its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def embed_dev_subset(root: Path, name: str, classes: list[int], start: int, stop: int, id_start: int) -> Path:
    """Embed images start..stop-1 of each class (lite0, listed in root/name/labels.csv, nothing copied);
    returns the embedding folder root/name/emb."""
    from carsearch.embed import EmbedJob, embed_dataset

    folder = root / name
    folder.mkdir(parents=True)
    labels = _subset_labels(folder / "labels.csv", pick_range(classes, start, stop))
    embed_dataset(
        EmbedJob(DEV, folder / "emb", labels_file=labels, backbone="efficientnet_lite0", id_start=id_start),
        progress=False,
    )
    return folder / "emb"
