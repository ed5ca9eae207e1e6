"""carsearch train: short real runs on dev images; checkpoints plug into embed / index / classify."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from carsearch.eval.splits import stratified_split
from carsearch.cli import cli
from carsearch.embed import embed_dataset, load_embeddings
from carsearch.errors import CarsearchError
from carsearch.index.build import build_index
from carsearch.search import Searcher
from carsearch.models.checkpoint import load_checkpoint
from carsearch.train import train_head, train_model
from carsearch.train.data import split_classes
from carsearch.train.validation import recall_at_1
from tests.conftest import pick, write_csv_dataset

TINY = {
    "backbone": "efficientnet_lite0",
    "image_size": 64,
    "batch_size": 8,
    "per_class": 2,
    "workers": 0,
    "freeze_epochs": 0,
    "warmup_epochs": 0,
    "lr": 3e-4,
    "embed_dim": 32,
    "progress": False,
}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 classes x 6 real images; classes 1-4 train, 5-6 validate."""
    root = tmp_path_factory.mktemp("train") / "data"
    rows = pick([1, 14, 50, 80, 120, 151], 6)
    write_csv_dataset(root, rows)
    # Renumber the classes 1..6 so --classes 1-4 means the first four.
    lines = (root / "labels.csv").read_text().splitlines()
    ids = {old: str(i) for i, old in enumerate(["1", "14", "50", "80", "120", "151"], 1)}
    out = [lines[0]] + [
        ",".join([ln.split(",")[0], ids[ln.split(",")[1]], *ln.split(",")[2:]]) for ln in lines[1:]
    ]
    (root / "labels.csv").write_text("\n".join(out) + "\n")
    (root / "classes.csv").unlink()
    return root


