"""carsearch train: short real runs on dev images; checkpoints plug into embed / index / classify."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from carsearch.cli import cli
from carsearch.embed import embed_dataset, load_embeddings
from carsearch.embed.settings import EmbedJob
from carsearch.errors import CarsearchError
from carsearch.eval.splits import stratified_split
from carsearch.index.build import build_index
from carsearch.models.checkpoint import load_checkpoint
from carsearch.search import Searcher
from carsearch.train import train_head, train_model
from carsearch.train.data import split_classes
from carsearch.train.settings import TrainSettings, get_preset
from carsearch.train.validation import recall_at_1
from tests.conftest import pick, write_csv_dataset

TINY = TrainSettings(
    mode="full",
    backbone="efficientnet_lite0",
    loss="proxy-anchor",
    image_size=64,
    batch_size=8,
    per_class=2,
    workers=0,
    freeze_epochs=0,
    warmup_epochs=0,
    lr=3e-4,
    weight_decay=1e-4,
    embed_dim=32,
    # fp32 everywhere: `auto` would train in bf16 on a CPU with native bf16 (AVX-512 BF16, AMX) and in fp32
    # on the others, so the same test would run two different computations.
    precision="fp32",
)
RUN = {"progress": False}  # what a run takes besides its settings
HEAD = get_preset("head").settings


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
    result = train_model(tiny_data, out, TINY.override(classes="1-4", epochs=4), **RUN)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert all(np.isfinite(losses)) and result.dim == 32
    info = json.loads((out / "checkpoint.json").read_text())
    assert info["backbone"] == "efficientnet_lite0" and info["preprocessing"]["size"] == 64
    assert info["training"]["validation"] == "held-out classes" and info["epoch"] == 4
    assert info["training"]["precision"] == "fp32"  # what ran: the pinned precision, whatever the CPU
    assert set(info["files"]) == {"model.safetensors", "best.safetensors"}
    # The checkpoint is a registry entry: embed, index and classify use it unchanged.
    emb_dir = tmp_path / "emb"
    r = embed_dataset(
        EmbedJob(tiny_data, emb_dir, backbone="efficientnet_lite0", weights=str(out)), progress=False
    )
    emb = load_embeddings(emb_dir)
    assert r.rows == 36 and emb.dim == 32 and np.allclose(np.linalg.norm(emb.vectors, axis=1), 1, atol=1e-4)
    assert emb.provenance["weights"] == str(out.resolve()) and emb.provenance["preprocessing"]["size"] == 64
    build_index([emb_dir], tmp_path / "idx")
    got = Searcher.open(tmp_path / "idx").classify(
        [tiny_data / "images" / sorted(p.name for p in (tiny_data / "images").iterdir())[0]]
    )
    assert got[0].error is None and got[0].label


def test_resume_continues_from_the_saved_epoch(tiny_data: Path, tmp_path: Path) -> None:
    full = train_model(tiny_data, tmp_path / "full", TINY.override(classes="1-4", epochs=2), **RUN)

    def stop(entry: dict) -> None:
        if entry["epoch"] == 1:
            raise KeyboardInterrupt  # killed after epoch 1's checkpoint was written

    with pytest.raises(KeyboardInterrupt):
        train_model(
            tiny_data, tmp_path / "part", TINY.override(classes="1-4", epochs=2), on_epoch=stop, **RUN
        )
    assert json.loads((tmp_path / "part" / "checkpoint.json").read_text())["epoch"] == 1
    resumed = train_model(
        tiny_data, tmp_path / "part", TINY.override(classes="1-4", epochs=2), resume=True, **RUN
    )
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    # Same settings, same seed: the resumed run ends where an uninterrupted run ends.
    assert resumed.history[0]["loss"] == pytest.approx(full.history[0]["loss"], rel=1e-6)
    assert resumed.history[1]["loss"] == pytest.approx(full.history[1]["loss"], rel=1e-4)
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # Resuming with more epochs extends the run.
    longer = train_model(
        tiny_data, tmp_path / "part", TINY.override(classes="1-4", epochs=3), resume=True, **RUN
    )
    assert [h["epoch"] for h in longer.history] == [1, 2, 3]


def test_refusals(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    train_model(tiny_data, out, TINY.override(classes="1-4", epochs=1), **RUN)
    with pytest.raises(CarsearchError, match="already holds a checkpoint"):
        train_model(tiny_data, out, TINY.override(classes="1-4", epochs=1), **RUN)
    with pytest.raises(CarsearchError, match="different embed_dim"):
        train_model(tiny_data, out, TINY.override(classes="1-4", epochs=2, embed_dim=16), resume=True, **RUN)
    with pytest.raises(CarsearchError, match="no checkpoint to resume"):
        train_model(tiny_data, tmp_path / "new", TINY.override(classes="1-4", epochs=1), resume=True, **RUN)
    with pytest.raises(CarsearchError, match="overlap"):
        train_model(
            tiny_data, tmp_path / "x", TINY.override(classes="1-4", val_classes="4-6", epochs=1), **RUN
        )
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
        HEAD.override(classes="1-98", val_classes="99-147", epochs=40, seed=0),
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
        "head",
        str(dev_embeddings),
        "--out",
        str(tmp_path / "c"),
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
    # A head run goes on from its checkpoint (it records no with_features, which the check once compared).
    more = CliRunner().invoke(cli, [*args[:-1], "5", "--resume", "--json"])
    assert more.exit_code == 0, more.output
    assert [h["epoch"] for h in json.loads(more.stdout)["history"]] == [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def tiny_emb(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Frozen lite0 embeddings of the 36 tiny images."""
    out = tmp_path_factory.mktemp("tiny-emb") / "emb"
    embed_dataset(
        EmbedJob(tiny_data, out, backbone="efficientnet_lite0", workers=0, precision="fp32"), progress=False
    )
    return out


