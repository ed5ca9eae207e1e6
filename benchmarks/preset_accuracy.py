"""A training preset on the dev protocol, run as a user runs it: `index build GALLERY --tune PRESET`.

Dev protocol (shared/DESIGN.md): each class of the dev folder is split 2/3 gallery (+ training) / 1/3
queries (seeded per-class split, seed 0). The one command sees only the gallery: it trains on 80% of each
gallery class, picks its epoch on the other 20%, embeds the gallery from its cached activations and
indexes it. The queries are then embedded from their photos through the index's checkpoint (what
`classify --index` does) and classified by the weighted kNN vote (k=20, T=0.07).

`--known 1-98`: the open-set / zero-shot protocol instead: the collection is the gallery images of classes
1-98 only; every dev photo is then embedded with the checkpoint; Recall@1/2/4/8 on classes 99-196 (never
seen), open-set AUROC and FPR@95%TPR (the index's scores: similarity to the nearest known image).

The curve: every `--curve-every` epochs the current checkpoint (model.safetensors, the EMA weights when the
preset uses EMA) embeds the gallery and the queries from cached activations (the queries' cache is the
benchmark's own, built before training starts and timed apart) and its closed-set top-1 (under `--known`:
zero-shot Recall@1 on the never-seen classes) is printed with the training wall time so far; that
evaluation's own time is subtracted from the minutes shown.

    carsearch embed ../shared/data/stanford-cars-dev --out emb/lite0 --backbone efficientnet_lite0
    python benchmarks/preset_accuracy.py emb/lite0 --preset cpu-hour --work /tmp/preset-acc
    python benchmarks/preset_accuracy.py emb/lite0 --preset cpu-hour --known 1-98 --work /tmp/preset-os

`--quick` (the recipe table): the delivered checkpoint is scored from cached activations, as the curve is,
instead of embedding every dev photo again (the two agree within bf16 rounding: tests/test_partial.py);
`--set FIELD=VALUE` overrides any TrainSettings field (`--set loss=arcface --set margin=0.2`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from carsearch.embed import embed_dataset
from carsearch.embed.settings import EmbedJob
from carsearch.embed.store import load_embeddings, write_embedding_set
from carsearch.eval.neighbors import retrieval_recall
from carsearch.eval.splits import class_range, stratified_split
from carsearch.index.settings import IndexSettings
from carsearch.train.settings import TrainSettings, get_preset
from carsearch.train.tuned import build_tuned_index

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tuned_accuracy import closed_set, zero_shot_open_set


def checkpoint_activations(emb, model_dir: Path, cache_dir: Path, groups: dict, views: tuple[str, ...]):
    """The frozen prefix's activations of a partial fine-tune's checkpoint for groups of rows of `emb`
    ({name: rows}), at the checkpoint's test framing, cached in `cache_dir`: ({name: (n, views, C, H, W)
    bf16}, the trained stages, for `cut`)."""
    import torch

    from carsearch.models import load_backbone
    from carsearch.models.checkpoint import read_info
    from carsearch.models.cut import cut, resolve_trained
    from carsearch.models.preprocess import Preprocessing
    from carsearch.train.activations import ActivationCache, Group, Prefix, cache_key

    info = read_info(model_dir)
    t = info["training"]
    base = load_backbone(t["backbone"], t["weights"])
    trained = resolve_trained(base.model, len(t["train_blocks"].split(",")))
    split = cut(base.model, trained)
    prep = Preprocessing.from_dict(info["preprocessing"])
    cache = ActivationCache(
        cache_dir, cache_key(t["backbone"], base.weights.sha256, split.trained, prep, 0, True)
    )
    cache.prepare()
    prefix = Prefix(split.prefix, prep, torch.device("cpu"), True, 1)
    paths = [str(p) for p in emb.paths]
    out = {}
    for name, rows in groups.items():
        x, ok = cache.load(
            Group(name, tuple(paths[i] for i in rows), views), emb.root, prefix, progress=False
        )
        assert ok.all(), f"{int((~ok).sum())} photos of {name} unreadable"
        out[name] = x
    return out, trained


class Curve:
    """Closed-set top-1 of the current checkpoint every few epochs, from cached activations; under
    `--known`, zero-shot Recall@1 over the photos of the classes never trained on (`unseen` rows)."""

    def __init__(self, emb, gal, qry, model_dir: Path, work: Path, every: int, t0: float, unseen=None):
        self.emb, self.gal, self.qry, self.model_dir, self.every = emb, gal, qry, model_dir, every
        self.work, self.t0, self.spent, self.points = work, t0, 0.0, []
        self.groups = {"unseen": unseen} if unseen is not None else {"gallery": gal, "queries": qry}
        self.x = None

    def score(self, best: bool) -> dict:
        """Closed-set figures of the checkpoint (the delivered one, or the current epoch's); under
        `--known`, {"zero_shot_recall@1": R@1 over the never-seen classes' photos}."""
        from carsearch.models.checkpoint import load_checkpoint
        from carsearch.models.cut import cut
        from carsearch.train.partial import embed_cached

        if self.x is None:
            self.x, self.trained = checkpoint_activations(
                self.emb, self.model_dir, self.work / "curve-cache", self.groups, ("plain",)
            )
        net = load_checkpoint(self.model_dir, best=best).model
        suffix = cut(net.backbone, self.trained).suffix
        v = {name: embed_cached(net, suffix, x, True) for name, x in self.x.items()}
        if "unseen" in v:
            rows = self.groups["unseen"]
            recall = retrieval_recall(v["unseen"], self.emb.class_ids[rows], (1,))["recall@1"]
            return {"zero_shot_recall@1": recall}
        return closed_set(v["gallery"], self.emb.subset(self.gal), v["queries"], self.emb.subset(self.qry))

    def __call__(self, entry: dict) -> None:
        if entry["epoch"] % self.every:
            return
        t = time.perf_counter()
        r = self.score(best=False)
        self.spent += time.perf_counter() - t
        minutes = (time.perf_counter() - self.t0 - self.spent) / 60
        figure = "top1" if "top1" in r else "zero_shot_recall@1"
        self.points.append({"epoch": entry["epoch"], "minutes": round(minutes, 1), figure: r[figure]})
        metric = "knn_top1" if "knn_top1" in entry else "recall@1"
        print(
            f"curve: epoch {entry['epoch']}, {minutes:.1f} min, {figure} {100 * r[figure]:.1f}% "
            f"(validation {metric} {100 * entry[metric]:.1f}%)",
            flush=True,
        )


def openset_scores(tuned, gal: np.ndarray, known: np.ndarray, unknown: np.ndarray, model_dir: Path) -> dict:
    """AUROC and FPR@95%TPR of each candidate unknown-model score (higher = known): similarity to the
    nearest gallery image and to the k-th, the vote share of the winning class (k=20, T=0.07), and, for a
    cosine classifier, its largest cosine to a class weight and the energy logsumexp(s * cos)."""
    import torch
    from sklearn.metrics import roc_auc_score, roc_curve

    from carsearch.index.core import Index

    index = Index.build("Flat", tuned.vectors[gal], target_recall=None)
    queries = np.concatenate([known, unknown])
    is_known = np.r_[np.ones(len(known)), np.zeros(len(unknown))]
    sims, rows = index.search(tuned.vectors[queries], 20)
    labels = tuned.labels[gal][rows]
    weights = np.exp(sims / 0.07)
    share = np.array(
        [
            max(weights[i][labels[i] == c].sum() for c in set(labels[i])) / weights[i].sum()
            for i in range(len(rows))
        ]
    )
    scores = {
        "sim@1": sims[:, 0],
        "sim@5": sims[:, 4],
        "sim@20": sims[:, 19],
        "vote share (k=20)": share,
    }
    from carsearch.eval.class_cosine import load_class_weights

    saved = load_class_weights(model_dir)  # the delivered epoch's (what index build --tune calibrates)
    state = model_dir / "train_state.pt"
    weights = None if saved is None else saved[0]
    if weights is None and state.is_file():  # a checkpoint from before the weights were saved with it
        loss = torch.load(state, map_location="cpu", weights_only=True)["loss"]
        if "proxies" in loss:
            weights = torch.nn.functional.normalize(loss["proxies"].float(), dim=1).numpy()
    if weights is not None:
        cos = tuned.vectors[queries] @ weights.T
        scores["max cosine to a class weight"] = cos.max(1)
        scores["energy (s=16)"] = np.log(np.exp(16 * cos).sum(1)) / 16
    out = {}
    for name, score in scores.items():
        fpr, tpr, _ = roc_curve(is_known, score)
        out[name] = {
            "auroc": round(float(roc_auc_score(is_known, score)), 4),
            "fpr@95tpr": round(float(fpr[np.searchsorted(tpr, 0.95)]), 4),
        }
    return out


def product_verdicts(index_dir: Path, tuned, known: np.ndarray, unknown: np.ndarray) -> dict:
    """What `classify --index` says with the index's own calibrated threshold (held-out images, TPR 95%):
    the share of known-model queries kept and of unknown-model queries wrongly accepted, and the score."""
    from carsearch.search import Searcher

    searcher = Searcher.open(index_dir)
    out = {"score": "class weights" if searcher.class_cosine is not None else "neighbour similarity"}
    for name, rows in (("known_accepted", known), ("unknown_accepted", unknown)):
        answers = searcher.classify(np.ascontiguousarray(tuned.vectors[rows]))
        out[name] = round(float(np.mean([not a.unknown for a in answers])), 4)
    return out


def _field(text: str) -> tuple[str, object]:
    """`FIELD=VALUE` as a TrainSettings field and a value of the field's type."""
    name, _, value = text.partition("=")
    default = getattr(TrainSettings(), name, None)
    if name not in TrainSettings.__dataclass_fields__:
        raise SystemExit(f"--set {text}: no TrainSettings field {name!r}")
    if isinstance(default, bool):
        return name, value.lower() in ("1", "true", "yes")
    if isinstance(default, (int, float)):
        return name, type(default)(value)
    for kind in (int, float) if default is None else ():  # an optional number (image_size)
        try:
            return name, kind(value)
        except ValueError:
            pass
    return name, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("emb_dir", type=Path, help="frozen embeddings of the whole dev folder")
    ap.add_argument("--preset", default="cpu-hour")
    ap.add_argument("--epochs", type=int, help="override the preset's epochs")
    ap.add_argument("--train-blocks", help="override the preset's trained stages")
    ap.add_argument("--views", type=int, help="override the preset's augmented views")
    ap.add_argument("--loss", help="override the preset's loss")
    ap.add_argument("--lr", type=float, help="override the preset's learning rate")
    ap.add_argument("--ema", type=float, help="override the preset's EMA decay (0: off)")
    ap.add_argument("--test-image-size", type=int, help="override the preset's test resolution")
    ap.add_argument("--no-refit", action="store_true", help="deliver the network the held-out 20%% picked")
    ap.add_argument("--known", help="open-set protocol: the collection holds these classes only (1-98)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override any TrainSettings field (repeatable): --set margin=0.2",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="score the delivered checkpoint from cached activations instead of embedding every photo",
    )
    ap.add_argument("--curve-every", type=int, default=10)
    ap.add_argument(
        "--cache", type=Path, help="activation cache to reuse (a variant with the same views and cut)"
    )
    ap.add_argument("--work", type=Path, required=True)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    emb = load_embeddings(a.emb_dir)
    gal, qry = stratified_split(emb.class_ids, 2 / 3, 0)
    settings = (
        get_preset(a.preset)
        .settings.override(
            epochs=a.epochs,
            train_blocks=a.train_blocks,
            augmented_views=a.views,
            loss=a.loss,
            lr=a.lr,
            ema_decay=a.ema,
            test_image_size=a.test_image_size,
            refit=False if a.no_refit else None,
        )
        .override(**dict(_field(settings_text) for settings_text in a.set))
    )
    # --known: the rows of the classes trained on, and of those never seen.
    member = np.isin(emb.class_ids, sorted(class_range(a.known))) if a.known else None
    unseen = None if member is None else np.flatnonzero(~member)
    if member is not None:
        gal = np.intersect1d(gal, np.flatnonzero(member))
    collection = write_embedding_set(emb.subset(gal), a.work / "collection", "dev protocol gallery")
    t0 = time.perf_counter()
    curve = Curve(emb, gal, qry, a.work / "index" / "model", a.work, a.curve_every, t0, unseen)
    info = build_tuned_index(
        collection,
        a.work / "index",
        preset=a.preset,
        settings=settings,
        on_epoch=curve,
        cache_dir=a.cache,
        index=IndexSettings(factory="Flat"),
    )
    wall = time.perf_counter() - t0 - curve.spent
    tuning = info["tuning"]
    row = {
        "preset": a.preset,
        "settings": settings.to_dict(),
        "wall_minutes": round(wall / 60, 1),
        "cache_reused": a.cache is not None,
        "best_epoch": tuning["best_epoch"],
        "refit": tuning.get("refit"),
        "openset_threshold": info.get("openset"),
        "validation_recall_at_1": tuning["validation_recall_at_1"],
        "curve": curve.points,
    }
    if a.quick:
        row.update(curve.score(best=True), scored="from cached activations")
        print(json.dumps(row, indent=2))
        return
    # Every dev photo through the index's checkpoint, as `classify --index` embeds a query.
    prov = load_embeddings(a.work / "index" / "embeddings").provenance
    data = Path(emb.manifest["dataset"]["root"])
    embed_dataset(
        EmbedJob(
            data,
            a.work / "all",
            backbone=prov["backbone"],
            weights=prov["weights"],
            weights_sha256=prov["weights_sha256"],
            crop=prov["preprocessing"]["crop"],
            flip=bool(prov["preprocessing"].get("flip")),
        ),
        progress=False,
    )
    tuned = load_embeddings(a.work / "all")
    assert (tuned.ids == emb.ids).all()
    if a.known:
        row.update(zero_shot_open_set(a.work / "all", a.work / "bench"))
        known_q = np.intersect1d(qry, np.flatnonzero(member))
        row["openset_scores"] = openset_scores(tuned, gal, known_q, unseen, a.work / "index" / "model")
        row["product"] = product_verdicts(a.work / "index", tuned, known_q, unseen)
    else:
        row.update(closed_set(tuned.vectors[gal], emb.subset(gal), tuned.vectors[qry], emb.subset(qry)))
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
