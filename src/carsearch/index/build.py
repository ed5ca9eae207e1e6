"""Index operations: build, add, remove, calibrate, info. Each reads and writes an index folder."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from carsearch import defaults
from carsearch.embed.store import MANIFEST, load_embeddings
from carsearch.errors import CarsearchError
from carsearch.eval.neighbors import drop_self, sample_queries
from carsearch.eval.openset import (
    calibrated,
    kth_similarity,
    leave_one_out_neighbors,
    uncertain_threshold,
)
from carsearch.fsutil import exclusive_lock, sha256_file
from carsearch.index.auto import choose_factory, human_bytes
from carsearch.index.core import Index
from carsearch.index.factory import make_index, min_training_points, train, training_rows
from carsearch.index.idlist import read_id_files, shard_paths
from carsearch.index.settings import IndexSettings
from carsearch.index.store import Gallery, open_bundle, save_bundle
from carsearch.index.stream import ShardStream, Source, open_sources
from carsearch.index.tune import tune_with_truth
from carsearch.memwatch import peak_rss_bytes
from carsearch.models.files import INFO_FILE as CHECKPOINT_INFO
from carsearch.provenance import check_compatible, library_versions

log = logging.getLogger(__name__)


def source_entry(folder: Path, m: dict) -> dict:
    """What index.json records of an embedding folder it holds rows from."""
    return {
        "embeddings": str(folder),
        "root": m["dataset"]["root"],
        "format": m["dataset"]["format"],
        "records_sha256": m["dataset"]["records_sha256"],
        "manifest_sha256": sha256_file(folder / MANIFEST),
        "complete": m.get("complete", False),
        "shards": [{"file": s["file"], "sha256": s["sha256"], "rows": s["rows"]} for s in m["shards"]],
    }


def _refuse_to_drop_uploads(out: Path) -> None:
    """Refuse to rebuild over photos a server acknowledged (POST /api/images), naming how many."""
    try:
        info = json.loads((out / "index.json").read_text())
        uploads = [i for i, src in enumerate(info.get("sources", [])) if src.get("uploads")]
    except (OSError, ValueError, AttributeError):
        return
    if not uploads:
        return
    try:
        held = int((open_bundle(out, verify=False).gallery.source == uploads[0]).sum())
    except CarsearchError:
        held = len(list((out / "uploads").glob("*")))
    if held:
        raise CarsearchError(
            f"{out} holds {held} photos added over POST /api/images (files in {out / 'uploads'}), which no "
            "embedding folder has: rebuilding it would drop them. Build into another folder, or pass "
            "--drop-uploads to rebuild without them."
        )


def check_unique_ids(ids: np.ndarray, taken: np.ndarray | None = None) -> None:
    """Raises CarsearchError when `ids` repeat one another or an id in `taken` (an index's own)."""
    uniq, counts = np.unique(ids, return_counts=True)
    clash = uniq[counts > 1]
    if taken is not None and len(taken):
        clash = np.union1d(clash, np.intersect1d(ids, taken))
    if len(clash):
        raise CarsearchError(
            f"{len(clash)} ids occur twice (first: {int(clash[0])}): two embedding folders share an id "
            "range; "
            "embed the second collection with --id-start above the first one's largest id."
        )


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


def build_index(
    emb_dirs: list[str | Path],
    out: str | Path,
    settings: IndexSettings | None = None,
    *,
    exclude: list[str | Path] | None = None,
    allow_duplicates: bool = False,
    drop_uploads: bool = False,
) -> dict:
    """Build an index over one or more embedding folders, streaming their shards; returns index.json.

    `exclude`: files of image ids (index/idlist.py: `id<TAB>path` or an id a line) left out, e.g. an
    audit's exclude-duplicates.txt or suspects.txt; a listed path that is not the photo its id stands for
    here is refused (a list written for another folder). A file (sha256) that several folders hold is
    indexed once (the first folder's row) unless `allow_duplicates`; index.json counts the rows left out.
    Rebuilding a folder that holds photos added over POST /api/images is refused unless `drop_uploads`:
    they are in no embedding folder, and the rebuilt index would silently lose them.

    Memory follows the index, not the collection: training uses a seeded sample of at most `max_train`
    vectors (by default as many as a quarter of --memory-budget holds, within fixed bounds), and vectors
    are added shard by shard."""
    s = settings or IndexSettings()
    if not emb_dirs:
        raise CarsearchError("give at least one embedding folder.")
    out = Path(out).expanduser().resolve()
    if not drop_uploads:
        _refuse_to_drop_uploads(out)
    sets = open_sources(emb_dirs)
    excluded = read_id_files(exclude or [], shard_paths(sets))
    stream = ShardStream(sets, excluded, allow_duplicates)
    if stream.duplicates:
        log.warning(
            "%d images are files an earlier folder already holds (same sha256): indexed once "
            "(--allow-duplicates indexes every copy).",
            stream.duplicates,
        )
    n, d = stream.n, stream.d
    if n == 0:
        raise CarsearchError(
            "the embedding folders hold no vectors; run embed first (or check failures.jsonl)."
        )
    factory, auto = _resolve_factory(s, n, d)
    index = Index(make_index(factory, d), factory)
    # The training sample counts against the memory budget too (faiss may copy it once more).
    max_train = s.max_train or min(
        defaults.MAX_TRAIN_VECTORS,
        max(defaults.MIN_TRAIN_VECTORS, min_training_points(index.faiss), s.memory_budget // (8 * d)),
    )
    train_rows = None if index.faiss.is_trained else training_rows(n, max_train, s.seed)
    if train_rows is None and not index.faiss.is_trained:
        train_rows = np.arange(n)
    tune_rows = sample_queries(n, defaults.TUNE_QUERIES, s.seed)
    loo_rows = (
        sample_queries(n, defaults.CALIBRATION_SAMPLE, s.seed) if s.calibrate else np.zeros(0, np.int64)
    )
    wanted = np.unique(np.concatenate([r for r in (train_rows, tune_rows, loo_rows) if r is not None]))
    gallery, picked = stream.metadata_and_rows(wanted)
    ids = gallery.ids
    check_unique_ids(ids)

    def rows_of(positions: np.ndarray) -> np.ndarray:
        return picked[np.searchsorted(wanted, positions)]

    index.timings["train"] = 0.0 if train_rows is None else train(index.faiss, rows_of(train_rows), s.seed)
    t0 = time.perf_counter()
    truth_sims, truth_ids = stream.add_and_search(index.faiss, rows_of(tune_rows), defaults.TUNE_K + 1)
    index.timings["add"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    truth = drop_self(truth_sims, truth_ids, ids[tune_rows], defaults.TUNE_K)[1]
    index.tuned = tune_with_truth(index.faiss, rows_of(tune_rows), ids[tune_rows], truth, s.target_recall)
    index.params = index.tuned.params
    index.timings["tune"] = time.perf_counter() - t0
    tuned = index.tuned
    if not tuned.reached:
        log.warning(
            "%s reaches 10-recall@10 %.3f at best (%s), below the target %.2f.",
            factory,
            tuned.recall,
            tuned.params,
            s.target_recall,
        )
    openset = None
    if s.calibrate and n > s.openset_k:
        openset = _leave_one_out_openset(index, gallery, rows_of(loo_rows), loo_rows, s, sets, out)
    info = {
        "factory": factory,
        "search_params": tuned.params,
        "provenance": {k: v for k, v in sets[0].provenance.items() if k != "precision"},
        "sources": [source_entry(src.folder, src.manifest) for src in sets],
        "auto": auto,
        "build": {
            "train_seconds": round(index.timings["train"], 3),
            "add_seconds": round(index.timings["add"], 3),
            "tune_seconds": round(index.timings["tune"], 3),
            "seed": s.seed,
            "training_vectors": n if train_rows is None else len(train_rows),
            # The build's whole process, at its peak.
            "peak_rss_bytes": peak_rss_bytes(),
        },
        "recall": tuned.to_json(s.target_recall),
        "memory_bytes": index.memory_bytes,
        "excluded": (
            {
                "files": [str(Path(f).resolve()) for f in exclude or []],
                "ids_listed": len(excluded),
                "rows_left_out": stream.excluded,
            }
            if exclude
            else None
        ),
        "duplicates_left_out": stream.duplicates,
        "openset": openset,
        "versions": library_versions(),
    }
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out):
        return save_bundle(out, index, gallery, info)


def _resolve_factory(s: IndexSettings, n: int, d: int) -> tuple[str, dict | None]:
    """The factory string to build, and index.json's `auto` section when "auto" chose it."""
    if s.factory.strip().lower() != "auto":
        return s.factory, None
    choice = choose_factory(n, d, s.memory_budget)
    log.info("auto: %s (%s)", choice.factory, choice.reason)
    return choice.factory, {
        "chose": choice.factory,
        "reason": choice.reason,
        "memory_budget": s.memory_budget,
        "estimated_bytes": choice.estimated_bytes,
    }


def _leave_one_out_openset(
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


def save_info_extra(index_dir: str | Path, extra: dict) -> dict:
    """Record more facts in index.json (a new version of the folder, files unchanged)."""
    folder = Path(index_dir).expanduser().resolve()
    with exclusive_lock(folder):
        bundle = open_bundle(folder)
        return save_bundle(folder, bundle.index, bundle.gallery, {**bundle.info, **extra})


def index_info(index_dir: str | Path) -> dict:
    """index.json, after checking that the files match it."""
    bundle = open_bundle(index_dir)
    return {**bundle.info, "memory": human_bytes(bundle.info["memory_bytes"])}


__all__ = [
    "build_index",
    "calibrate_index",
    "calibrate_on_members",
    "index_info",
    "save_info_extra",
]
