"""`carsearch bench`: every protocol on one embedding folder, written as report.json, report.md and plots."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from carsearch import SCHEMA_VERSION, defaults
from carsearch.bench.indexes import (
    TIMING_SECONDS,
    default_factories,
    measure,
    recommend,
    sweep,
)
from carsearch.bench.protocols import ClassSplit, check_class_split, choose_class_split, open_set, zero_shot
from carsearch.embed.store import EmbeddingSet, load_embeddings
from carsearch.errors import CarsearchError
from carsearch.eval.duplicates import nearest_in
from carsearch.eval.edited_copies import confirm_leaks, cosine_threshold, photo_lookup
from carsearch.eval.knn import knn_metrics, vote_details
from carsearch.eval.neighbors import exact_search
from carsearch.eval.splits import class_range, numbered_by_name, stratified_split
from carsearch.fsutil import write_json_atomic, write_text_atomic
from carsearch.index.core import Index
from carsearch.index.families import neighbour_index
from carsearch.memwatch import PeakGrowth, peak_rss_bytes
from carsearch.progress import Progress
from carsearch.provenance import library_versions

log = logging.getLogger(__name__)

PROTOCOLS = ("closed", "zeroshot", "openset", "index")
CONFUSION_CLASSES = 12


@dataclass
class BenchSettings:
    # Empty: default_factories() for the gallery size, less the types it is too small to train.
    factories: list[str] = field(default_factory=list)
    protocols: tuple[str, ...] = PROTOCOLS
    k: int = defaults.K_VOTE
    temperature: float = defaults.TEMPERATURE
    seed: int = defaults.SEED
    gallery_fraction: float = defaults.GALLERY_FRACTION
    # None: Cars196's (defaults.KNOWN_CLASSES / TEST_CLASSES) where they fit the collection, else its own
    # classes in two seeded halves (protocols.choose_class_split).
    known_classes: str | None = None
    test_classes: str | None = None
    openset_k: int = defaults.OPENSET_K
    tpr: float = defaults.TPR
    target_recall: float = defaults.TARGET_RECALL
    max_queries: int | None = None  # index / closed protocols: a seeded sample of the held-out queries
    classes: str | None = None  # only these class ids take part (e.g. the classes a model was trained on)
    peers: bool = True
    sweep: bool = True
    plots: bool = True
    # Each batched speed figure: the best of 3 timings of repeated searches, each this long (curves' points
    # 0.4 of it, best of 2). Shorter is noisier; tests use a short one.
    timing_seconds: float = TIMING_SECONDS
    note: str = ""  # stated in the report, e.g. "synthetic vectors"

    def __post_init__(self) -> None:
        unknown = set(self.protocols) - set(PROTOCOLS)
        if unknown:
            raise CarsearchError(
                f"unknown protocol {sorted(unknown)[0]!r}; choose from {', '.join(PROTOCOLS)}."
            )
        lo, hi = defaults.BENCH_MIN_TIMING_SECONDS, defaults.BENCH_MAX_TIMING_SECONDS
        if not lo <= self.timing_seconds <= hi:
            raise CarsearchError(
                f"timing_seconds {self.timing_seconds} is not a time to measure for: give {lo:g} to {hi:g} "
                "seconds."
            )


def _accuracy_coverage(scores: np.ndarray, correct: np.ndarray, points: int = 40) -> list[dict]:
    """As the threshold on `scores` rises: the share of queries answered and how many of those are right.
    Coverage runs from 100% down to 2.5%: below that a handful of queries make the accuracy noise."""
    out = []
    for t in np.unique(np.quantile(scores, np.linspace(0, 0.975, points))):
        accepted = scores >= t
        out.append(
            {
                "threshold": float(t),
                "coverage": float(accepted.mean()),
                "accuracy": float(correct[accepted].mean()) if accepted.any() else 1.0,
            }
        )
    return out


def _confusion(truth: np.ndarray, pred: list[str | None], top: int = CONFUSION_CLASSES) -> dict:
    """Counts among the classes of the most frequent confusions (rows: true class, columns: predicted).

    Classes are taken pair by pair, most frequent (true, predicted) mistake first, so both sides of each
    confusion are in the matrix, next to each other."""
    pairs: dict[tuple[str, str], int] = {}
    for t, p in zip(truth, pred, strict=True):
        if p is not None and p != t:
            pairs[(t, p)] = pairs.get((t, p), 0) + 1
    classes: list[str] = []
    for (t, p), _ in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0])):
        for c in (t, p):
            if c not in classes and len(classes) < top:
                classes.append(c)
        if len(classes) >= top:
            break
    pos = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=int)
    for t, p in zip(truth, pred, strict=True):
        if t in pos and p in pos:
            matrix[pos[t], pos[p]] += 1
    return {"classes": classes, "matrix": matrix.tolist()}


def _machine() -> dict:
    import faiss
    import torch

    return {
        "cpus": os.cpu_count(),
        # Other programs' demand for the CPUs as the bench begins: above half of them, timings are noisy.
        "load_average": round(os.getloadavg()[0], 2),
        "faiss_threads": faiss.omp_get_max_threads(),
        "torch_threads": torch.get_num_threads(),
        "versions": library_versions(),
    }


def run_bench(
    emb_dir: str | Path,
    out: str | Path,
    settings: BenchSettings | None = None,
    emb: EmbeddingSet | None = None,
    progress: bool = True,
) -> dict:
    """Run the chosen protocols; write report.json, report.md and PNG plots into `out`; return the report."""
    s = settings or BenchSettings()
    t_start = time.perf_counter()
    emb = emb if emb is not None else load_embeddings(emb_dir)
    numbered = numbered_by_name(emb.labels, emb.class_ids)  # on the whole collection, before --classes
    if s.classes:
        emb = emb.subset(np.isin(emb.class_ids, sorted(class_range(s.classes))))
    out = Path(out).expanduser().resolve()
    labelled = bool(len(emb)) and (emb.class_ids >= 0).all()
    needs_labels = [p for p in s.protocols if p != "index"]
    if needs_labels and not labelled:
        raise CarsearchError(
            f"the {needs_labels[0]} protocol needs labelled images; {emb.folder} has unlabelled "
            "ones: run --protocol index only."
        )
    if len(emb) < 10:
        raise CarsearchError(f"{emb.folder} holds {len(emb)} embeddings; a benchmark needs at least 10.")
    split: ClassSplit | None = None
    if "zeroshot" in s.protocols or "openset" in s.protocols:
        # Chosen and checked before anything is measured: a split that cannot run stops the bench now.
        split = choose_class_split(emb.class_ids, s.known_classes, s.test_classes, s.seed, numbered)
        check_class_split(emb.class_ids, split, s.protocols)
        if split.note:
            log.info("bench: %s", split.note)
    class_ids = emb.class_ids if labelled else np.arange(len(emb)) % 10
    gal, qry = stratified_split(class_ids, s.gallery_fraction, s.seed)
    if s.max_queries and len(qry) > s.max_queries:
        qry = np.sort(np.random.default_rng(s.seed).choice(qry, s.max_queries, replace=False))
    factories, left_out = (list(s.factories), {}) if s.factories else default_factories(len(gal), emb.dim)
    for factory, why in left_out.items():
        log.info("bench: %s left out: %s", factory, why)
    prov = emb.provenance
    report: dict = {
        "kind": "carsearch.bench",
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "note": s.note,
        "embeddings": {
            "folder": str(emb.folder),
            "vectors": len(emb),
            "dim": emb.dim,
            "classes": len(np.unique(emb.class_ids)) if labelled else None,
            "backbone": prov.get("backbone"),
            "weights": prov.get("weights"),
            "crop": prov.get("preprocessing", {}).get("crop"),
            "precision": prov.get("precision"),
        },
        "settings": {
            **asdict(s),
            "factories": factories,
            "protocols": list(s.protocols),
            **({"known_classes": split.known, "test_classes": split.test} if split else {}),
        },
        "index_left_out": left_out,
        **({"class_split": asdict(split)} if split else {}),
        "split": {
            "gallery": len(gal),
            "queries": len(qry),
            "seed": s.seed,
            "gallery_fraction": s.gallery_fraction,
        },
        "machine": _machine(),
    }
    g_vec, q_vec = emb.vectors[gal], emb.vectors[qry]
    # Queries with a near-duplicate in the gallery inflate every kNN figure below: say how many.
    # The audit's rule: the nearest gallery photo at the threshold, or an edited copy confirmed by the
    # photos' local features (eval/edited_copies.py).
    leak_index = neighbour_index(g_vec)
    leak_sims, leak_rows = nearest_in(leak_index, q_vec)
    gallery_photo, query_photo = photo_lookup(emb, gal), photo_lookup(emb, qry)
    leak, leak_sims, _ = confirm_leaks(
        leak_index, q_vec, leak_sims, leak_rows, None, gallery_photo, query_photo
    )
    report["leakage"] = {
        "threshold": cosine_threshold(None, gallery_photo is not None and query_photo is not None),
        "leaked_queries": int(leak.sum()),
        "rate": round(float(leak.mean()), 4),
        "exact_copies": int((leak_sims >= defaults.EXACT_COPY_SIMILARITY).sum()),
    }
    truth = exact_search(g_vec, np.arange(len(gal)), q_vec, 10)[1]
    steps = len(factories) * (("closed" in s.protocols) + ("index" in s.protocols))
    flat_pred: tuple[list, np.ndarray] | None = None
    with Progress(max(1, steps), "bench", "step", enabled=progress, every=10) as bar:
        if "closed" in s.protocols or "index" in s.protocols:
            report["closed"], report["index"] = {}, {}
            for factory in factories:
                log.info("bench: %s", factory)
                with PeakGrowth() as grew:
                    run = Index.build(factory, g_vec, seed=s.seed, target_recall=s.target_recall)
                # One k-neighbour search per index type serves the closed-set metrics, the index table's
                # kNN accuracy and (for Flat) the confusion matrix and confidence curve.
                knn = _knn(run, emb, gal, qry, s) if labelled else None
                if "closed" in s.protocols:
                    report["closed"][factory] = {
                        "params": run.params,
                        "k": s.k,
                        "temperature": s.temperature,
                        "class": knn["class"],
                        "make": knn["make"],
                    }
                    if factory == "Flat":
                        flat_pred = knn["votes"]
                    bar.update(1)
                if "index" in s.protocols:
                    report["index"][factory] = _index(run, q_vec, truth, s, knn)
                    report["index"][factory]["build_rss_growth_bytes"] = grew.bytes
                    bar.update(1)
            if not report["closed"]:
                del report["closed"]
            if not report["index"]:
                del report["index"]
    if "index" in s.protocols and s.peers:
        from carsearch.bench.peers import measure_peers

        report["peers"], report["peers_skipped"] = measure_peers(
            g_vec, q_vec, truth, s.target_recall, seed=s.seed, seconds=s.timing_seconds
        )
    if split and "zeroshot" in s.protocols:
        report["zeroshot"] = {"test_classes": split.test, **zero_shot(emb, class_range(split.test))}
    if split and "openset" in s.protocols:
        report["openset"] = _openset(emb, split.known, s)
    if flat_pred is None and "closed" in s.protocols and labelled:
        # The confusion matrix and the confidence curve describe the classifier, not an index type:
        # always from exact search, also when Flat is not among the compared factories.
        sims, rows = exact_search(g_vec, np.arange(len(gal)), q_vec, s.k)
        flat_pred = vote_details(emb.labels[gal], sims, rows, s.k, s.temperature)
    if flat_pred is not None:
        pred, conf = flat_pred
        correct = np.array(pred, dtype=object) == emb.labels[qry]
        report["closed_confidence_curve"] = _accuracy_coverage(conf, correct)
        report["leakage"]["top1_all"] = round(float(correct.mean()), 4)
        clean = ~leak
        without = round(float(correct[clean].mean()), 4) if clean.any() else None
        report["leakage"]["top1_without_leaked"] = without
        report["confusion"] = _confusion(emb.labels[qry], pred)
    if report.get("index"):
        report["recommendation"] = recommend(report["index"], s.target_recall)
        load, cpus = report["machine"]["load_average"], report["machine"]["cpus"] or 1
        if load >= cpus / 2:
            report["recommendation"]["why"] += (
                f" Other programs kept this machine busy as the bench began (load average {load} on {cpus} "
                "CPUs), so these timings, and the choice, are noisier than an idle machine's."
            )
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report["peak_rss_bytes"] = peak_rss_bytes()
    out.mkdir(parents=True, exist_ok=True)
    if s.plots:
        from carsearch.bench.plots import write_plots

        report["plots"] = write_plots(report, out)
    from carsearch.bench.report import markdown

    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", markdown(report))
    return report


def _knn(run: Index, emb: EmbeddingSet, gal: np.ndarray, qry: np.ndarray, s: BenchSettings) -> dict:
    """kNN metrics (class and make levels) and each query's vote (label, confidence), from one search."""
    sims, rows = run.search(emb.vectors[qry], s.k)
    out = {}
    for level in ("class", "make"):
        labels = emb.level(level)
        out[level] = knn_metrics(labels[gal], labels[qry], sims, rows, s.k, s.temperature)
    out["votes"] = vote_details(emb.labels[gal], sims, rows, s.k, s.temperature)
    return out


