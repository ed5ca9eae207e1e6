"""The tuned workflow in one call: a labelled embedding folder -> a car-tuned index (`index build --tune`).

1. A network is trained on a stratified part of each class; the rest is held out and chooses the best
   epoch. Preset `head`: a projection head on the cached embeddings (seconds on a CPU), in `INDEX/head/`.
   Preset `cpu-hour` (mode partial): the last stages of the backbone + a projection on cached prefix
   activations of the collection's photos, in `INDEX/model/` (its activation cache beside it).
2. Every shard gets the tuned network's vectors, into `INDEX/embeddings/` (the head projects the stored
   vectors; the partial fine-tune embeds from the cached activations: no photo is decoded twice); their
   provenance names the checkpoint, so queries are embedded through it automatically.
3. The index is built over the tuned vectors, and the open-set threshold is calibrated on the held-out
   images only (each scored without itself), never on the training images.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from carsearch import defaults
from carsearch.embed.project import derive_embeddings, project_embeddings
from carsearch.embed.store import EmbeddingSet, load_embeddings
from carsearch.errors import CarsearchError
from carsearch.eval.class_cosine import CLASS_WEIGHTS_FILE, load_class_weights, max_class_cosine
from carsearch.eval.openset import calibrated
from carsearch.eval.splits import stratified_split
from carsearch.fsutil import sha256_file
from carsearch.index.build import build_index, save_info_extra
from carsearch.index.calibrate import calibrate_on_members
from carsearch.index.settings import IndexSettings
from carsearch.models.checkpoint import read_info
from carsearch.models.preprocess import Preprocessing
from carsearch.train.head import train_head
from carsearch.train.partial import Collection, train_partial
from carsearch.train.settings import TrainSettings, get_preset
from carsearch.train.state import TrainResult

log = logging.getLogger(__name__)

HEAD_DIR = "head"
MODEL_DIR = "model"
EMBEDDINGS_DIR = "embeddings"


def build_tuned_index(
    emb_dir: str | Path,
    out: str | Path,
    *,
    preset: str = "head",
    settings: TrainSettings | None = None,
    index: IndexSettings | None = None,
    holdout: float = defaults.TUNE_HOLDOUT,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
    cache_dir: str | Path | None = None,
) -> dict:
    """Train the `preset`'s network (or `settings`, which override it whole) on `emb_dir`'s labelled
    collection, index the tuned vectors into `out` as `index` says (its seed also splits off the `holdout`
    share of each class), calibrate on held-out images when `index.calibrate`. Returns index.json with a
    `tuning` section. Raises CarsearchError for an
    unlabelled collection, a holdout outside (0, 1), or a preset this command cannot run (gpu: train it
    with `carsearch train --preset gpu`, then embed with --weights)."""
    out = Path(out).expanduser().resolve()
    emb = load_embeddings(emb_dir)
    if len(emb) == 0 or (emb.class_ids < 0).any():
        raise CarsearchError(
            f"{emb.folder} is not a labelled collection (every image needs a class); build without --tune."
        )
    if not 0 < holdout < 1:
        raise CarsearchError("--tune-holdout must be between 0 and 1.")
    s = settings or get_preset(preset).settings
    ix = index or IndexSettings()
    seed, tpr = ix.seed, ix.tpr
    t0 = time.perf_counter()
    projected = out / EMBEDDINGS_DIR
    reference = None  # the collection by the network the held-out images picked, when a refit followed
    if s.mode == "head":
        s = s.override(train_fraction=1 - holdout, seed=seed)
        trained = train_head(emb.folder, out / HEAD_DIR, s, overwrite=True, progress=progress)
        project_embeddings(emb.folder, out / HEAD_DIR, projected)
        network_dir = out / HEAD_DIR
    elif s.mode == "partial":
        s = s.override(train_fraction=1 - holdout, seed=seed)
        trained, reference = _tune_partial(emb, out / MODEL_DIR, s, projected, progress, on_epoch, cache_dir)
        network_dir = out / MODEL_DIR
    else:
        raise CarsearchError(
            f"index build --tune runs the head and cpu-hour presets; a {s.mode} fine-tune trains on images: "
            "run `carsearch train DATA --out CKPT --preset gpu`, embed with `--weights CKPT`, then build."
        )
    train_s = time.perf_counter() - t0
    build_index([projected], out, replace(ix, calibrate=False))
    # The images the head never trained on (its validation split: the same split train_head made).
    _, held = stratified_split(emb.class_ids, 1 - holdout, seed)
    projected_set = load_embeddings(projected)
    calibration = projected_set.subset(np.isin(projected_set.ids, emb.ids[held]))
    cal_vectors = calibration.vectors
    if reference is not None:  # a refit trained on the held-out images: the network before it scores them
        cal_vectors = reference[1][np.searchsorted(reference[0], calibration.ids)]
    tuning = {
        "preset": preset,
        "settings": s.to_dict() if s.mode != "head" else None,
        "mode": s.mode,
        "network": str(network_dir),
        "source_embeddings": str(emb.folder),
        "embed_dim": s.embed_dim,
        "epochs": s.epochs,
        "best_epoch": trained.best_epoch,
        "holdout": holdout,
        "validation_metric": trained.validation_metric,
        "validation_recall_at_1": round(trained.best_recall_at_1, 4),
        "frozen_recall_at_1": round(trained.baseline_recall_at_1, 4),
        "train_seconds": round(train_s, 2),
        "refit": None
        if trained.refit is None
        else {k: v for k, v in trained.refit.items() if k != "history"},
    }
    if not ix.calibrate:
        return save_info_extra(out, {"tuning": tuning})
    info = calibrate_on_members(
        out,
        calibration.ids,
        cal_vectors,
        f"{len(calibration)} images held out from the tuned network's training",
        tpr,
        extra={"tuning": tuning},
        k=ix.openset_k,
        reference=reference,
    )
    if reference is None:  # a refit's network was not what the held-out images were scored by
        info = _calibrate_class_cosine(out, network_dir, emb, calibration, tpr, info)
    log.info(
        "tuned: validation Recall@1 %.3f (frozen %.3f) in %.1f s; index over the projected vectors in %s",
        trained.best_recall_at_1,
        trained.baseline_recall_at_1,
        train_s,
        out,
    )
    return info


def _calibrate_class_cosine(
    out: Path, network_dir: Path, emb: EmbeddingSet, held: EmbeddingSet, tpr: float, info: dict
) -> dict:
    """index.json's openset.class_cosine: the tuned network's class weights as the unknown-model score
    (eval/class_cosine.py), its threshold kept by `tpr` of the held-out images (`held`, the tuned vectors of
    images the network never trained on), as the neighbour score's is."""
    loaded = load_class_weights(network_dir)
    if loaded is None:  # a loss without class weights (proxy-anchor heads)
        return info
    weights, class_ids = loaded
    label_of = dict(zip(emb.class_ids.tolist(), emb.labels.tolist(), strict=True))
    method = "largest cosine to the tuned network's class weights (Vaze et al., ICLR 2022)"
    cc = {
        **calibrated(max_class_cosine(held.vectors, weights), tpr, method),
        "sha256": sha256_file(network_dir / CLASS_WEIGHTS_FILE),
        "labels": [label_of[c] for c in class_ids.tolist()],
    }
    return save_info_extra(out, {"openset": {**info["openset"], "class_cosine": cc}})


