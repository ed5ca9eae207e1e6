"""Searcher: queries embedded like the collection, search and classify against direct computations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from carsearch.embed import load_embeddings
from carsearch.embed.settings import EmbedJob
from carsearch.errors import CarsearchError
from carsearch.index.build import build_index
from carsearch.index.settings import IndexSettings
from carsearch.search import Searcher, expand_queries
from tests.conftest import DEV, write_class_folders


@pytest.fixture(scope="module")
def searcher(dev_embeddings: Path, tmp_path_factory: pytest.TempPathFactory) -> Searcher:
    out = tmp_path_factory.mktemp("idx") / "idx"
    build_index([dev_embeddings], out)
    return Searcher.open(out)


def test_image_query_equals_its_stored_embedding(searcher: Searcher, dev_embeddings: Path) -> None:
    emb = load_embeddings(dev_embeddings)
    paths = [DEV / p for p in emb.paths[:3]]
    by_image = searcher.search(paths, k=5)
    by_vector = searcher.search(emb.vectors[:3], k=5)
    for a, b, own_id in zip(by_image, by_vector, emb.ids[:3], strict=True):
        assert a.error is None and a.neighbors[0].id == own_id  # each image finds itself first
        assert a.neighbors[0].score == pytest.approx(1.0, abs=0.01)
        assert [n.id for n in a.neighbors[:3]] == [n.id for n in b.neighbors[:3]]
    assert by_image[0].query == str(paths[0]) and by_image[0].neighbors[0].path == emb.paths[0]


def _hand_vote(labels: list[str], sims: list[float], t: float) -> list[tuple[str, float]]:
    """The weighted kNN vote written out, independently of carsearch's: each neighbour adds exp(sim / T)
    to its label; shares of the total, largest first, a tie to the label seen nearest."""
    weight: dict[str, float] = {}
    first: dict[str, int] = {}
    for rank, (label, sim) in enumerate(zip(labels, sims, strict=True)):
        weight[label] = weight.get(label, 0.0) + math.exp(sim / t)
        first.setdefault(label, rank)
    total = sum(weight.values())
    return sorted(
        ((lab, w / total) for lab, w in weight.items()), key=lambda x: (-round(x[1], 12), first[x[0]])
    )


def test_classify_equals_a_hand_vote(searcher: Searcher, dev_embeddings: Path, dev_heldout: Path) -> None:
    """classify against an oracle: the 20 nearest gallery images by brute-force cosine in numpy, and a
    plain loop's vote over their labels."""
    held, gallery = load_embeddings(dev_heldout), load_embeddings(dev_embeddings)
    q = held.vectors[:25]
    results = searcher.classify(q, k=20)
    sims = q.astype(np.float64) @ gallery.vectors.astype(np.float64).T
    for r, row in zip(results, sims, strict=True):
        near = np.argsort(-row, kind="stable")[:20]
        assert [n.id for n in r.neighbors] == gallery.ids[near].tolist()
        expected = _hand_vote([str(gallery.labels[i]) for i in near], row[near].tolist(), 0.07)
        assert r.label == expected[0][0] and r.confidence == pytest.approx(expected[0][1], abs=1e-5)
        assert [v.label for v in r.top5] == [lab for lab, _ in expected[:5]]
        for v, (_, share) in zip(r.top5, expected, strict=False):
            assert v.share == pytest.approx(share, abs=1e-5)
        assert r.unknown == (r.openset_score < searcher.openset["threshold"])


def test_levels_and_no_reject(searcher: Searcher, dev_heldout: Path) -> None:
    held = load_embeddings(dev_heldout)
    makes = searcher.classify(held.vectors[:40], level="make")
    assert all(r.level == "make" and r.label in set(searcher.bundle.gallery.make) for r in makes)
    top1_make = np.mean([r.label == m for r, m in zip(makes, held.make[:40], strict=True)])
    top1_model = np.mean(
        [
            r.label == lab
            for r, lab in zip(searcher.classify(held.vectors[:40]), held.labels[:40], strict=True)
        ]
    )
    assert top1_make >= top1_model  # a make is never harder to get right than make + model + year
    # The whole class is the default level, "class"; "model", its old name, gives the same answers.
    whole, old = searcher.classify(held.vectors[:10]), searcher.classify(held.vectors[:10], level="model")
    assert [r.level for r in whole] == ["class"] * 10 and [r.level for r in old] == ["class"] * 10
    assert [r.label for r in old] == [r.label for r in whole]
    years = searcher.classify(held.vectors[:5], level="year")
    assert all(r.label.isdigit() for r in years)
    assert not any(r.unknown for r in searcher.classify(held.vectors[:60], reject=False))


