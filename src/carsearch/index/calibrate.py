"""The open-set threshold of an index and its vote-share cut, from photos of known classes each searched
without itself: the collection's own (leave-one-out, at build time), held-out photos (`index calibrate`),
or indexed photos held out from what shaped the embedding (a tuned network's held-out split)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from carsearch import defaults
from carsearch.embed.store import load_embeddings
from carsearch.errors import CarsearchError
from carsearch.eval.openset import calibrated, kth_similarity, leave_one_out_neighbors, uncertain_threshold
from carsearch.fsutil import exclusive_lock
from carsearch.index.core import Index
from carsearch.index.settings import IndexSettings
from carsearch.index.store import Gallery, open_bundle, save_bundle
from carsearch.index.stream import Source
from carsearch.models.files import INFO_FILE as CHECKPOINT_INFO
from carsearch.provenance import check_compatible

log = logging.getLogger(__name__)


def _trained_on_this_collection(sets: list[Source]) -> bool:
    """Whether the embeddings come from a `carsearch train` checkpoint trained on the same records."""
    for emb in sets:
        info_path = Path(emb.provenance.get("weights", "")) / CHECKPOINT_INFO
        if info_path.is_file():
            try:
                training = json.loads(info_path.read_text()).get("training", {})
            except ValueError:
                continue
            if training.get("data") == emb.manifest["dataset"]["records_sha256"]:
                return True
    return False


def _openset(scores: np.ndarray, k: int, tpr: float, method: str, unknown: np.ndarray | None = None) -> dict:
    return {"k": k, **calibrated(scores, tpr, method, unknown)}


def leave_one_out_openset(
    index: Index,
    gallery: Gallery,
    vectors: np.ndarray,
    rows: np.ndarray,
    s: IndexSettings,
    sets: list[Source],
    out: Path,
) -> dict:
    """index.json's `openset`: thresholds from the collection's own photos (`rows`, shape (m,); their
    float32 `vectors`, (m, d)), each searched without itself."""
    sims, found = leave_one_out_neighbors(
        index, vectors, gallery.ids[rows], max(s.openset_k, defaults.K_VOTE)
    )
    scores = kth_similarity(sims, s.openset_k)
    method = f"leave-one-out on {len(scores)} collection images"
    if _trained_on_this_collection(sets):
        method += " (the model was trained on this collection: the threshold is too strict)"
        log.warning(
            "these embeddings come from a checkpoint trained on this dataset: images it was trained on "
            "sit closer together than new photos will, so a leave-one-out threshold rejects too many "
            "known cars; calibrate on held-out images: carsearch index calibrate %s --queries EMB_DIR",
            out,
        )
    openset = _openset(scores, s.openset_k, s.tpr, method)
    openset["uncertain"] = uncertain_threshold(sims, found, gallery.level("class")[rows], gallery, s.tpr)
    return openset


def calibrate_index(
    index_dir: str | Path, queries_dir: str | Path, tpr: float = defaults.TPR, k: int | None = None
) -> dict:
    """Set the open-set threshold from held-out images of known classes (an embedding folder).

    Queries whose label is not in the index count as unknown: they are not used for the threshold, and
    the share of them still accepted is reported as the false-positive rate.
    """
    folder = Path(index_dir).expanduser().resolve()
    with exclusive_lock(folder):
        bundle = open_bundle(folder)
        queries = load_embeddings(queries_dir)
        check_compatible(bundle.provenance, queries.provenance, str(folder), str(queries.folder))
        if len(queries) == 0:
            raise CarsearchError(f"{queries.folder} holds no embeddings to calibrate on.")
        k = k or (bundle.info.get("openset") or {}).get("k", defaults.OPENSET_K)
        overlap = np.intersect1d(queries.ids, bundle.gallery.ids)
        if len(overlap) == len(queries.ids) and set(queries.paths) <= set(bundle.gallery.paths):
            raise CarsearchError(
                f"all {len(queries)} calibration images are in the index itself; calibrate on held-out "
                "images."
            )
        # An image that is also in the index (the same file, under any id) would find itself at similarity
        # 1: each such image is searched without itself.
        id_of = dict(zip(bundle.gallery.sha256.tolist(), bundle.gallery.ids.tolist(), strict=True))
        self_ids = np.array([id_of.get(sha, -2) for sha in queries.sha256.tolist()], dtype=np.int64)
        if (self_ids != -2).any():
            log.warning(
                "%d of the %d calibration images are in the index; each is scored without itself.",
                int((self_ids != -2).sum()),
                len(queries),
            )
        method = f"held-out images from {queries.folder}"
        return _calibrate(bundle, queries.vectors, queries.labels, self_ids, k, tpr, method)


def calibrate_on_members(
    index_dir: str | Path,
    ids: np.ndarray,
    vectors: np.ndarray,
    method: str,
    tpr: float = defaults.TPR,
    extra: dict | None = None,
    k: int | None = None,
    reference: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict:
    """Set the open-set threshold from images that are in the index (by id) but were held out from what
    shaped the embedding (e.g. a projection head's training): each is scored without itself.

    `reference`: (ids (n,) int64, vectors (n, d) float32) of the indexed images as embedded by the network
    that `vectors` come from, when that is not the network of the index (a refit trained on the held-out
    images afterwards: the threshold comes from the network that had not seen them); the held-out images are
    then scored against an exact index of those."""
    folder = Path(index_dir).expanduser().resolve()
    with exclusive_lock(folder):
        bundle = open_bundle(folder)
        rows = bundle.gallery.rows(ids)
        if (rows < 0).any():
            raise CarsearchError("internal: calibration ids are not all in the index.")
        k = k or (bundle.info.get("openset") or {}).get("k", defaults.OPENSET_K)
        labels = bundle.gallery.labels[rows]
        scored = (
            None if reference is None else Index.build("Flat", reference[1], reference[0], target_recall=None)
        )
        return _calibrate(bundle, vectors, labels, np.asarray(ids), k, tpr, method, extra, scored)


def _calibrate(
    bundle,
    vectors,
    labels,
    self_ids: np.ndarray,
    k: int,
    tpr: float,
    method: str,
    extra: dict | None = None,
    scored: Index | None = None,
) -> dict:
    sims, found = leave_one_out_neighbors(scored or bundle.index, vectors, self_ids, max(k, defaults.K_VOTE))
    scores = kth_similarity(sims, k)
    known_labels = set(bundle.gallery.labels.tolist()) - {""}
    known = np.array([lab in known_labels or not lab for lab in labels])
    if known.sum() == 0:
        raise CarsearchError("none of the calibration images has a class that is in the index.")
    openset = _openset(scores[known], k, tpr, method, scores[~known])
    if known.sum() < defaults.MIN_CALIBRATION_PHOTOS:
        log.warning(
            "the unknown-model threshold rests on only %d held-out photos (%s): take 'unknown' and "
            "'uncertain' as rough; %d or more make them trustworthy (more photos per class, or index "
            "calibrate with a held-out folder).",
            int(known.sum()),
            method,
            defaults.MIN_CALIBRATION_PHOTOS,
        )
    openset["uncertain"] = uncertain_threshold(
        sims[known], found[known], np.asarray(labels)[known], bundle.gallery, tpr
    )
    info = {**bundle.info, "openset": openset, **(extra or {})}
    return save_bundle(bundle.folder, bundle.index, bundle.gallery, info)