def _index(run: Index, q_vec: np.ndarray, truth: np.ndarray, s: BenchSettings, knn: dict | None) -> dict:
    out = {
        "params": run.params,
        "build_seconds": run.build_seconds,
        "train_seconds": run.timings["train"],
        "memory_bytes": run.memory_bytes,
        "tuned_recall@10": run.tuned.recall,
        **measure(run.search, q_vec, truth, seconds=s.timing_seconds),
    }
    if knn is not None:
        out.update({key: knn["class"][key] for key in ("top1", "top5", "hit1", "hit5")})
    if s.sweep:
        out["sweep"] = sweep(run, q_vec, truth, seconds=s.timing_seconds)
    return out


def _openset(emb: EmbeddingSet, known_classes: str, s: BenchSettings) -> dict:
    r = open_set(
        emb,
        class_range(known_classes),
        s.openset_k,
        k=s.k,
        temperature=s.temperature,
        tpr=s.tpr,
        gallery_fraction=s.gallery_fraction,
        seed=s.seed,
    )
    scores = np.concatenate([r.pop("scores_known"), r.pop("scores_unknown")])
    correct = np.concatenate([r.pop("correct_known"), np.zeros(r["unknown_queries"], dtype=bool)])
    curve = []
    known = np.arange(len(scores)) < r["known_queries"]
    for point in _accuracy_coverage(scores, correct):
        accepted = scores >= point["threshold"]
        # Open-set accuracy: a known query counts when accepted and right, an unknown one when rejected.
        point["open_set_accuracy"] = float(((accepted & correct) | (~known & ~accepted)).mean())
        curve.append(point)
    return {"known_classes": known_classes, **r, "curve": curve}
