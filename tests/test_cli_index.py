"""index / search / classify commands end to end through CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from carsearch.cli import cli
from carsearch.embed.settings import EmbedJob
from tests.conftest import DEV


def _run(*args: str) -> object:
    return CliRunner().invoke(cli, ["-q", *args])


@pytest.fixture(scope="module")
def index_dir(dev_embeddings: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "idx"
    result = _run(
        "index", "build", str(dev_embeddings), "--out", str(out), "--factory", "HNSW32", "--frozen", "--json"
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["factory"] == "HNSW32" and info["search_params"].startswith("efSearch=")
    assert info["recall"]["measured"] >= 0.95 and info["openset"]["threshold"] > 0
    return out


def test_info(index_dir: Path) -> None:
    info = json.loads(_run("index", "info", str(index_dir), "--json").stdout)
    assert info["ntotal"] == 1568 and info["dim"] == 1280
    human = _run("index", "info", str(index_dir)).stdout
    assert "HNSW32 index of 1568 vectors" in human and "unknown-model threshold" in human
    # The vote-share threshold calibrated beside the similarity one is in the summary too.
    share = info["openset"]["uncertain"]["share_threshold"]
    assert f"answers under {share:.0%} of the vote are called uncertain" in human


def test_search_json_shape(index_dir: Path) -> None:
    query = str(DEV / "images" / "00001.jpg")
    result = _run("search", "--index", str(index_dir), query, "-k", "4", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert len(out) == 1 and out[0]["query"] == query and len(out[0]["neighbors"]) == 4
    assert {"id", "path", "label", "score"} <= set(out[0]["neighbors"][0])
    scores = [n["score"] for n in out[0]["neighbors"]]
    assert scores == sorted(scores, reverse=True)


def test_classify_json_shape_and_folder_queries(index_dir: Path, tmp_path: Path) -> None:
    for name in ("00001.jpg", "00002.jpg"):
        (tmp_path / name).write_bytes((DEV / "images" / name).read_bytes())
    result = _run("classify", "--index", str(index_dir), str(tmp_path), "--level", "make", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [Path(r["query"]).name for r in out] == ["00001.jpg", "00002.jpg"]
    r = out[0]
    assert {"label", "confidence", "top5", "unknown", "neighbors"} <= set(r)
    assert r["label"] == "Audi" and 0 < r["confidence"] <= 1 and len(r["top5"]) <= 5
    human = _run("classify", "--index", str(index_dir), str(tmp_path / "00001.jpg")).stdout
    assert "00001.jpg: " in human and "votes:" in human


def test_add_remove_calibrate_commands(dev_embeddings: Path, dev_heldout: Path, tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    build = _run("index", "build", str(dev_embeddings), "--out", str(idx), "--factory", "Flat", "--frozen")
    assert build.exit_code == 0
    added = json.loads(_run("index", "add", str(idx), str(dev_heldout), "--json").stdout)
    # One held-out photo is a byte-identical copy of a gallery photo (Stanford Cars holds a few): skipped.
    assert added["added"] + added["skipped_duplicates"] == 784 and added["ntotal"] == 1568 + added["added"]
    removed = json.loads(_run("index", "remove", str(idx), "100000", "100001", "--json").stdout)
    assert removed["removed"] >= 1 and removed["ntotal"] == added["ntotal"] - removed["removed"]
    # Calibrating on images that are all in the index is refused: they are not held out.
    refused = _run("index", "calibrate", str(idx), "--queries", str(dev_embeddings))
    assert refused.exit_code == 1 and "held-out" in refused.stderr


def test_errors_are_one_sentence(tmp_path: Path, index_dir: Path) -> None:
    for args, message in [
        (("search", "--index", str(tmp_path), str(DEV / "images" / "00001.jpg")), "has no index.json"),
        (("index", "build", str(tmp_path), "--out", str(tmp_path / "x")), "has no manifest.json"),
        (
            ("index", "build", str(tmp_path), "--out", str(tmp_path / "x"), "--memory-budget", "lots"),
            "not a size",
        ),
        (("search", "--index", str(index_dir), str(tmp_path / "nope.jpg")), "missing"),
    ]:
        result = _run(*args)
        assert result.exit_code in (1, 2) and message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    bad_k = _run("search", "--index", str(index_dir), str(DEV / "images" / "00001.jpg"), "-k", "0")
    assert bad_k.exit_code == 2


def test_the_same_photos_are_indexed_once(small_dataset: Path, tmp_path: Path) -> None:
    """A second embedding of the same files (a new id range) adds nothing by default, in `index add` and
    in `index build` over both folders; --allow-duplicates indexes every copy."""
    from carsearch.embed import embed_dataset

    for name, start in (("a", 0), ("b", 1000)):
        embed_dataset(
            EmbedJob(
                small_dataset, tmp_path / name, backbone="efficientnet_lite0", id_start=start, workers=0
            ),
            progress=False,
        )
    idx = tmp_path / "idx"
    assert _run("index", "build", str(tmp_path / "a"), "--out", str(idx), "--frozen").exit_code == 0
    r = _run("index", "add", str(idx), str(tmp_path / "b"), "--json")
    assert r.exit_code == 0, r.output
    added = json.loads(r.stdout)
    assert added["added"] == 0 and added["skipped_duplicates"] == 24 and added["ntotal"] == 24
    photo = str(small_dataset / "images" / sorted(p.name for p in (small_dataset / "images").iterdir())[0])
    hits = json.loads(_run("search", "--index", str(idx), photo, "-k", "3", "--json").stdout)[0]["neighbors"]
    assert hits[0]["score"] > 0.99 and hits[1]["score"] < 0.99  # the photo once, not twice
    both = json.loads(
        _run(
            "index",
            "build",
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            "--out",
            str(tmp_path / "both"),
            "--json",
        ).stdout
    )
    assert both["ntotal"] == 24 and both["duplicates_left_out"] == 24
    forced = json.loads(
        _run("index", "add", str(idx), str(tmp_path / "b"), "--allow-duplicates", "--json").stdout
    )
    assert forced["added"] == 24 and forced["ntotal"] == 48


def test_wrong_folders_point_the_right_way(small_dataset: Path, dev_embeddings: Path, tmp_path: Path) -> None:
    """A photo folder given to `index build`, an embedding folder given to `search --index`: each is named
    for what it is, with the command that makes what was meant in a new folder (never into itself)."""
    r = _run("index", "build", str(small_dataset), "--out", str(tmp_path / "idx"))
    assert r.exit_code == 1 and "holds photos, not embeddings" in r.stderr, r.output
    assert f"carsearch embed {small_dataset} --out EMB_DIR" in r.stderr
    assert f"--out {small_dataset}" not in r.stderr
    r = _run("search", "--index", str(dev_embeddings), str(DEV / "images" / "00001.jpg"))
    assert r.exit_code == 1 and "holds embeddings, not an index" in r.stderr, r.output
    assert f"carsearch index build {dev_embeddings} --out INDEX_DIR" in r.stderr
    assert f"--out {dev_embeddings}" not in r.stderr


def test_an_unfinished_embedding_is_not_indexed_unless_allowed(small_dataset: Path, tmp_path: Path) -> None:
    from carsearch.embed import embed_dataset

    emb = tmp_path / "emb"
    embed_dataset(
        EmbedJob(small_dataset, emb, backbone="efficientnet_lite0", shard_size=5, limit=7), progress=False
    )
    r = _run("index", "build", str(emb), "--out", str(tmp_path / "idx"), "--frozen")
    assert r.exit_code == 1 and not (tmp_path / "idx" / "index.json").exists(), r.output
    assert f"{emb} is incomplete: 7 of 24 photos embedded" in r.stderr and "--allow-incomplete" in r.stderr
    assert f"carsearch embed {small_dataset} --out {emb}" in r.stderr
    r = _run("index", "build", str(emb), "--out", str(tmp_path / "idx"), "--frozen", "--allow-incomplete")
    assert r.exit_code == 0, r.output
    assert json.loads(_run("index", "info", str(tmp_path / "idx"), "--json").stdout)["ntotal"] == 7
