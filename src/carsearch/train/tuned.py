"""The tuned workflow in one call: a labelled embedding folder -> a car-tuned index.

1. A projection head is trained on the cached embeddings (seconds on a CPU) on a stratified part of each
   class; the rest is held out and chooses the best epoch.
2. Every shard is projected by the head (no CNN), into `INDEX/embeddings/`; the head lives in `INDEX/head/`
   and the projected shards' provenance names it, so queries are embedded through it automatically.
3. The index is built over the projected vectors, and the open-set threshold is calibrated on the held-out
   images only (each scored without itself), never on the head's training images.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from carsearch import defaults
from carsearch.embed.project import project_embeddings
from carsearch.embed.store import load_embeddings
from carsearch.errors import CarsearchError
from carsearch.eval.splits import stratified_split
from carsearch.index.build import build_index, calibrate_on_members, save_info_extra
from carsearch.train.head import train_head

log = logging.getLogger(__name__)

HEAD_DIR = "head"
EMBEDDINGS_DIR = "embeddings"


def build_tuned_index(
    emb_dir: str | Path,
    out: str | Path,
    *,
    factory: str = defaults.FACTORY,
    memory_budget: int = defaults.MEMORY_BUDGET,
    target_recall: float = defaults.TARGET_RECALL,
    embed_dim: int = defaults.EMBED_DIM,
    epochs: int = defaults.HEAD_EPOCHS,
    holdout: float = defaults.TUNE_HOLDOUT,
    calibrate: bool = True,
    openset_k: int = defaults.OPENSET_K,
    tpr: float = defaults.TPR,
    seed: int = defaults.SEED,
    progress: bool = True,
) -> dict:
    """Train a head on `emb_dir`'s labelled embeddings, index the projected vectors into `out`, calibrate
    on held-out images. Returns index.json with a `tuning` section."""
    out = Path(out).expanduser().resolve()
    emb = load_embeddings(emb_dir)
    if len(emb) == 0 or (emb.class_ids < 0).any():
        raise CarsearchError(
            f"{emb.folder} is not a labelled collection (every image needs a class); "
            "build without --tune-head."
        )
    if not 0 < holdout < 1:
        raise CarsearchError("--tune-holdout must be between 0 and 1.")
    t0 = time.perf_counter()
    trained = train_head(
        emb.folder,
        out / HEAD_DIR,
        epochs=epochs,
        embed_dim=embed_dim,
        train_fraction=1 - holdout,
        seed=seed,
        overwrite=True,
        progress=progress,
    )
    train_s = time.perf_counter() - t0
    projected = out / EMBEDDINGS_DIR
    project_embeddings(emb.folder, out / HEAD_DIR, projected)
    info = build_index(
        [projected], out, factory, memory_budget, target_recall, calibrate=False, tpr=tpr, seed=seed
    )
    # The images the head never trained on (its validation split: the same split train_head made).
    _, held = stratified_split(emb.class_ids, 1 - holdout, seed)
    projected_set = load_embeddings(projected)
    calibration = projected_set.subset(np.isin(projected_set.ids, emb.ids[held]))
    tuning = {
        "head": str(out / HEAD_DIR),
        "source_embeddings": str(emb.folder),
        "embed_dim": embed_dim,
        "epochs": epochs,
        "best_epoch": trained.best_epoch,
        "holdout": holdout,
        "validation_recall_at_1": round(trained.best_recall_at_1, 4),
        "frozen_recall_at_1": round(trained.baseline_recall_at_1, 4),
        "train_seconds": round(train_s, 2),
    }
    if not calibrate:
        return save_info_extra(out, {"tuning": tuning})
    info = calibrate_on_members(
        out,
        calibration.ids,
        calibration.vectors,
        f"{len(calibration)} images held out from the projection head's training",
        tpr,
        extra={"tuning": tuning},
        k=openset_k,
    )
    log.info(
        "tuned: validation Recall@1 %.3f (frozen %.3f) in %.1f s; index over the projected vectors in %s",
        trained.best_recall_at_1,
        trained.baseline_recall_at_1,
        train_s,
        out,
    )
    return info
