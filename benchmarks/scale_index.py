"""Index types at VMMRdb scale (~290k vectors) on synthetic vectors, with the bench index protocol.

No collection of that size is available here, so the vectors are synthesised from real embeddings:
each of C synthetic classes gets a centre near a randomly chosen real class mean (the real mean plus a
Gaussian offset with half the covariance spread of the real class means), and each synthetic image is that
centre plus a Gaussian residual with the covariance of the real residuals (image minus its class mean),
L2-normalised. The report says so, with same-class / other-class cosine and 1-NN accuracy of real and
synthetic vectors side by side.

    python benchmarks/scale_index.py EMB_DIR --out reports/scale [--classes 9170] [--per-class 32]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from carsearch.bench.runner import BenchSettings, run_bench
from carsearch.embed import load_embeddings
from carsearch.embed.store import EmbeddingSet
from carsearch.index.families import ivf_lists


def synthesise(real: EmbeddingSet, classes: int, per_class: int, seed: int) -> EmbeddingSet:
    rng = np.random.default_rng(seed)
    x, cls = real.vectors.astype(np.float64), real.class_ids
    uniq = np.unique(cls)
    means = np.stack([x[cls == c].mean(axis=0) for c in uniq])
    residuals = x - means[np.searchsorted(uniq, cls)]
    # Gaussian factors with the real covariances: z @ L has covariance L^T L = (the real one).
    # (Reusing real residuals verbatim would give "twins" across classes closer than any classmate.)
    _, s_res, vt_res = np.linalg.svd(residuals, full_matrices=False)
    l_res = s_res[:, None] * vt_res / np.sqrt(len(residuals))
    centred = means - means.mean(axis=0)
    _, s_mean, vt_mean = np.linalg.svd(centred, full_matrices=False)
    l_mean = s_mean[:, None] * vt_mean / np.sqrt(len(means))
    base = rng.integers(0, len(uniq), classes)
    # Half the spread of real class means around a real mean: synthetic classes crowd around real ones,
    # as VMMRdb's 9,170 classes (many model years of one model) crowd more than Stanford's 196.
    centres = means[base] + 0.5 * rng.standard_normal((classes, len(s_mean))) @ l_mean
    n = classes * per_class
    labels = np.repeat(np.arange(classes), per_class)
    vectors = np.empty((n, x.shape[1]), dtype=np.float32)
    for start in range(0, n, 50_000):  # in chunks: float64 intermediates of 290k x 1280 are 3 GB
        stop = min(n, start + 50_000)
        v = centres[labels[start:stop]] + rng.standard_normal((stop - start, len(s_res))) @ l_res
        vectors[start:stop] = v / np.linalg.norm(v, axis=1, keepdims=True)
    names = np.array([f"synthetic class {c}" for c in labels], dtype=object)
    empty = np.full(n, "", dtype=object)
    return EmbeddingSet(
        vectors=vectors,
        ids=np.arange(n, dtype=np.int64),
        class_ids=labels.astype(np.int32) + 1,
        paths=empty,
        labels=names,
        make=names,
        model=empty,
        year=empty,
        sha256=empty,
        manifest=real.manifest,
        folder=real.folder,
    )


def realism(emb: EmbeddingSet, sample: int = 3000, seed: int = 0) -> dict[str, float]:
    """Mean same-class and other-class cosine and leave-one-out 1-NN accuracy on a sample of classes."""
    rng = np.random.default_rng(seed)
    keep = np.isin(
        emb.class_ids,
        rng.choice(np.unique(emb.class_ids), min(100, len(np.unique(emb.class_ids))), replace=False),
    )
    idx = np.flatnonzero(keep)[:sample]
    x, c = emb.vectors[idx], emb.class_ids[idx]
    sims = x @ x.T
    same = c[:, None] == c[None, :]
    off = ~np.eye(len(x), dtype=bool)
    nn = np.where(off, sims, -np.inf).argmax(axis=1)
    return {
        "same_class_cos": float(sims[same & off].mean()),
        "other_class_cos": float(sims[~same].mean()),
        "nn1_accuracy_100_classes": float(np.mean(c[nn] == c)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("emb_dir", help="real embeddings to resample (e.g. the dev set embedded with lite0)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--classes", type=int, default=9170, help="VMMRdb has 9,170 classes")
    ap.add_argument("--per-class", type=int, default=32, help="VMMRdb averages ~32 images per class")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--factory", action="append", help="index type (repeat); default: the five main types")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("faiss").setLevel(logging.WARNING)

    real = load_embeddings(args.emb_dir)
    emb = synthesise(real, args.classes, args.per_class, args.seed)
    stats = {"real": realism(real), "synthetic": realism(emb)}
    logging.info("realism: %s", json.dumps(stats))
    n, d = len(emb), emb.dim
    gallery = n - args.classes  # one held-out image per class
    lists = ivf_lists(gallery)
    m = next(m for m in range(d // 16, 0, -1) if d % m == 0)
    factories = args.factory or [
        "Flat",
        "HNSW32",
        f"IVF{lists},Flat",
        f"IVF{lists},PQ{m}",
        f"OPQ{m}_{4 * m},IVF{lists},PQ{m}",
    ]
    settings = BenchSettings(
        factories=factories,
        protocols=("closed", "index"),
        gallery_fraction=1 - 1 / args.per_class,
        max_queries=args.queries,
        seed=args.seed,
        peers=not args.no_peers,
        note=(
            f"synthetic vectors: {args.classes} classes x {args.per_class} images resampled around the "
            f"class means of {len(real)} real {real.provenance['backbone']} embeddings of {real.folder} "
            "(centre = real class mean + Gaussian offset with half the real between-class covariance, "
            "image = centre + Gaussian residual with the real within-class covariance); kNN accuracies "
            "are of the synthetic classes, not of cars. Realism on 100 classes, real vs synthetic: "
            f"{json.dumps(stats)}"
        ),
    )
    report = run_bench(None, args.out, settings, emb=emb)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print(Path(args.out, "report.md").read_text())


if __name__ == "__main__":
    main()
