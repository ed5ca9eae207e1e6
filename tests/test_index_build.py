"""Index build / add / remove / calibrate on real efficientnet_lite0 embeddings of the dev images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from carsearch.embed import embed_dataset, load_embeddings
from carsearch.embed.settings import EmbedJob
from carsearch.errors import CarsearchError, ProvenanceMismatch
from carsearch.eval.neighbors import recall_at_k
from carsearch.eval.openset import kth_similarity, threshold_for_tpr
from carsearch.index.build import build_index
from carsearch.index.calibrate import calibrate_index
from carsearch.index.changes import add_to_index, remove_from_index
from carsearch.index.settings import IndexSettings
from carsearch.index.store import open_bundle
from tests.conftest import DEV, embed_dev_subset, pick_range


def _oracle(gallery: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Brute force with a numpy matrix product: the ids of the k most similar gallery vectors."""
    return ids[np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :k]]


@pytest.mark.parametrize(
    ("factory", "floor"),
    [
        ("Flat", 1.0),
        ("HNSW32", 0.95),
        ("IVF32,Flat", 0.95),
        ("IVF32,PQ64", None),
        ("OPQ16_128,IVF16,PQ16", None),
    ],
)
def test_recall_of_every_index_type(
    factory: str, floor: float | None, dev_embeddings: Path, dev_heldout: Path, tmp_path: Path
) -> None:
    info = build_index([dev_embeddings], tmp_path / "idx", IndexSettings(factory=factory, calibrate=False))
    gallery, queries = load_embeddings(dev_embeddings), load_embeddings(dev_heldout)
    _, found = open_bundle(tmp_path / "idx").index.search(queries.vectors, 10)
    measured = recall_at_k(found, _oracle(gallery.vectors, gallery.ids, queries.vectors, 10), 10)
    claimed = info["recall"]["measured"]
    if floor is not None:
        assert measured >= floor - 0.02 and info["recall"]["reached"], (measured, claimed)
    else:  # product quantisation: the target is out of reach, and index.json must say so honestly
        assert not info["recall"]["reached"] and measured < 0.95
    assert abs(measured - claimed) < 0.06, (measured, claimed)
    assert info["factory"] == factory and info["ntotal"] == len(gallery)


def test_auto_build_records_why(dev_embeddings: Path, tmp_path: Path) -> None:
    info = build_index([dev_embeddings], tmp_path / "idx")
    assert info["factory"] == "Flat" and "exact search is cheap" in info["auto"]["reason"]
    on_disk = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert on_disk["files"]["index"]["sha256"] and on_disk["provenance"]["backbone"] == "efficientnet_lite0"
    assert on_disk["sources"][0]["embeddings"] == str(dev_embeddings)
    tight = build_index(
        [dev_embeddings], tmp_path / "idx2", IndexSettings(memory_budget=2 << 20)
    )  # 2 MiB: must compress
    # OPQ's 1280x1280 rotation alone is 6.25 MiB: plain IVF-PQ is what fits.
    assert tight["factory"].startswith("IVF") and ",PQ" in tight["factory"]
    assert tight["memory_bytes"] <= 2 << 20 and "compressed" in tight["auto"]["reason"]