def test_head_applied_to_shards_equals_reembedding(tiny_data: Path, tiny_emb: Path, tmp_path: Path) -> None:
    """The head is trained on stored (normalised) embeddings; the checkpoint must embed images into the
    same space: re-embedding with it equals the head applied to the stored vectors."""
    ckpt_dir = tmp_path / "head"
    small = HEAD.override(classes="1-4", epochs=3, embed_dim=16, batch_size=8, per_class=2)
    train_head(tiny_emb, ckpt_dir, small, progress=False)
    head = load_file(str(ckpt_dir / "best.safetensors"))
    stored = load_embeddings(tiny_emb)
    projected = torch.nn.functional.normalize(
        torch.from_numpy(stored.vectors) @ head["head.weight"].T + head["head.bias"], dim=1
    ).numpy()
    embed_dataset(
        EmbedJob(
            tiny_data,
            tmp_path / "re",
            backbone="efficientnet_lite0",
            weights=str(ckpt_dir),
            workers=0,
            precision="fp32",
        ),
        progress=False,
    )
    again = load_embeddings(tmp_path / "re")
    assert (again.ids == stored.ids).all()
    assert np.abs(again.vectors - projected).max() < 1e-4


def test_head_on_a_checkpoints_embeddings_loads_back(tiny_data: Path, tiny_emb: Path, tmp_path: Path) -> None:
    """A head trained on embeddings that a checkpoint made stacks on that checkpoint's network, and its
    checkpoint loads strictly (it used to wrap an EmbeddingNet in another and fail to load)."""
    first = tmp_path / "first"
    small = HEAD.override(classes="1-4", epochs=2, batch_size=8, per_class=2)
    train_head(tiny_emb, first, small.override(embed_dim=24), progress=False)
    embed_dataset(
        EmbedJob(
            tiny_data,
            tmp_path / "emb1",
            backbone="efficientnet_lite0",
            weights=str(first),
            workers=0,
            precision="fp32",
        ),
        progress=False,
    )
    second = tmp_path / "second"
    train_head(tmp_path / "emb1", second, small.override(embed_dim=8), progress=False)
    loaded = load_checkpoint(second)
    assert loaded.dim == 8
    info = json.loads((second / "checkpoint.json").read_text())
    assert info["base"]["embed_dim"] == 24 and info["head_input"] == "normalized"
    r = embed_dataset(
        EmbedJob(
            tiny_data,
            tmp_path / "emb2",
            backbone="efficientnet_lite0",
            weights=str(second),
            workers=0,
            precision="fp32",
        ),
        progress=False,
    )
    assert r.rows == 36 and load_embeddings(tmp_path / "emb2").dim == 8


