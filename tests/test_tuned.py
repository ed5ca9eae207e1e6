"""The one-command tuned workflow (`index build --tune-head`) and `carsearch project`, on real embeddings:
tuned beats frozen on queries that neither the head nor the epoch choice saw; queries follow the head."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from carsearch.cli import cli
from carsearch.embed import load_embeddings
from carsearch.embed.project import project_embeddings
from carsearch.index.build import build_index
from carsearch.index.settings import IndexSettings
from carsearch.search import Searcher
from carsearch.train.tuned import build_tuned_index
from tests.conftest import DEV


@pytest.fixture(scope="module")
def tuned(dev_embeddings: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tuned") / "idx"
    build_tuned_index(dev_embeddings, out, progress=False, index=IndexSettings(factory="Flat"))
    return out


def _top1(searcher: Searcher, vectors: np.ndarray, labels: np.ndarray) -> float:
    got = searcher.classify(vectors, k=20, reject=False)
    return float(np.mean([g.label == t for g, t in zip(got, labels, strict=True)]))


def test_tuned_index_beats_frozen_on_unseen_queries(
    tuned: Path, dev_embeddings: Path, dev_heldout: Path, tmp_path: Path
) -> None:
    """Gallery: images 0-7 of every class; queries: images 8-11, which no training or choice saw."""
    build_index([dev_embeddings], tmp_path / "frozen", IndexSettings(factory="Flat"))
    held = load_embeddings(dev_heldout)
    frozen = _top1(Searcher.open(tmp_path / "frozen"), held.vectors, held.labels)
    project_embeddings(dev_heldout, tuned / "head", tmp_path / "held-projected")
    projected = load_embeddings(tmp_path / "held-projected")
    assert (projected.ids == held.ids).all()
    tuned_top1 = _top1(Searcher.open(tuned), projected.vectors, projected.labels)
    assert tuned_top1 > frozen + 0.08, (frozen, tuned_top1)


def test_queries_are_embedded_through_the_head(tuned: Path, dev_embeddings: Path) -> None:
    """An image searched by file lands where its projected shard vector is: the index's provenance names
    the head, and the Searcher embeds through it."""
    searcher = Searcher.open(tuned)
    info = searcher.info
    assert info["provenance"]["weights"] == str(tuned / "head") and info["dim"] == 512
    stored = load_embeddings(tuned / "embeddings")
    vec, errors = searcher.embed([DEV / stored.paths[0]])
    assert errors == [None]
    assert float(vec[0] @ stored.vectors[0]) > 0.999
    assert searcher.search([DEV / stored.paths[0]], k=1)[0].neighbors[0].id == stored.ids[0]


def test_threshold_is_calibrated_on_held_out_images_only(tuned: Path, dev_embeddings: Path) -> None:
    info = json.loads((tuned / "index.json").read_text())
    os_, tuning = info["openset"], info["tuning"]
    assert "held out from the tuned network's training" in os_["method"]
    emb = load_embeddings(dev_embeddings)
    from carsearch.eval.splits import stratified_split

    _, held = stratified_split(emb.class_ids, 1 - tuning["holdout"], 0)
    assert os_["queries"] == len(held) and 0.93 <= os_["tpr"] <= 0.97
    assert tuning["validation_recall_at_1"] > tuning["frozen_recall_at_1"]
    assert (tuned / "head" / "checkpoint.json").is_file()


def test_project_refuses_what_it_cannot_apply(tuned: Path, dev_embeddings: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(
        cli,
        ["project", str(tuned / "embeddings"), "--head", str(tuned / "head"), "--out", str(tmp_path / "x")],
    )
    assert r.exit_code == 1 and "trained on embeddings of another weights" in r.output
    r = CliRunner().invoke(
        cli, ["project", str(dev_embeddings), "--head", str(tmp_path), "--out", str(tmp_path / "y")]
    )
    assert r.exit_code == 1 and "is not a carsearch checkpoint" in r.output
    r = CliRunner().invoke(
        cli,
        [
            "project",
            str(dev_embeddings),
            "--head",
            str(tuned / "head"),
            "--out",
            str(tmp_path / "z"),
            "--json",
        ],
    )
    assert r.exit_code == 0 and json.loads(r.stdout)["dim"] == 512


def test_tune_head_honours_the_open_set_options(dev_embeddings: Path, tmp_path: Path) -> None:
    base = [
        "index",
        "build",
        str(dev_embeddings),
        "--tune-head",
        "--tune-epochs",
        "2",
        "--factory",
        "Flat",
        "--json",
    ]
    r = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "k3"), "--openset-k", "3"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["openset"]["k"] == 3
    r = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "none"), "--no-calibrate"])
    info = json.loads(r.stdout)
    assert r.exit_code == 0 and info["openset"] is None and info["tuning"]["epochs"] == 2


def test_tune_head_is_the_head_preset_and_the_default(dev_embeddings: Path, tmp_path: Path) -> None:
    """`--tune head` is what `--tune-head` was (the same vectors, bit for bit); a labelled collection with
    >= 5 photos per class is tuned that way by default, saying so; `--frozen` indexes the embeddings."""
    from carsearch.embed import load_embeddings

    runs = {
        "old": ["--tune-head"],
        "preset": ["--tune", "head"],
        "default": [],
        "frozen": ["--frozen"],
    }
    infos = {}
    for name, extra in runs.items():
        r = CliRunner().invoke(
            cli,
            [
                "index",
                "build",
                str(dev_embeddings),
                "--out",
                str(tmp_path / name),
                "--factory",
                "Flat",
                "--json",
                *extra,
            ],
        )
        assert r.exit_code == 0, r.output
        infos[name] = json.loads(r.stdout)
        if name == "default":
            assert "tuning a projection head first" in r.stderr and "--frozen" in r.stderr
    old = load_embeddings(tmp_path / "old" / "embeddings")
    for name in ("preset", "default"):
        assert infos[name]["tuning"]["mode"] == "head" and infos[name]["dim"] == 512
        assert np.array_equal(load_embeddings(tmp_path / name / "embeddings").vectors, old.vectors)
        assert infos[name]["openset"]["threshold"] == infos["old"]["openset"]["threshold"]
    assert infos["frozen"]["dim"] == 1280 and "tuning" not in infos["frozen"]
    both = CliRunner().invoke(
        cli,
        ["index", "build", str(dev_embeddings), "--out", str(tmp_path / "x"), "--tune", "head", "--frozen"],
    )
    assert both.exit_code == 2 and "--frozen" in both.output


def test_frozen_embeddings_added_to_a_head_tuned_index_are_projected(
    dev_embeddings: Path, dev_heldout: Path, tmp_path: Path
) -> None:
    """`index add` of a frozen embedding folder to an index tuned with a head (the default for labelled
    collections) projects the new rows through the index's head instead of refusing them."""
    from carsearch.embed import load_embeddings
    from carsearch.embed.project import head_of, project
    from carsearch.index.changes import add_to_index
    from carsearch.search import Searcher

    build_tuned_index(
        dev_embeddings, tmp_path / "idx", progress=False, index=IndexSettings(factory="Flat", calibrate=False)
    )
    added = add_to_index(tmp_path / "idx", dev_heldout)
    held = load_embeddings(dev_heldout)
    assert added["added"] + added["skipped_duplicates"] == len(held) and added["added"] > 0
    w, b, _ = head_of(tmp_path / "idx" / "head", held.provenance)
    s = Searcher.open(tmp_path / "idx")
    sims, ids = s.search_vectors(project(held.vectors[-3:], w, b), 1)
    assert (ids[:, 0] == held.ids[-3:]).all() and (sims[:, 0] > 0.999).all()