def test_calibration_keeps_95_percent_of_known_and_rejects_unknown_more(
    dev_embeddings: Path, dev_heldout: Path, tmp_path: Path
) -> None:
    """Gallery: classes 1-98. Held-out known queries: the same classes; unknown: classes 99-196."""
    emb, held = load_embeddings(dev_embeddings), load_embeddings(dev_heldout)
    known_g = emb.class_ids <= 98
    half = tmp_path / "known"
    rows = [r for r in pick_range(list(range(1, 99)), 0, 8)]
    labels = half / "labels.csv"
    half.mkdir()
    import csv

    with open(labels, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "class_id", "class_name"])
        w.writeheader()
        w.writerows(rows)
    embed_dataset(
        EmbedJob(DEV, half / "emb", labels_file=labels, backbone="efficientnet_lite0"), progress=False
    )
    info = build_index([half / "emb"], tmp_path / "idx")
    assert info["ntotal"] == int(known_g.sum())
    bundle = open_bundle(tmp_path / "idx")
    known_q, unknown_q = held.class_ids <= 98, held.class_ids > 98
    sims, _ = bundle.index.search(held.vectors, 1)
    score = kth_similarity(sims, 1)
    # Leave-one-out threshold from the build: ~95% of held-out known images kept.
    thr = info["openset"]["threshold"]
    tpr = float(np.mean(score[known_q] >= thr))
    assert 0.88 <= tpr <= 1.0, tpr
    reject_known, reject_unknown = 1 - tpr, float(np.mean(score[unknown_q] < thr))
    assert reject_unknown > 2 * reject_known, (reject_known, reject_unknown)
    # Held-out calibration through `index calibrate`: unknown classes are told apart and reported.
    cal = calibrate_index(tmp_path / "idx", dev_heldout)["openset"]
    assert cal["tpr"] >= 0.95 and cal["queries"] == int(known_q.sum())
    assert cal["unknown_queries"] == int(unknown_q.sum()) and cal["fpr"] < 1.0
    assert open_bundle(tmp_path / "idx").info["openset"]["method"].startswith("held-out")


def _split_folder(tmp_path: Path, name: str, start: int, stop: int, id_start: int) -> Path:
    return embed_dev_subset(tmp_path, name, list(range(1, 41)), start, stop, id_start)