def test_bad_queries_are_reported_not_raised(searcher: Searcher, tmp_path: Path) -> None:
    (tmp_path / "notes.jpg").write_text("not a photo")
    results = searcher.search(
        [DEV / "images" / "00001.jpg", tmp_path / "notes.jpg", tmp_path / "missing.jpg"]
    )
    assert results[0].error is None
    assert results[1].error.startswith("not_an_image") and results[2].error.startswith("missing")
    cls = searcher.classify([tmp_path / "notes.jpg"])
    assert cls[0].error and cls[0].label is None
    with pytest.raises(CarsearchError, match="k must be between"):
        searcher.search(np.zeros((1, 1280), np.float32), k=0)
    with pytest.raises(CarsearchError, match="dimensions"):
        searcher.search(np.zeros((1, 7), np.float32))
    with pytest.raises(CarsearchError, match="unknown level"):
        searcher.classify(np.zeros((1, 1280), np.float32), level="trim")


def test_expand_queries(tmp_path: Path) -> None:
    (tmp_path / "b.jpg").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(b"x")
    assert expand_queries([tmp_path]) == [tmp_path / "b.jpg", tmp_path / "sub" / "a.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CarsearchError, match="holds no images"):
        expand_queries([tmp_path / "empty"])


class _CountingQueries(list):
    """A query list that records how many queries were read before each forward pass."""

    def __init__(self, items: list, log: list[int]) -> None:
        super().__init__(items)
        self.read, self.log = 0, log

    def __getitem__(self, i):  # slices: the Searcher takes one batch at a time
        got = super().__getitem__(i)
        self.read += len(got) if isinstance(i, slice) else 1
        return got


def test_queries_are_decoded_one_batch_at_a_time(searcher: Searcher, dev_embeddings: Path) -> None:
    emb = load_embeddings(dev_embeddings)
    seen: list[int] = []
    queries = _CountingQueries([DEV / p for p in emb.paths[:10]], seen)
    encode = searcher.encoder.encode_images

    def spy(images, batch_size=32):
        seen.append(queries.read)
        return encode(images, batch_size)

    searcher.encoder.encode_images, searcher.batch_size = spy, 4
    try:
        results = searcher.search(queries, k=1)
    finally:
        searcher.encoder.encode_images, searcher.batch_size = encode, 32
    assert seen == [4, 8, 10]  # at the first forward pass only the first batch was read
    assert [r.neighbors[0].id for r in results] == emb.ids[:10].tolist()


def test_answers_carry_make_model_year_and_a_display_name(tmp_path: Path) -> None:
    """A VMMRdb folder (`land rover_range rover_2012`): the prediction has make / model / year fields and
    a display name a person reads, while `label` keeps the raw class."""

    from carsearch.datasets.records import display_name
    from carsearch.embed import embed_dataset

    root = write_class_folders(
        tmp_path / "vmmrdb", {"land rover_range rover_2012": 1, "audi_tts coupe_2012": 14}, 4
    )
    embed_dataset(EmbedJob(root, tmp_path / "emb", backbone="efficientnet_lite0", workers=0), progress=False)
    build_index([tmp_path / "emb"], tmp_path / "idx", IndexSettings(factory="Flat", calibrate=False))
    s = Searcher.open(tmp_path / "idx")
    photo = next((root / "land rover_range rover_2012").iterdir())
    r = s.classify([photo], k=3)[0]
    assert r.label == "land rover_range rover_2012"
    assert (r.make, r.model, r.year) == ("land rover", "range rover", "2012")
    assert r.display == "Land Rover Range Rover 2012"
    m = s.classify([photo], k=3, level="make")[0]
    assert m.label == "land rover" and m.display == "Land Rover" and m.model is None
    # Names with their own capitals stay as written.
    assert display_name("BMW", "M3 Coupe", "2012") == "BMW M3 Coupe 2012"
    assert display_name("smart", "fortwo Convertible", "2012") == "smart fortwo Convertible 2012"