def _tune_partial(
    emb: EmbeddingSet,
    model_dir: Path,
    s: TrainSettings,
    projected: Path,
    progress: bool,
    on_epoch: Callable[[dict], None] | None,
    cache_dir: str | Path | None = None,
) -> tuple[TrainResult, tuple[np.ndarray, np.ndarray] | None]:
    """Partial fine-tune on the collection's photos; its vectors, from the cache, into `projected`. Returns
    the result and, after a refit, (ids sorted, vectors) of the collection by the network before it."""
    flip = bool(emb.provenance["preprocessing"].get("flip"))
    if s.crop != emb.provenance["preprocessing"]["crop"] or s.backbone != emb.provenance["backbone"]:
        s = s.override(crop=emb.provenance["preprocessing"]["crop"], backbone=emb.provenance["backbone"])
    data = Collection(
        emb.root, tuple(emb.paths.tolist()), emb.class_ids, emb.manifest["dataset"]["records_sha256"]
    )
    run = train_partial(
        data,
        model_dir,
        s,
        cache_dir=cache_dir,
        flip=flip,
        embed_all=True,
        overwrite=True,
        progress=progress,
        on_epoch=on_epoch,
    )
    if not run.ok.all():
        bad = np.flatnonzero(~run.ok)
        raise CarsearchError(
            f"{len(bad)} photo(s) of the collection could not be read again for training (first: "
            f"{emb.root / emb.paths[bad[0]]}); restore them, or embed the collection again without them."
        )
    row_of = {int(i): r for r, i in enumerate(emb.ids)}
    # The checkpoint's own framing (the training resolution may differ from the collection's embeddings).
    prep = Preprocessing.from_dict(read_info(model_dir)["preprocessing"]).with_flip(flip)
    prov = {
        **emb.provenance,
        "preprocessing": prep.to_dict(),
        "weights": str(model_dir),
        "weights_sha256": run.weights_sha256,
        "weights_source": str(model_dir),
        "dim": int(run.embeddings.shape[1]),
    }
    derive_embeddings(
        emb.folder, projected, prov, lambda rows: run.embeddings[[row_of[int(i)] for i in rows.ids]]
    )
    if run.calibration is None:
        return run.result, None
    order = np.argsort(emb.ids)
    return run.result, (emb.ids[order], run.calibration[order])