@pytest.fixture(scope="module")
def two_parts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("parts")
    return _split_folder(base, "a", 0, 6, 0), _split_folder(base, "b", 6, 9, 10_000)


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat"])
def test_add_equals_rebuild(factory: str, two_parts: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = two_parts
    build_index([a], tmp_path / "grown", IndexSettings(factory=factory, calibrate=False))
    added = add_to_index(tmp_path / "grown", b)
    # Stanford Cars holds a few byte-identical photos: a copy of a file the index holds is skipped (and
    # the rebuild below indexes it once too).
    assert added["added"] + added["skipped_duplicates"] == len(load_embeddings(b))
    assert add_to_index(tmp_path / "grown", b)["added"] == 0  # nothing new the second time
    build_index([a, b], tmp_path / "rebuilt", IndexSettings(factory="Flat", calibrate=False))
    grown, rebuilt = open_bundle(tmp_path / "grown"), open_bundle(tmp_path / "rebuilt")
    if factory.startswith("IVF"):
        grown.index.set_params("nprobe=8")  # every list: exhaustive, comparable to exact search
    q = load_embeddings(a).vectors[:50]
    s1, i1 = grown.index.search(q, 10)
    s2, i2 = rebuilt.index.search(q, 10)
    assert (i1 == i2).all() and np.allclose(s1, s2, atol=1e-5)
    assert grown.info["ntotal"] == rebuilt.info["ntotal"]
    assert sorted(grown.gallery.paths.tolist()) == sorted(rebuilt.gallery.paths.tolist())


def test_add_refuses_other_embeddings_and_clashing_ids(two_parts: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = two_parts
    build_index([a], tmp_path / "idx", IndexSettings(calibrate=False))
    other = tmp_path / "other"
    embed_dataset(
        EmbedJob(
            DEV,
            other,
            labels_file=a.parent / "labels.csv",
            backbone="efficientnet_lite0",
            crop="pad",
            limit=4,
        ),
        progress=False,
    )
    with pytest.raises(ProvenanceMismatch, match="different preprocessing"):
        add_to_index(tmp_path / "idx", other)
    clash = tmp_path / "clash"
    embed_dataset(
        EmbedJob(DEV, clash, labels_file=a.parent / "labels.csv", backbone="efficientnet_lite0", limit=4),
        progress=False,
    )  # ids 0..3 again, from another folder
    with pytest.raises(CarsearchError, match="--id-start"):
        add_to_index(tmp_path / "idx", clash, allow_duplicates=True)  # the same files: skipped by default
    assert add_to_index(tmp_path / "idx", clash)["skipped_duplicates"] == 4


def test_remove(two_parts: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = two_parts
    build_index([a], tmp_path / "idx", IndexSettings(factory="Flat", calibrate=False))
    before = open_bundle(tmp_path / "idx")
    out = remove_from_index(tmp_path / "idx", [0, 1, 99999])
    assert out["removed"] == 2 and out["not_found"] == [99999]
    after = open_bundle(tmp_path / "idx")
    assert after.info["ntotal"] == before.info["ntotal"] - 2 and not {0, 1} & set(after.gallery.ids.tolist())
    _, found = after.index.search(load_embeddings(a).vectors[:2], 5)
    assert not {0, 1} & set(found.ravel().tolist())
    build_index([a], tmp_path / "hnsw", IndexSettings(factory="HNSW32", calibrate=False))
    with pytest.raises(CarsearchError, match="HNSW indexes cannot remove"):
        remove_from_index(tmp_path / "hnsw", [0])


def _named(folder: Path, role: str) -> Path:
    """The data file of `role` (index, metadata) that the folder's index.json names."""
    return folder / json.loads((folder / "index.json").read_text())["files"][role]["name"]


def test_damaged_swapped_and_mismatched_files_are_refused(
    two_parts: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = two_parts
    build_index([a], tmp_path / "one", IndexSettings(calibrate=False))
    build_index([b], tmp_path / "two", IndexSettings(calibrate=False))
    target = _named(tmp_path / "one", "index")
    good = target.read_bytes()
    target.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(CarsearchError, match=rf"one/{target.name} does not match the sha256.*rebuild"):
        open_bundle(tmp_path / "one")
    with pytest.raises(CarsearchError, match="cannot be read by faiss"):
        open_bundle(tmp_path / "one", verify=False)
    shutil.copyfile(_named(tmp_path / "two", "index"), target)  # swapped for another index's file
    with pytest.raises(CarsearchError, match=rf"one/{target.name} does not match"):
        open_bundle(tmp_path / "one")
    with pytest.raises(CarsearchError, match="describes"):
        open_bundle(tmp_path / "one", verify=False)  # even unverified, the count differs from index.json
    target.write_bytes(good)
    assert open_bundle(tmp_path / "one").info["ntotal"] > 0
    _named(tmp_path / "one", "metadata").write_bytes(b"garbage")
    with pytest.raises(CarsearchError, match=r"metadata\.[0-9a-f]{16}\.h5 does not match"):
        open_bundle(tmp_path / "one")
    with pytest.raises(CarsearchError, match=r"has no index\.json"):
        open_bundle(tmp_path)


def test_build_refuses_mixed_embeddings(two_parts: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = two_parts
    other = tmp_path / "other"
    embed_dataset(
        EmbedJob(
            DEV,
            other,
            labels_file=a.parent / "labels.csv",
            backbone="efficientnet_lite0",
            weights="none",
            id_start=50_000,
            limit=4,
        ),
        progress=False,
    )
    with pytest.raises(ProvenanceMismatch) as e:
        build_index([a, other], tmp_path / "idx")
    assert e.value.field in ("weights_sha256", "weights")


def test_add_after_a_limited_embed_was_finished(small_dataset: Path, tmp_path: Path) -> None:
    """embed --limit stops inside a shard; the index built then; embed finishes; index add == rebuild."""
    settings = {"backbone": "efficientnet_lite0", "shard_size": 5}
    emb = tmp_path / "emb"
    embed_dataset(
        EmbedJob(small_dataset, emb, limit=7, **settings), progress=False
    )  # shard 1 holds 2 of its 5 records
    build_index([emb], tmp_path / "idx", IndexSettings(factory="Flat", calibrate=False))
    embed_dataset(EmbedJob(small_dataset, emb, **settings), progress=False)  # finishes shard 1 and the rest
    added = add_to_index(tmp_path / "idx", emb)
    assert added["added"] == 24 - 7 and added["ntotal"] == 24
    build_index([emb], tmp_path / "rebuilt", IndexSettings(factory="Flat", calibrate=False))
    grown, rebuilt = open_bundle(tmp_path / "idx"), open_bundle(tmp_path / "rebuilt")
    q = load_embeddings(emb).vectors
    assert (grown.index.search(q, 5)[1] == rebuilt.index.search(q, 5)[1]).all()
    assert [s["file"] for s in grown.info["sources"][0]["shards"]] == [f"shard-0000{i}.h5" for i in range(5)]
    assert add_to_index(tmp_path / "idx", emb)["added"] == 0


def test_calibration_images_also_in_the_index_are_scored_without_themselves(
    two_parts: tuple[Path, Path], tmp_path: Path
) -> None:
    """Calibration on images 3..8 of each class against an index of images 0..5: half of them are the
    same files (under other ids). Each is scored by its nearest *other* image, as a hand computation."""
    a, _ = two_parts
    build_index([a], tmp_path / "idx", IndexSettings(factory="Flat", calibrate=False))
    overlap = _split_folder(tmp_path, "cal", 3, 9, 50_000)
    cal = calibrate_index(tmp_path / "idx", overlap)["openset"]
    g, q = load_embeddings(a), load_embeddings(overlap)
    sims = q.vectors @ g.vectors.T
    sims[q.sha256[:, None] == g.sha256[None, :]] = -np.inf  # the oracle: never the same file
    assert (np.isin(q.sha256, g.sha256)).sum() == len(q) // 2
    expected = threshold_for_tpr(sims.max(axis=1), 0.95)
    assert cal["threshold"] == pytest.approx(expected, abs=1e-5)
    assert cal["threshold"] < 0.99  # self-matches (similarity 1) would have set it near 1


@pytest.mark.parametrize("factory", ["Flat", "IVF8,PQ16", "HNSW32"])
def test_streaming_build_equals_the_in_memory_build(
    factory: str, two_parts: tuple[Path, Path], tmp_path: Path
) -> None:
    """Shard by shard, trained on a sample (300 of 360 vectors here): the same index, byte for byte, as
    Index.build over all the vectors in memory with the same factory, seed and sample size (HNSW: the same
    answers; its graph depends on the order of parallel inserts)."""
    import faiss

    from carsearch.index.core import Index

    a, b = two_parts
    info = build_index(
        [a, b], tmp_path / "streamed", IndexSettings(factory=factory, seed=3, max_train=300, calibrate=False)
    )
    sets = [load_embeddings(a), load_embeddings(b)]
    vectors, ids = np.concatenate([s.vectors for s in sets]), np.concatenate([s.ids for s in sets])
    memory = Index.build(factory, vectors, ids, seed=3, max_train=300)
    streamed = open_bundle(tmp_path / "streamed")
    assert info["build"]["training_vectors"] == (len(ids) if factory.startswith(("Flat", "HNSW")) else 300)
    assert streamed.index.params == memory.params
    tolerance = 0.01 if factory == "HNSW32" else 1e-4
    assert info["recall"]["measured"] == pytest.approx(memory.tuned.recall, abs=tolerance)
    if factory != "HNSW32":
        assert bytes(faiss.serialize_index(streamed.index.faiss)) == bytes(
            faiss.serialize_index(memory.faiss)
        )
    s1, i1 = streamed.index.search(vectors[:40], 10)
    s2, i2 = memory.search(vectors[:40], 10)
    if factory == "HNSW32":
        assert (i1 == i2).mean() > 0.99
    else:
        assert (i1 == i2).all() and np.allclose(s1, s2, atol=1e-6)
    assert info["build"]["peak_rss_bytes"] > 0