def test_short_run_lowers_the_loss_and_embed_loads_it(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    result = train_model(tiny_data, out, classes="1-4", epochs=4, **TINY)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert all(np.isfinite(losses)) and result.dim == 32
    info = json.loads((out / "checkpoint.json").read_text())
    assert info["backbone"] == "efficientnet_lite0" and info["preprocessing"]["size"] == 64
    assert info["training"]["validation"] == "held-out classes" and info["epoch"] == 4
    assert set(info["files"]) == {"model.safetensors", "best.safetensors"}
    # The checkpoint is a registry entry: embed, index and classify use it unchanged.
    emb_dir = tmp_path / "emb"
    r = embed_dataset(tiny_data, emb_dir, backbone="efficientnet_lite0", weights=str(out), progress=False)
    emb = load_embeddings(emb_dir)
    assert r.rows == 36 and emb.dim == 32 and np.allclose(np.linalg.norm(emb.vectors, axis=1), 1, atol=1e-4)
    assert emb.provenance["weights"] == str(out.resolve()) and emb.provenance["preprocessing"]["size"] == 64
    build_index([emb_dir], tmp_path / "idx")
    got = Searcher.open(tmp_path / "idx").classify(
        [tiny_data / "images" / sorted(p.name for p in (tiny_data / "images").iterdir())[0]]
    )
    assert got[0].error is None and got[0].label


def test_resume_continues_from_the_saved_epoch(tiny_data: Path, tmp_path: Path) -> None:
    full = train_model(tiny_data, tmp_path / "full", classes="1-4", epochs=2, **TINY)

    def stop(entry: dict) -> None:
        if entry["epoch"] == 1:
            raise KeyboardInterrupt  # killed after epoch 1's checkpoint was written

    with pytest.raises(KeyboardInterrupt):
        train_model(tiny_data, tmp_path / "part", classes="1-4", epochs=2, on_epoch=stop, **TINY)
    assert json.loads((tmp_path / "part" / "checkpoint.json").read_text())["epoch"] == 1
    resumed = train_model(tiny_data, tmp_path / "part", classes="1-4", epochs=2, resume=True, **TINY)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    # Same settings, same seed: the resumed run ends where an uninterrupted run ends.
    assert resumed.history[0]["loss"] == pytest.approx(full.history[0]["loss"], rel=1e-6)
    assert resumed.history[1]["loss"] == pytest.approx(full.history[1]["loss"], rel=1e-4)
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # Resuming with more epochs extends the run.
    longer = train_model(tiny_data, tmp_path / "part", classes="1-4", epochs=3, resume=True, **TINY)
    assert [h["epoch"] for h in longer.history] == [1, 2, 3]


def test_refusals(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    train_model(tiny_data, out, classes="1-4", epochs=1, **TINY)
    with pytest.raises(CarsearchError, match="already holds a checkpoint"):
        train_model(tiny_data, out, classes="1-4", epochs=1, **TINY)
    with pytest.raises(CarsearchError, match="different embed_dim"):
        train_model(tiny_data, out, classes="1-4", epochs=2, resume=True, **{**TINY, "embed_dim": 16})
    with pytest.raises(CarsearchError, match="no checkpoint to resume"):
        train_model(tiny_data, tmp_path / "new", classes="1-4", epochs=1, resume=True, **TINY)
    with pytest.raises(CarsearchError, match="overlap"):
        train_model(tiny_data, tmp_path / "x", classes="1-4", val_classes="4-6", epochs=1, **TINY)
    with pytest.raises(CarsearchError, match="fine-tuned efficientnet_lite0"):
        load_checkpoint(out, expected_backbone="resnet50")
    (out / "best.safetensors").write_bytes(b"broken")
    with pytest.raises(CarsearchError, match="does not match the sha256"):
        load_checkpoint(out)


def test_head_only_improves_zero_shot_recall_honestly(dev_embeddings: Path, tmp_path: Path) -> None:
    """Train on classes 1-98, pick the epoch on 99-147, measure on 148-196 (seen by neither step)."""
    result = train_head(
        dev_embeddings,
        tmp_path / "head",
        classes="1-98",
        val_classes="99-147",
        epochs=40,
        seed=0,
        progress=False,
    )
    emb = load_embeddings(dev_embeddings)
    test = emb.class_ids >= 148
    frozen = recall_at_1(emb.vectors[test], emb.class_ids[test])
    net = load_checkpoint(tmp_path / "head").model
    with torch.inference_mode():
        projected = net.head(torch.from_numpy(emb.vectors[test])).numpy()
    tuned = recall_at_1(projected, emb.class_ids[test])
    assert tuned > frozen + 0.02, (frozen, tuned)
    assert result.best_recall_at_1 > result.baseline_recall_at_1


def test_train_fraction_holds_out_exactly_the_bench_split(dev_embeddings: Path) -> None:
    emb = load_embeddings(dev_embeddings)
    tmask, vmask, how = split_classes(emb.class_ids, "1-98", None, 0, 0.75)
    gal, qry = stratified_split(emb.class_ids, 0.75, 0)
    assert set(np.flatnonzero(tmask)) == set(gal[emb.class_ids[gal] <= 98].tolist())
    assert set(np.flatnonzero(vmask)) == set(qry[emb.class_ids[qry] <= 98].tolist())
    assert how.startswith("held-out images of the training classes")
    # Without a fraction, the other classes validate.
    tmask, vmask, how = split_classes(emb.class_ids, "1-98", None, 0)
    assert (
        (emb.class_ids[tmask] <= 98).all() and (emb.class_ids[vmask] > 98).all() and how == "held-out classes"
    )


def test_cli_head_only_json(dev_embeddings: Path, tmp_path: Path) -> None:
    args = [
        "-q",
        "train",
        str(dev_embeddings),
        "--out",
        str(tmp_path / "c"),
        "--head-only",
        "--classes",
        "1-98",
        "--epochs",
        "3",
    ]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["mode"] == "head-only" and len(out["history"]) == 3 and out["dim"] == 512
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "--resume" in again.stderr
