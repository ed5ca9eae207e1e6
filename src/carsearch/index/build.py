"""Index operations: build, add, remove, calibrate, info. Each reads and writes an index folder."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from carsearch import defaults
from carsearch.embed.store import MANIFEST
from carsearch.errors import CarsearchError
from carsearch.eval.neighbors import drop_self, sample_queries
from carsearch.fsutil import exclusive_lock, sha256_file
from carsearch.index.auto import choose_factory, human_bytes
from carsearch.index.calibrate import leave_one_out_openset
from carsearch.index.core import Index
from carsearch.index.factory import make_index, min_training_points, train, training_rows
from carsearch.index.idlist import read_id_files, shard_paths
from carsearch.index.settings import IndexSettings
from carsearch.index.store import Gallery, open_bundle, save_bundle
from carsearch.index.stream import ShardStream, open_sources
from carsearch.index.tune import tune_with_truth
from carsearch.memwatch import peak_rss_bytes
from carsearch.provenance import library_versions

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
    rows = _sampled_rows(index, n, d, s)
    gallery, picked = stream.metadata_and_rows(rows.wanted)
    check_unique_ids(gallery.ids)
    vectors_of = rows.vectors(picked)
    _train_add_tune(index, stream, gallery, rows, vectors_of, s)
    openset = None
    if s.calibrate and n > s.openset_k:
        openset = leave_one_out_openset(index, gallery, vectors_of(rows.loo), rows.loo, s, sets, out)
    info = {
        "factory": factory,
        "search_params": index.tuned.params,
        "provenance": {k: v for k, v in sets[0].provenance.items() if k != "precision"},
        "sources": [source_entry(src.folder, src.manifest) for src in sets],
        "auto": auto,
        "build": {
            "train_seconds": round(index.timings["train"], 3),
            "add_seconds": round(index.timings["add"], 3),
            "tune_seconds": round(index.timings["tune"], 3),
            "seed": s.seed,
            "training_vectors": n if rows.train is None else len(rows.train),
            # The build's whole process, at its peak.
            "peak_rss_bytes": peak_rss_bytes(),
        },
        "recall": index.tuned.to_json(s.target_recall),
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


@dataclass(frozen=True)
class _Rows:
    """The collection positions a build reads into memory: a training sample (None: the index needs no
    training), the tuning queries and the leave-one-out calibration sample; `wanted` all of them, sorted."""

    train: np.ndarray | None
    tune: np.ndarray
    loo: np.ndarray
    wanted: np.ndarray

    def vectors(self, picked: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """Positions -> their vectors, from `picked` (the vectors of `wanted`, in its order)."""
        return lambda positions: picked[np.searchsorted(self.wanted, positions)]


def _sampled_rows(index: Index, n: int, d: int, s: IndexSettings) -> _Rows:
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
    return _Rows(train_rows, tune_rows, loo_rows, wanted)


def _train_add_tune(
    index: Index, stream: ShardStream, gallery: Gallery, rows: _Rows, vectors_of: Callable, s: IndexSettings
) -> None:
    """Train on the sample, add every shard (finding the tuning queries' exact neighbours on the way),
    and set the cheapest search parameter that reaches the target recall; timings in index.timings."""
    ids = gallery.ids
    train_s = 0.0 if rows.train is None else train(index.faiss, vectors_of(rows.train), s.seed)
    index.timings["train"] = train_s
    queries = vectors_of(rows.tune)
    t0 = time.perf_counter()
    truth_sims, truth_ids = stream.add_and_search(index.faiss, queries, defaults.TUNE_K + 1)
    index.timings["add"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    truth = drop_self(truth_sims, truth_ids, ids[rows.tune], defaults.TUNE_K)[1]
    index.tuned = tune_with_truth(index.faiss, queries, ids[rows.tune], truth, s.target_recall)
    index.params = index.tuned.params
    index.timings["tune"] = time.perf_counter() - t0
    if not index.tuned.reached:
        log.warning(
            "%s reaches 10-recall@10 %.3f at best (%s), below the target %.2f.",
            index.factory,
            index.tuned.recall,
            index.tuned.params,
            s.target_recall,
        )


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
    "index_info",
    "save_info_extra",
]
