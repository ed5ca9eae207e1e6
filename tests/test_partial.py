"""Partial fine-tuning on cached activations (carsearch train --preset cpu-hour, index build --tune), the
presets and the activation cache, on small real subsets of the dev images."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from carsearch.cli import cli
from carsearch.embed import embed_dataset, load_embeddings
from carsearch.embed.settings import EmbedJob
from carsearch.eval.class_cosine import ClassCosine
from carsearch.eval.knn import knn_metrics
from carsearch.index.core import Index
from carsearch.index.settings import IndexSettings
from carsearch.models import load_backbone
from carsearch.models.cut import cut, resolve_trained, stage_names
from carsearch.search import Searcher
from carsearch.train.activations import ActivationCache, Group, Prefix, cache_key
from carsearch.train.partial import Collection, train_partial
from carsearch.train.settings import PRESETS, get_preset
from carsearch.train.tuned import build_tuned_index
from tests.conftest import DEV, _subset_labels, pick_range, write_csv_dataset

CLASSES = list(range(1, 197, 14))  # 14 classes spread over the 196 (every 14th)
# A run small enough for CI: two augmented views, a few epochs, the last 2 stages (the preset trains 3:
# 1.6x the time an epoch); the recipe otherwise as cpu-hour.
SMALL = get_preset("cpu-hour").settings.override(
    augmented_views=2, epochs=15, batch_size=16, workers=0, warmup_epochs=1, train_blocks="2"
)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """14 classes x 10 real images (csv layout, copied)."""
    return write_csv_dataset(tmp_path_factory.mktemp("partial") / "gallery", pick_range(CLASSES, 0, 10))


def collection_of(root: Path) -> Collection:
    from carsearch.datasets import read_dataset

    ds = read_dataset(root)
    return Collection(
        ds.root,
        tuple(r.path for r in ds.records),
        np.array([r.class_id for r in ds.records]),
        ds.records_sha256(),
    )


def test_cut_equals_the_whole_network() -> None:
    for name in ("efficientnet_lite0", "resnet50"):
        model = load_backbone(name, "none").model.eval()
        names = stage_names(model)
        assert len(names) in (4, 7)
        x = torch.randn(2, 3, 64, 64)
        for trained in (1, 2, len(names)):
            c = cut(model, trained)
            with torch.inference_mode():
                assert torch.allclose(c.suffix(c.prefix(x)), model(x), atol=1e-5)
        assert resolve_trained(model, names[-2]) == 2 and resolve_trained(model, "1") == 1
        preset = get_preset("cpu-hour").settings
        if name == preset.backbone:  # the preset trains from blocks.4 on, as documented
            assert names[-resolve_trained(model, preset.train_blocks)] == "blocks.4"
    with pytest.raises(Exception, match="neither a count"):
        resolve_trained(model, "blocks.9")


def test_partial_beats_frozen_on_photos_it_never_saw(gallery: Path, tmp_path: Path) -> None:
    """Trained on 80% of 10 photos of 14 car models (its epoch picked on the other 20%); queries are 4 other
    photos of each class, embedded from their files through the checkpoint as `classify` does."""
    run = train_partial(
        collection_of(gallery), tmp_path / "ckpt", SMALL.override(train_fraction=0.8), progress=False
    )
    assert run.result.validation_metric == "knn_top1"  # held-out photos voted on by the training photos
    assert all(np.isfinite(h["loss"]) for h in run.result.history)
    queries = _subset_labels(tmp_path / "queries.csv", pick_range(CLASSES, 10, 14))
    top1 = {}
    for name, weights in (("frozen", "imagenet"), ("tuned", str(tmp_path / "ckpt"))):
        g = embed_dataset(
            EmbedJob(
                gallery, tmp_path / f"g-{name}", backbone="efficientnet_lite0", weights=weights, workers=0
            ),
            progress=False,
        )
        q = embed_dataset(
            EmbedJob(
                DEV,
                tmp_path / f"q-{name}",
                labels_file=queries,
                backbone="efficientnet_lite0",
                weights=weights,
                workers=0,
                id_start=1000,
            ),
            progress=False,
        )
        assert g.rows == 140 and q.rows == 56
        ge, qe = load_embeddings(g.out), load_embeddings(q.out)
        sims, rows = Index.build("Flat", ge.vectors, target_recall=None).search(qe.vectors, 5)
        top1[name] = knn_metrics(ge.labels, qe.labels, sims, rows)["top1"]
    assert top1["tuned"] > top1["frozen"], top1


@pytest.mark.parametrize(("test_size", "refit"), [(224, False), (256, True)])
def test_cached_embeddings_equal_the_uncached_forward_pass(
    gallery: Path, tmp_path: Path, test_size: int, refit: bool
) -> None:
    """index build --tune with the partial mode: the collection's vectors come from cached activations;
    embedding the same photos through the checkpoint (what queries get) lands on the same vectors. With a
    test size of its own (trained at 224 px, embedded at 256), both are at the test size. With a refit (the
    held-out images trained on too), the open-set threshold still comes from the network before it."""
    emb = tmp_path / "emb"
    embed_dataset(EmbedJob(gallery, emb, backbone="efficientnet_lite0", workers=0), progress=False)
    info = build_tuned_index(
        emb,
        tmp_path / "index",
        preset="cpu-hour",
        settings=SMALL.override(epochs=2, test_image_size=test_size, refit=refit),
        progress=False,
        index=IndexSettings(factory="Flat"),
    )
    assert info["tuning"]["mode"] == "partial" and info["openset"] is not None
    assert (info["tuning"]["refit"] is not None) == refit
    derived = load_embeddings(tmp_path / "index" / "embeddings")
    prov = derived.provenance
    assert prov["preprocessing"]["size"] == test_size
    model = tmp_path / "index" / "model"
    assert (model / "activations" / "test-256px").is_dir() == (test_size == 256)
    again = embed_dataset(
        EmbedJob(
            gallery,
            tmp_path / "again",
            backbone=prov["backbone"],
            weights=prov["weights"],
            weights_sha256=prov["weights_sha256"],
            workers=0,
        ),
        progress=False,
    )
    redone = load_embeddings(again.out)
    assert (redone.ids == derived.ids).all() and derived.dim == 512 + 1280  # projection + pooled features
    cos = (redone.vectors * derived.vectors).sum(1)
    assert cos.min() > 0.99, cos.min()  # bf16 activations on bf16 CPUs; 1.0 in fp32
    r = CliRunner().invoke(
        cli,
        [
            "-q",
            "classify",
            "--index",
            str(tmp_path / "index"),
            str(gallery / "images" / Path(derived.paths[0]).name),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    # The unknown-model score: the largest cosine to the class weights saved with the delivered epoch
    # (computed here from the file), calibrated on the held-out images; a refit has none (its network is
    # not the one the held-out images were scored by), and keeps the neighbour score.
    answer = json.loads(r.output)[0]
    cc = info["openset"].get("class_cosine")
    if refit:
        assert cc is None and not (model / "class_weights.safetensors").exists()
        assert "indexed photo" in (answer["reason"] or "indexed photo")
        return
    w = load_file(str(model / "class_weights.safetensors"))
    # The cpu-hour embedding is the projection (512) and the pooled features (1280): zeros over the latter.
    assert w["weights"].shape == (len(CLASSES), 512 + 1280) and not w["weights"][:, 512:].any()
    assert sorted(cc["labels"]) == sorted(set(derived.labels))
    expected = float((w["weights"].numpy() @ redone.vectors[0]).max())
    assert answer["openset_score"] == pytest.approx(expected, abs=2e-3)
    assert answer["threshold"] == cc["threshold"] and 0.9 <= cc["tpr"] <= 1.0
    summary = CliRunner().invoke(cli, ["-q", "index", "info", str(tmp_path / "index")]).output
    assert f"class weights, threshold {cc['threshold']:.4f}" in summary
    # A photo of a model the weights do not know, added to the index, ends their use: neighbour score.
    assert Searcher.open(tmp_path / "index").class_cosine is not None
    stranger = ClassCosine(w["weights"].numpy(), frozenset(cc["labels"]), cc["threshold"])
    assert not stranger.covers(np.array([*cc["labels"], "Tesla Model S 2012"]))


_KILL_SCRIPT = """
import json, os, signal, sys, threading, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from tests.test_partial import SMALL, collection_of
from carsearch.train.partial import train_partial

