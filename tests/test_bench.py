"""carsearch bench: every reported number against an independent computation on real embeddings."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from carsearch.bench.runner import BenchSettings, run_bench
from carsearch.cli import cli
from carsearch.embed import load_embeddings
from carsearch.embed.settings import EmbedJob
from carsearch.errors import CarsearchError
from carsearch.eval.splits import class_range, stratified_split

FACTORIES = ["Flat", "HNSW32", "IVF16,Flat", "IVF16,PQ40"]


def _kernel_peak_rss() -> int:
    """The kernel's own high-water mark of this process's resident memory (VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


PEAKS: dict[str, int] = {}  # the kernel's peak resident memory just before and just after the bench


@pytest.fixture(scope="module")
def bench(dev_embeddings: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    PEAKS["before"] = _kernel_peak_rss()
    # Short timings (issue 22, point 9: the default's timing loops took most of this fixture's minute).
    settings = BenchSettings(factories=FACTORIES, timing_seconds=0.05)
    report = run_bench(dev_embeddings, out, settings, progress=False)
    PEAKS["after"] = _kernel_peak_rss()
    return report, out


def _vote_oracle(labels: list[str], sims: np.ndarray, t: float = 0.07) -> list[str]:
    """A second, plain implementation of the weighted vote: label -> sum of exp(sim / T)."""
    acc: dict[str, float] = defaultdict(float)
    first: dict[str, int] = {}
    for i, (lab, s) in enumerate(zip(labels, sims, strict=True)):
        acc[lab] += math.exp((s - sims[0]) / t)
        first.setdefault(lab, i)
    return sorted(acc, key=lambda lab: (-round(acc[lab] / sum(acc.values()), 9), first[lab], lab))


def test_split_is_stratified_and_disjoint(bench: tuple[dict, Path], dev_embeddings: Path) -> None:
    emb = load_embeddings(dev_embeddings)
    gal, qry = stratified_split(emb.class_ids, 2 / 3, 0)
    assert not set(gal) & set(qry) and len(gal) + len(qry) == len(emb)
    for c in np.unique(emb.class_ids):
        n = (emb.class_ids == c).sum()
        assert (emb.class_ids[gal] == c).sum() == round(2 / 3 * n)
    assert bench[0]["split"] == {
        "gallery": len(gal),
        "queries": len(qry),
        "seed": 0,
        "gallery_fraction": 2 / 3,
    }


def test_closed_set_numbers(bench: tuple[dict, Path], dev_embeddings: Path) -> None:
    report = bench[0]
    emb = load_embeddings(dev_embeddings)
    gal, qry = stratified_split(emb.class_ids, 2 / 3, 0)
    sims = emb.vectors[qry] @ emb.vectors[gal].T  # brute force with numpy
    order = np.argsort(-sims, axis=1, kind="stable")[:, :20]
    for level, labels in (("class", emb.labels), ("make", emb.make)):
        g, q = labels[gal], labels[qry]
        top1 = top5 = hit1 = hit5 = 0
        for i in range(len(qry)):
            neigh = list(g[order[i]])
            ranked = _vote_oracle(neigh, sims[i, order[i]])
            top1 += ranked[0] == q[i]
            top5 += q[i] in ranked[:5]
            hit1 += neigh[0] == q[i]
            hit5 += q[i] in neigh[:5]
        got = report["closed"]["Flat"][level]
        n = len(qry)
        # Exact search: the same neighbours, up to ties in similarity between two gallery images.
        assert got["top1"] == pytest.approx(top1 / n, abs=2 / n)
        assert got["top5"] == pytest.approx(top5 / n, abs=2 / n)
        assert got["hit1"] == pytest.approx(hit1 / n, abs=2 / n)
        assert got["hit5"] == pytest.approx(hit5 / n, abs=2 / n)
    assert report["closed"]["Flat"]["class"]["top1"] > 0.15  # far above chance (1/196) on real embeddings
    assert report["closed"]["Flat"]["make"]["top1"] >= report["closed"]["Flat"]["class"]["top1"]


def test_index_numbers(bench: tuple[dict, Path], dev_embeddings: Path) -> None:
    report = bench[0]
    assert set(report["index"]) == set(FACTORIES)
    flat = report["index"]["Flat"]
    assert flat["1-recall@1"] == 1.0 and flat["10-recall@10"] == 1.0 and flat["params"] == ""
    emb = load_embeddings(dev_embeddings)
    gal, qry = stratified_split(emb.class_ids, 2 / 3, 0)
    truth = np.argsort(-(emb.vectors[qry] @ emb.vectors[gal].T), axis=1)[:, :10]
    from carsearch.index.factory import make_index, set_search_params, train_and_add

    for factory in ("IVF16,Flat", "IVF16,PQ40"):  # deterministic builds: rebuild and re-measure
        r = report["index"][factory]
        index = make_index(factory, emb.dim)
        train_and_add(index, emb.vectors[gal], np.arange(len(gal)))
        set_search_params(index, r["params"])
        _, found = index.search(emb.vectors[qry], 10)
        recall10 = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
        recall1 = np.mean(found[:, 0] == truth[:, 0])
        assert r["10-recall@10"] == pytest.approx(recall10, abs=1e-9)
        assert r["1-recall@1"] == pytest.approx(recall1, abs=2 / len(qry))
    from carsearch.bench.indexes import SINGLE_QUERIES

    n, d = len(gal), emb.dim
    timed = 0.0  # seconds the timed searches took, by the reported figures
    for r in report["index"].values():
        assert 0 < r["p50_ms"] <= r["p99_ms"] and r["build_seconds"] >= r["train_seconds"] >= 0
        assert r["build_seconds"] > 0
        # Half the single queries took at least the median, so their mean latency is at least half of it.
        assert r["qps_single"] <= 2e3 / r["p50_ms"], r
        timed += r["build_seconds"] + min(SINGLE_QUERIES, len(qry)) / r["qps_single"]
        timed += len(qry) / r["qps_batched"]
    # The builds and the timed searches (the single queries, one batched call) took no longer than the
    # whole bench.
    assert timed <= report["seconds"], (timed, report["seconds"])
    # Exact search does n x d multiply-adds a query: no CPU core does 2e11 of them a second.
    assert report["index"]["Flat"]["qps_batched"] * n * d <= 2e11 * report["machine"]["cpus"]
    # Memory: the peak the report gives lies between the kernel's high-water marks before and after the
    # bench (getrusage and /proc count a few pages differently); a build's growth is whole pages, under it.
    assert 0.99 * PEAKS["before"] <= report["peak_rss_bytes"] <= 1.01 * PEAKS["after"], (report, PEAKS)
    page = os.sysconf("SC_PAGE_SIZE")
    for r in report["index"].values():
        assert 0 <= r["build_rss_growth_bytes"] <= report["peak_rss_bytes"]
        assert r["build_rss_growth_bytes"] % page == 0, r["build_rss_growth_bytes"]
    # Each index holds at least its vectors: whole for Flat, IVF-Flat and HNSW (with 2 x 32 links each).
    for factory, least in (("Flat", 4 * d), ("IVF16,Flat", 4 * d), ("HNSW32", 4 * d + 2 * 32 * 4)):
        assert report["index"][factory]["memory_bytes"] >= n * least, factory
    pq = report["index"]["IVF16,PQ40"]
    # 40-byte codes + 8-byte ids per vector, plus the fixed PQ codebooks and IVF centroids.
    expected = n * (40 + 8) + 4 * 256 * d + 4 * 16 * d
    assert expected * 0.95 <= pq["memory_bytes"] <= expected * 1.1, (pq["memory_bytes"], expected)
    assert flat["memory_bytes"] >= n * d * 4
    assert report["index"]["HNSW32"]["sweep"] and [
        p["param"] for p in report["index"]["IVF16,Flat"]["sweep"]
    ] == [f"nprobe={v}" for v in (1, 2, 4, 8, 16)]
    numpy_peer = next(p for p in report["peers"] if p["name"].startswith("numpy"))
    assert numpy_peer["10-recall@10"] == 1.0
    hnswlib_peer = next(p for p in report["peers"] if p["name"].startswith("hnswlib"))
    assert hnswlib_peer["sweep"] and hnswlib_peer["10-recall@10"] > 0.8


def test_zero_shot_numbers(bench: tuple[dict, Path], dev_embeddings: Path) -> None:
    emb = load_embeddings(dev_embeddings)
    test = np.flatnonzero(emb.class_ids >= 99)
    x, c = emb.vectors[test], emb.class_ids[test]
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)  # a query never retrieves itself
    order = np.argsort(-sims, axis=1)
    z = bench[0]["zeroshot"]
    assert bench[0]["class_split"]["how"] == "cars196" and z["test_classes"] == "99-196"
    assert z["queries"] == len(test)
    for k in (1, 2, 4, 8):
        expected = np.mean([(c[order[i, :k]] == c[i]).any() for i in range(len(test))])
        assert z[f"recall@{k}"] == pytest.approx(expected, abs=2 / len(test))


def test_open_set_numbers(bench: tuple[dict, Path], dev_embeddings: Path) -> None:
    emb = load_embeddings(dev_embeddings)
    gal, qry = stratified_split(emb.class_ids, 2 / 3, 0)
    gal = gal[emb.class_ids[gal] <= 98]
    known, unknown = qry[emb.class_ids[qry] <= 98], qry[emb.class_ids[qry] > 98]
    s_known = (emb.vectors[known] @ emb.vectors[gal].T).max(axis=1)
    s_unknown = (emb.vectors[unknown] @ emb.vectors[gal].T).max(axis=1)
    # AUROC by direct pair counting.
    pairs = (s_known[:, None] > s_unknown[None, :]).sum() + 0.5 * (
        s_known[:, None] == s_unknown[None, :]
    ).sum()
    o = bench[0]["openset"]
    assert o["auroc"] == pytest.approx(pairs / (len(known) * len(unknown)), abs=1e-4)
    t95 = np.sort(s_known)[int(np.floor(0.05 * len(s_known) + 1e-9))]
    assert o["fpr@95tpr"] == pytest.approx(np.mean(s_unknown >= t95), abs=1e-4)
    assert (o["known_queries"], o["unknown_queries"]) == (len(known), len(unknown))
    # The deployed threshold comes from the gallery alone (leave-one-out), and its rates follow from it.
    thr = o["threshold"]
    assert o["tpr_at_threshold"] == pytest.approx(np.mean(s_known >= thr), abs=1e-4)
    assert o["fpr_at_threshold"] == pytest.approx(np.mean(s_unknown >= thr), abs=1e-4)
    coverage = [p["coverage"] for p in o["curve"]]
    assert coverage == sorted(coverage, reverse=True) and coverage[0] == 1.0


def test_confusion_matrix_counts(bench: tuple[dict, Path]) -> None:
    conf = bench[0]["confusion"]
    m = np.array(conf["matrix"])
    assert m.shape == (len(conf["classes"]), len(conf["classes"])) and len(conf["classes"]) <= 12
    assert (m - np.diag(np.diag(m))).sum() > 0  # the matrix shows mistakes between its classes


def test_files_and_valid_pngs(bench: tuple[dict, Path]) -> None:
    report, out = bench
    assert json.loads((out / "report.json").read_text())["closed"]["Flat"] == report["closed"]["Flat"]
    md = (out / "report.md").read_text()
    assert "## Closed-set kNN classification" in md and "## Open set" in md and "| `HNSW32` |" in md
    assert "build +RSS" in md and "peak memory" in md and "**Leakage:**" in md
    lk = report["leakage"]
    assert 0 <= lk["exact_copies"] <= lk["leaked_queries"] and lk["rate"] == pytest.approx(
        lk["leaked_queries"] / report["split"]["queries"], abs=1e-4
    )
    assert set(report["plots"]) == {"recall_vs_qps", "top1_by_index", "accuracy_coverage", "confusion"}
    for name in report["plots"].values():
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(out / name) as img:
            img.verify()


def test_cli_end_to_end_and_json(dev_embeddings: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "-q",
            "bench",
            str(dev_embeddings),
            "--out",
            str(tmp_path / "r"),
            "--factory",
            "Flat",
            "--protocol",
            "closed,zeroshot",
            "--no-peers",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert (
        printed["closed"]["Flat"]["class"]["top1"] > 0 and "index" not in printed and "openset" not in printed
    )
    assert (tmp_path / "r" / "report.md").is_file() and (tmp_path / "r" / "top1_by_index.png").is_file()
    human = CliRunner().invoke(
        cli,
        [
            "-q",
            "bench",
            str(dev_embeddings),
            "--out",
            str(tmp_path / "h"),
            "--factory",
            "Flat",
            "--protocol",
            "closed",
            "--no-plots",
        ],
    )
    assert human.exit_code == 0 and "top-1" in human.stdout
    bad = CliRunner().invoke(
        cli, ["bench", str(dev_embeddings), "--out", str(tmp_path / "x"), "--protocol", "speed"]
    )
    assert bad.exit_code == 1 and "unknown protocol 'speed'" in bad.stderr
    # A timing that would never end is refused before anything runs (--timing-seconds inf hung).
    forever = CliRunner().invoke(
        cli, ["bench", str(dev_embeddings), "--out", str(tmp_path / "x"), "--timing-seconds", "inf"]
    )
    assert forever.exit_code == 2 and "0.01<=x<=60.0" in forever.output
    for seconds in (float("nan"), float("inf"), 0.0):
        with pytest.raises(CarsearchError, match="not a time to measure for"):
            BenchSettings(timing_seconds=seconds)


def test_unlabelled_embeddings_allow_only_the_index_protocol(tmp_path: Path) -> None:
    import shutil

    from carsearch.embed import embed_dataset
    from tests.conftest import DEV

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in sorted(p.name for p in (DEV / "images").iterdir())[:30]:
        shutil.copyfile(DEV / "images" / name, photos / name)
    embed_dataset(
        EmbedJob(photos, tmp_path / "emb", backbone="efficientnet_lite0", weights="none"), progress=False
    )
    with pytest.raises(CarsearchError, match="needs labelled images"):
        run_bench(tmp_path / "emb", tmp_path / "r", BenchSettings(factories=["Flat"]), progress=False)
    report = run_bench(
        tmp_path / "emb",
        tmp_path / "r",
        BenchSettings(factories=["Flat"], protocols=("index",), peers=False, plots=False),
        progress=False,
    )
    assert report["index"]["Flat"]["10-recall@10"] == 1.0 and "top1" not in report["index"]["Flat"]


def test_split_of_a_class_does_not_depend_on_the_other_classes() -> None:
    classes = np.repeat(np.arange(1, 21), 9)
    full_gal, _ = stratified_split(classes, 2 / 3, 5)
    subset = classes <= 10
    sub_gal, _ = stratified_split(classes[subset], 2 / 3, 5)
    assert set(full_gal[classes[full_gal] <= 10].tolist()) == set(sub_gal.tolist())


def test_confusion_and_confidence_come_from_exact_search_without_flat(
    dev_embeddings: Path, tmp_path: Path
) -> None:
    """They describe the classifier, not an index type: a bench of IVF-PQ alone draws them from exact
    search, so they equal those of a Flat bench."""
    common = {"protocols": ("closed",), "peers": False, "sweep": False, "plots": False}
    pq = run_bench(
        dev_embeddings, tmp_path / "pq", BenchSettings(factories=["IVF16,PQ40"], **common), progress=False
    )
    flat = run_bench(
        dev_embeddings, tmp_path / "flat", BenchSettings(factories=["Flat"], **common), progress=False
    )
    assert pq["closed"]["IVF16,PQ40"]["class"]["top1"] != flat["closed"]["Flat"]["class"]["top1"]
    assert pq["confusion"] == flat["confusion"]
    assert pq["closed_confidence_curve"] == flat["closed_confidence_curve"]


# --- a collection that is not Stanford Cars: small, VMMRdb-style folders ------------------------------------

VMMRDB_CLASSES = [1, 14, 30, 45, 60, 75, 90, 105, 120, 135, 150, 165]


@pytest.fixture(scope="module")
def vmmrdb_embeddings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VMMRdb-style folder (make_model_year/) of 12 classes x 10 real photos (linked), embedded with lite0:
    its class ids are carsearch's numbering of the folder names, 1-12, not Cars196's."""
    from carsearch.embed import embed_dataset
    from tests.conftest import DEV, pick

    root = tmp_path_factory.mktemp("vmmrdb")
    for row in pick(VMMRDB_CLASSES, 10):
        *make_model, year = row["class_name"].replace("/", "-").split()
        folder = root / "data" / f"{make_model[0].lower()}_{' '.join(make_model[1:]).lower()}_{year}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / Path(row["image"]).name).symlink_to(DEV / row["image"])
    embed_dataset(EmbedJob(root / "data", root / "emb", backbone="efficientnet_lite0"), progress=False)
    return root / "emb"


def test_default_index_types_leave_out_what_the_gallery_cannot_train() -> None:
    """Issue 20, item 8: 8-bit PQ (IVF-PQ, OPQ+IVF-PQ) below 39 x 256 training vectors, IVF below two
    lists of 39, are left out and each is named with the reason; at faiss's minimum they are kept."""
    from carsearch.bench.indexes import default_factories

    kept, left_out = default_factories(400, 1280)
    assert kept == ["Flat", "HNSW32", "IVF8,Flat"]
    assert list(left_out) == ["IVF8,PQ80", "OPQ80_320,IVF8,PQ80"]
    assert all("9,984 training vectors" in why and "holds 400" in why for why in left_out.values())
    kept, left_out = default_factories(9_984, 1280)
    assert left_out == {} and kept == [
        "Flat",
        "HNSW32",
        "IVF256,Flat",
        "IVF256,PQ80",
        "OPQ80_320,IVF256,PQ80",
    ]
    assert "IVF128,PQ80" in default_factories(9_983, 1280)[1]
    kept, left_out = default_factories(77, 2048)
    assert kept == ["Flat", "HNSW32"] and list(left_out) == [
        "IVF1,Flat",
        "IVF1,PQ128",
        "OPQ128_512,IVF1,PQ128",
    ]
    assert "78 training vectors" in left_out["IVF1,Flat"]


def test_the_pq_minimum_is_where_faiss_stops_warning() -> None:
    """The oracle for the threshold above is faiss itself: training 8-bit PQ codebooks on 39 x 256 vectors
    prints no 'please provide at least' warning, on one vector fewer it does."""
    import faiss

    from carsearch.index.factory import captured_stderr

    x = np.random.default_rng(0).standard_normal((9_984, 4)).astype(np.float32)
    for n, warned in ((9_984, False), (9_983, True)):
        pq = faiss.IndexPQ(4, 1, 8)  # one sub-quantizer of 8 bits: 256 centroids
        pq.pq.cp.niter = 1  # the warning comes before the first iteration
        with captured_stderr() as lines:
            pq.train(x[:n])
        assert any("please provide at least 9984 training points" in line for line in lines) == warned, lines


def test_bench_of_a_small_vmmrdb_collection_with_default_types_and_classes(
    vmmrdb_embeddings: Path, tmp_path: Path
) -> None:
    """Issue 20, items 8 and 9: `carsearch bench` with the default index types and class ranges on a small
    VMMRdb folder ends: the PQ types it cannot train are left out and named, Cars196's class ranges (which
    do not fit) give way to a seeded half split of its own classes, said in the output, and the report ends
    with a recommendation. (Peers, sweeps and plots, which the issue does not touch, are off for speed.)"""
    out = tmp_path / "r"
    result = CliRunner().invoke(
        cli,
        ["bench", str(vmmrdb_embeddings), "--out", str(out), "--no-peers", "--no-sweep", "--no-plots"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    emb = load_embeddings(vmmrdb_embeddings)
    ids = sorted(np.unique(emb.class_ids).tolist())
    assert ids == list(range(1, 13))

    assert list(report["index"]) == ["Flat", "HNSW32", "IVF2,Flat"]
    assert list(report["index_left_out"]) == ["IVF2,PQ80", "OPQ80_320,IVF2,PQ80"]
    md = (out / "report.md").read_text()
    assert "- `IVF2,PQ80`: 8-bit product quantisation" in md and "- `OPQ80_320,IVF2,PQ80`:" in md
    assert "IVF2,PQ80                    left out" in result.stdout

    split = report["class_split"]
    known, test = class_range(split["known"]), class_range(split["test"])
    assert split["how"] == "halves" and not known & test and known | test == set(ids) and len(known) == 6
    assert "does not fit this collection" in split["note"] and "seed 0" in split["note"]
    assert "classes: Cars196's class split" in result.stdout and "**Classes:**" in md
    in_test = np.isin(emb.class_ids, sorted(test))
    assert (
        report["zeroshot"]["queries"] == in_test.sum() and report["zeroshot"]["test_classes"] == split["test"]
    )
    gal, qry = stratified_split(emb.class_ids, 2 / 3, 0)
    assert report["openset"]["unknown_queries"] == in_test[qry].sum()
    assert report["openset"]["gallery"] == (~in_test[gal]).sum()

    rec = report["recommendation"]
    assert rec["factory"] in report["index"] and report["index"][rec["factory"]]["10-recall@10"] >= 0.95
    assert md.rstrip().split("\n")[-3:-1] == ["## Recommendation", ""]
    assert md.rstrip().endswith(rec["why"]) and f"recommended: {rec['factory']}" in result.stdout


def test_class_ranges_given_that_do_not_fit_stop_before_measuring(
    vmmrdb_embeddings: Path, tmp_path: Path
) -> None:
    """Ranges given by hand are kept; when the collection has no image in them the bench stops at once,
    naming the class ids it has, and writes nothing."""
    for args, said in (
        (["--test-classes", "99-196"], "the zero-shot test classes 99-196 hold fewer than two images"),
        (["--known-classes", "1-98", "--test-classes", "5-6"], "the known classes 1-98 are all"),
    ):
        result = CliRunner().invoke(
            cli, ["bench", str(vmmrdb_embeddings), "--out", str(tmp_path / "r"), *args]
        )
        assert result.exit_code == 1 and said in result.stderr, result.output
        assert "its class ids are 1-12 (`carsearch dataset DATA_DIR` lists them)" in result.stderr
        assert "Traceback" not in result.output and not (tmp_path / "r").exists()


def test_class_split_choice() -> None:
    """Cars196's ranges when they fit; a range given alone takes the other classes as its counterpart;
    otherwise seeded halves (same seed, same halves), and why Cars196's did not fit is said."""
    from carsearch.bench.protocols import choose_class_split

    cars = np.arange(1, 197)
    assert choose_class_split(cars, None, None, 0).how == "cars196"
    assert choose_class_split(np.array([90, 97, 120, 150]), None, None, 0).how == "cars196"
    one = choose_class_split(np.arange(1, 11), "1-4", None, 0)
    assert (one.known, one.test, one.how) == ("1-4", "5-10", "given")
    for ids, numbered, reason in (
        (np.arange(1, 301), False, "104 of its 300 class ids lie outside 1-196 (such as 197)"),
        (np.arange(1, 21), False, "of its 20 classes, 20 lie in 1-98 and 0 in 99-196"),
        (cars, True, "carsearch's numbering of its class names"),
    ):
        split = choose_class_split(ids, None, None, 3, numbered)
        assert split.how == "halves" and reason in split.note and "seed 3" in split.note
        known, test = class_range(split.known), class_range(split.test)
        assert not known & test and known | test == set(ids.tolist())
        assert len(known) - len(test) == len(ids) % 2
        assert choose_class_split(ids, None, None, 3, numbered) == split
        assert choose_class_split(ids, None, None, 4, numbered).known != split.known
    with pytest.raises(CarsearchError, match="this one has 1: run --protocol closed,index"):
        choose_class_split(np.array([7, 7, 7]), None, None, 0)


def test_class_spec_and_numbering() -> None:
    from carsearch.eval.splits import class_spec, numbered_by_name

    for ids in ([1, 2, 3, 7, 9, 10], [5], [1, 3, 5], list(range(99, 197))):
        assert class_range(class_spec(ids)) == set(ids)
    assert class_spec([3, 1, 2, 2, 7]) == "1-3,7"
    names = np.array(["b", "a", "c", "a"], dtype=object)
    assert numbered_by_name(names, np.array([2, 1, 3, 1]))
    assert not numbered_by_name(names, np.array([14, 3, 99, 3]))


def _measured(recall: float, p50: float, top1: float, mib: float = 2.0) -> dict:
    return {
        "10-recall@10": recall,
        "p50_ms": p50,
        "top1": top1,
        "qps_batched": 1000 / p50,
        "memory_bytes": mib * 2**20,
        "build_seconds": 0.1,
    }


def test_recommendation_follows_the_measured_figures() -> None:
    """Exact search unless an approximate type is 1.5x faster at the target recall and within a point of
    kNN top-1; none at the target: the closest."""
    from carsearch.bench.indexes import recommend

    flat = _measured(1.0, 0.30, 0.72)
    fast = {"Flat": flat, "HNSW32": _measured(0.99, 0.05, 0.72), "IVF8,Flat": _measured(0.97, 0.08, 0.72)}
    rec = recommend(fast, 0.95)
    assert rec["factory"] == "HNSW32" and "6.0x faster than exact search" in rec["why"]
    close = {"Flat": flat, "HNSW32": _measured(0.99, 0.25, 0.72)}
    rec = recommend(close, 0.95)
    assert rec["factory"] == "Flat" and "within 1.5x" in rec["why"]
    short = {"Flat": flat, "HNSW32": _measured(0.90, 0.05, 0.72), "IVF8,Flat": _measured(0.99, 0.05, 0.70)}
    assert recommend(short, 0.95)["factory"] == "Flat"  # one misses the recall, the other loses top-1
    no_flat = {"HNSW32": _measured(0.90, 0.05, 0.72), "IVF8,PQ80": _measured(0.80, 0.02, 0.65)}
    rec = recommend(no_flat, 0.95)
    assert rec["factory"] == "HNSW32" and "comes closest" in rec["why"]