def test_empty_or_diverging_validation_is_one_sentence(
    tiny_data: Path, tiny_emb: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    # One image per class: holding out a fifth of each class leaves nothing to validate on.
    lines = (tiny_data / "labels.csv").read_text().splitlines()
    firsts = {}
    for ln in lines[1:]:
        firsts.setdefault(ln.split(",")[1], ln)
    (tmp_path / "one.csv").write_text("\n".join([lines[0], *firsts.values()]) + "\n")
    embed_dataset(
        EmbedJob(
            tiny_data,
            tmp_path / "one",
            labels_file=tmp_path / "one.csv",
            backbone="efficientnet_lite0",
            workers=0,
        ),
        progress=False,
    )
    empty = runner.invoke(cli, ["train", "head", str(tmp_path / "one"), "--out", str(tmp_path / "a")])
    assert empty.exit_code == 1 and "Traceback" not in empty.output, empty.output
    assert "validation set" in empty.output and "at least two" in empty.output
    absent = runner.invoke(
        cli, ["train", "head", str(tiny_emb), "--out", str(tmp_path / "c"), "--val-classes", "90-99"]
    )
    assert absent.exit_code == 1 and "names no class of this dataset" in absent.output
    # One validation image: Recall@1 is undefined (it was NaN and the run crashed at its end).
    single = runner.invoke(
        cli,
        [
            "train",
            "head",
            str(tmp_path / "one"),
            "--out",
            str(tmp_path / "d"),
            "--classes",
            "1-5",
            "--val-classes",
            "6",
        ],
    )
    assert single.exit_code == 1 and "holds 1 usable image(s)" in single.output, single.output


def test_a_diverging_run_stops_in_one_sentence(tmp_path: Path) -> None:
    from carsearch.train.loop import Run, fit

    head = torch.nn.Linear(4, 2)
    run = Run(tmp_path, {}, {"head": head})
    calls = []
    with pytest.raises(CarsearchError, match="training diverged at epoch 2"):
        fit(
            run,
            3,
            train_epoch=lambda e: {"loss": 1.0 if e == 1 else float("nan")},
            validate=lambda: 0.5,
            on_improved=calls.append,
            checkpoint=None,
            report=lambda entry, improved: None,
        )
    assert calls == [1] and [h["epoch"] for h in run.history] == [1]


def test_train_head_and_train_images_take_only_their_options(tiny_emb: Path, tmp_path: Path) -> None:
    """`train head` has no image options to refuse (click names the unknown one); the old --head-only
    says which command replaced it; `train DATA` is still `train images`; each help shows its own rates."""
    runner = CliRunner()
    r = runner.invoke(cli, ["train", "head", str(tiny_emb), "--out", str(tmp_path / "a"), "--backbone", "x"])
    assert r.exit_code == 2 and "No such option '--backbone'" in r.output
    old = runner.invoke(cli, ["train", str(tiny_emb), "--out", str(tmp_path / "a"), "--head-only"])
    assert old.exit_code == 2 and "carsearch train head EMB_DIR" in old.output, old.output
    head = runner.invoke(cli, ["train", str(tiny_emb), "--out", str(tmp_path / "a"), "--preset", "head"])
    assert head.exit_code == 2 and "'head' is not one of 'cpu-hour', 'gpu'" in head.output, head.output
    head_help = " ".join(runner.invoke(cli, ["train", "head", "--help"]).output.split())
    assert "Learning rate of the head [default: 0.001; proxies 10x]" in head_help
    assert "--backbone" not in head_help and "--split" not in head_help and "--runtime" not in head_help
    group_help = " ".join(runner.invoke(cli, ["train", "--help"]).output.split())
    assert "images* Fine-tune a network" in group_help and "head Train a projection head" in group_help
    images_help = " ".join(runner.invoke(cli, ["train", "images", "--help"]).output.split())
    assert "proxies 100x" in images_help and "--split" in images_help and "--format" in images_help


def test_train_reads_a_labels_file(tiny_data: Path, tmp_path: Path) -> None:
    """--labels picks the images to train on (e.g. one split of a collection) like `embed --labels`."""
    lines = (tiny_data / "labels.csv").read_text().splitlines()
    subset = tmp_path / "train.csv"
    subset.write_text("\n".join([lines[0], *[ln for ln in lines[1:] if ln.split(",")[1] in "1234"]]) + "\n")
    result = train_model(
        tiny_data,
        tmp_path / "ckpt",
        TINY.override(val_classes="4", classes="1-3", epochs=1),
        labels_file=subset,
        **RUN,
    )
    info = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())
    assert result.epochs == 1 and info["training"]["data"] != ""
    with pytest.raises(CarsearchError, match="no images of the classes"):
        train_model(
            tiny_data, tmp_path / "c2", TINY.override(classes="5-6", epochs=1), labels_file=subset, **RUN
        )


def test_embedding_with_features_is_the_mean_of_two_cosines_and_survives_a_checkpoint(tmp_path: Path) -> None:
    """with_features: cosine of two embeddings = the mean of the projections' and the features' cosines;
    checkpoint.json rebuilds the same network (dimension included)."""
    from carsearch.models.checkpoint import architecture, build_net
    from carsearch.models.network import EmbeddingNet

    torch.manual_seed(0)
    net = EmbeddingNet(torch.nn.Identity(), 12, 5, with_features=True).eval()
    f = torch.randn(2, 12)
    with torch.no_grad():
        e = torch.nn.functional.normalize(net(f), dim=1)
        p = torch.nn.functional.normalize(net.project(f), dim=1)
    assert e.shape == (2, 17) and net.dim == 17
    x = torch.nn.functional.normalize(f, dim=1)
    expected = 0.5 * (float(p[0] @ p[1]) + float(x[0] @ x[1]))
    assert float(e[0] @ e[1]) == pytest.approx(expected, abs=1e-6)
    info = architecture(net, "efficientnet_lite0")
    assert info["embed_dim"] == 5 and info["with_features"] is True
    again = EmbeddingNet(torch.nn.Identity(), 12, 5)
    assert again.dim == 5 and not again.with_features
    rebuilt = build_net(info)  # the architecture checkpoint.json records (random weights)
    assert rebuilt.with_features and rebuilt.dim == 17 and rebuilt.head.out_features == 5