def on_epoch(entry):
    if entry["epoch"] == 2 and {kill!r} == "phase":
        # Epoch 3 is under way 0.3 s later: the process dies mid-epoch, with no chance to clean up.
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()

def kill_in_refit():
    # The refit's epoch 1 is written: its epoch 2 is under way; the process dies mid-epoch.
    info = Path({out!r}) / "refit" / "checkpoint.json"
    while not (info.is_file() and json.loads(info.read_text()).get("epoch") == 1):
        time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGKILL)

if {kill!r} == "refit":
    threading.Thread(target=kill_in_refit, daemon=True).start()

settings = SMALL.override(epochs=4, train_fraction=0.8, refit=True)
train_partial(collection_of(Path({data!r})), Path({out!r}), settings, resume={resume}, progress=False,
              on_epoch=on_epoch)
"""


def _run(data: Path, out: Path, kill: str | None, resume: bool) -> subprocess.CompletedProcess:
    repo = str(Path(__file__).resolve().parents[1])
    code = _KILL_SCRIPT.format(repo=repo, data=str(data), out=str(out), kill=kill, resume=resume)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count in every run: the same floats
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


def test_killed_mid_epoch_resumes_to_the_same_result(gallery: Path, tmp_path: Path) -> None:
    """Killed in the training run's epoch 3, or in the refit's epoch 2: the rerun with --resume delivers
    the same network, byte for byte, as a run never killed."""
    whole = _run(gallery, tmp_path / "whole", kill=None, resume=False)
    assert whole.returncode == 0, whole.stderr
    a = json.loads((tmp_path / "whole" / "checkpoint.json").read_text())
    assert a["refit"]["epochs"] == a["best_epoch"] >= 2  # the refit trains as long as validation picked
    assert a["refit"]["images"] == 140  # the 20% held out are trained on too
    killed = _run(gallery, tmp_path / "cut", kill="phase", resume=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    info = json.loads((tmp_path / "cut" / "checkpoint.json").read_text())
    assert info["epoch"] == 2  # epoch 3 died before its checkpoint
    in_refit = _run(gallery, tmp_path / "cut", kill="refit", resume=True)
    assert in_refit.returncode == -signal.SIGKILL, in_refit.stderr
    info = json.loads((tmp_path / "cut" / "checkpoint.json").read_text())
    assert info["epoch"] == 4 and "refit" not in info
    resumed = _run(gallery, tmp_path / "cut", kill=None, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    b = json.loads((tmp_path / "cut" / "checkpoint.json").read_text())
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert [h["loss"] for h in a["refit"]["history"]] == [h["loss"] for h in b["refit"]["history"]]
    assert a["files"] == b["files"]  # the same weights, byte for byte (sha256 of the safetensors)


def test_a_changed_setting_invalidates_the_cache_by_name(gallery: Path, tmp_path: Path, caplog) -> None:
    base = load_backbone("efficientnet_lite0", "imagenet")
    prep = base.preprocessing.with_crop("squash")
    split = cut(base.model.eval(), 2)
    paths = tuple(f"images/{p.name}" for p in sorted((gallery / "images").iterdir())[:3])
    group = Group("g", paths, ("plain", "mirror"))

    def load(seed: int, views: tuple[str, ...] = ("plain", "mirror")):
        cache = ActivationCache(
            tmp_path / "cache",
            cache_key("efficientnet_lite0", base.weights.sha256, split.trained, prep, seed, False),
        )
        cache.prepare()
        return cache.load(
            Group("g", paths, views), gallery, Prefix(split.prefix, prep, torch.device("cpu"), False), False
        )

    x, ok = load(0)
    assert ok.all() and x.shape[:2] == (3, 2) and x.dtype == torch.bfloat16
    # The mirror view is the prefix of the mirrored image (a CNN is not mirror-equivariant, so it differs).
    assert not torch.equal(x[:, 0], x[:, 1])
    mtime = next((tmp_path / "cache" / "g").glob("chunk-*.npz")).stat().st_mtime_ns
    caplog.set_level(logging.WARNING)
    again, _ = load(0)
    assert torch.equal(again, x) and not caplog.records  # reused, not recomputed
    assert next((tmp_path / "cache" / "g").glob("chunk-*.npz")).stat().st_mtime_ns == mtime
    load(1)
    assert "another seed" in caplog.text
    caplog.clear()
    load(1, ("plain",))
    assert "the views of g changed" in caplog.text
    assert group.fingerprint() != Group("g", paths[:2], group.views).fingerprint()


def test_preset_table_and_cli_runs(gallery: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    table = runner.invoke(cli, ["train", "--list-presets"])
    assert table.exit_code == 0
    for name in PRESETS:
        assert name in table.output
    assert "train_blocks" in table.output and "cosine-ce" in table.output
    # The gpu preset runs on a CPU on a tiny set (a whole-network fine-tune on images).
    r = runner.invoke(
        cli,
        [
            "-q",
            "train",
            str(gallery),
            "--out",
            str(tmp_path / "gpu"),
            "--preset",
            "gpu",
            "--device",
            "cpu",
            "--epochs",
            "1",
            "--image-size",
            "64",
            "--batch-size",
            "8",
            "--workers",
            "0",
            "--train-fraction",
            "0.8",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["mode"] == "full" and len(out["history"]) == 1
    # cpu-hour with overrides, from the CLI; the preset is printed first.
    r = runner.invoke(
        cli,
        [
            "train",
            str(gallery),
            "--out",
            str(tmp_path / "p"),
            "--epochs",
            "1",
            "--views",
            "1",
            "--image-size",
            "64",
            "--workers",
            "0",
            "--train-fraction",
            "0.8",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "partial training (preset cpu-hour)" in r.stderr and "augmented_views 1" in r.stderr
    assert json.loads(r.stdout)["mode"] == "partial"
    assert (tmp_path / "p" / "activations" / "cache.json").is_file()
    # A network that cannot be cut says so in one sentence.
    r = runner.invoke(
        cli,
        [
            "train",
            str(gallery),
            "--out",
            str(tmp_path / "v"),
            "--backbone",
            "clip_vitb16",
            "--weights",
            "none",
            "--epochs",
            "1",
        ],
    )
    assert r.exit_code == 1 and "cannot be cut" in r.output
