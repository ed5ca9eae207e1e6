"""`carsearch index build|info|add|remove|calibrate`: faiss indexes over embedding folders."""

from __future__ import annotations

from typing import Any

import click

from carsearch import defaults
from carsearch.cli.common import (
    BYTES,
    FloatRange,
    emit,
    json_option,
    prefix_runtime,
    runtime_option,
    settings_from,
)
from carsearch.train.settings import PRESETS

ALLOW_DUPLICATES = click.option(
    "--allow-duplicates",
    is_flag=True,
    help="Index every copy of a file that several folders (or the index and the new folder) hold; by "
    "default each file (sha256) is indexed once and the copies are counted.",
)
# index build --tune runs the presets that train on what an embedding folder holds (gpu trains on images).
TUNE_PRESETS = [name for name, p in PRESETS.items() if p.settings.mode != "full"]


def _human_index(i: dict) -> str:
    from carsearch.index.auto import human_bytes

    rec, os_ = i.get("recall") or {}, i.get("openset")
    lines = [
        f"{i['factory']} index of {i['ntotal']} vectors ({i['dim']}-d, cosine), "
        f"{human_bytes(i['memory_bytes'])} in memory, "
        f"search parameters: {i['search_params'] or 'none (exact)'}",
        f"  recall@{rec.get('k', 10)} against exact search: {rec.get('measured', 1.0):.3f} "
        f"(target {rec.get('target', '-')}, {rec.get('queries', 0)} queries)",
        f"  embeddings: {i['provenance']['backbone']} / {i['provenance']['weights']}, "
        f"crop {i['provenance']['preprocessing']['crop']}; sources: "
        + ", ".join(f"{s['embeddings']} ({s['root']})" for s in i["sources"]),
    ]
    if i.get("auto"):
        lines.append(f"  chosen automatically: {i['auto']['reason']}")
    if os_:
        lines.append(
            f"  unknown-model threshold {os_['threshold']:.4f} (similarity to neighbour {os_['k']}), keeps "
            f"{os_['tpr']:.1%} of known images; calibrated by {os_['method']}"
        )
        if os_.get("class_cosine"):
            cc = os_["class_cosine"]
            lines.append(
                f"  classify's unknown-model score: largest cosine to the tuned network's class weights, "
                f"threshold {cc['threshold']:.4f}, keeps {cc['tpr']:.1%} of known images"
            )
        if os_.get("uncertain"):
            un = os_["uncertain"]
            wrong = "" if un["wrong_flagged"] is None else f", {un['wrong_flagged']:.1%} of wrong ones"
            lines.append(
                f"  answers under {un['share_threshold']:.0%} of the vote are called uncertain "
                f"({un['right_flagged']:.1%} of right held-out answers{wrong})"
            )
    else:
        lines.append('  no open-set threshold: run `carsearch index calibrate` to enable "unknown" answers')
    for key, label in (
        ("added", "added"),
        ("removed", "removed"),
        ("skipped_duplicates", "skipped (the index already holds the same file)"),
        ("duplicates_left_out", "left out (the same file as an earlier folder's)"),
    ):
        if i.get(key) or (key in ("added", "removed") and key in i):
            lines.append(f"  {label}: {i[key]} images")
    return "\n".join(lines)


@click.group()
def index() -> None:
    """Build and maintain faiss indexes over embedding folders."""


@index.command("build")
@click.argument("emb_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Index folder to write.")
@click.option(
    "--factory",
    default=defaults.FACTORY,
    show_default=True,
    help="faiss factory string (Flat, HNSW32, IVF256,Flat, IVF1024,PQ64, OPQ64,IVF1024,PQ64, ...) or auto.",
)
@click.option(
    "--memory-budget",
    default=defaults.MEMORY_BUDGET_TEXT,
    show_default=True,
    type=BYTES,
    help="auto: the most memory the index may take.",
)
@click.option(
    "--target-recall",
    default=defaults.TARGET_RECALL,
    show_default=True,
    type=FloatRange(0, 1, min_open=True),
    help="Tune efSearch / nprobe to the cheapest value reaching this 10-recall@10 (the share of the 10 "
    "nearest neighbours of exact search that it finds).",
)
@click.option(
    "--calibrate/--no-calibrate",
    default=True,
    show_default=True,
    help="Set the unknown-model threshold by leave-one-out on the collection.",
)
@click.option(
    "--openset-k",
    default=defaults.OPENSET_K,
    show_default=True,
    type=click.IntRange(1),
    help="Unknown-model score: similarity to this neighbour (1 = the nearest).",
)
@click.option(
    "--tpr",
    default=defaults.TPR,
    show_default=True,
    type=FloatRange(0, 1, min_open=True),
    help="Share of known-model images the threshold keeps.",
)
@click.option("--seed", default=defaults.SEED, show_default=True, type=int)
@click.option(
    "--tune",
    type=click.Choice(TUNE_PRESETS),
    help="Labelled collections: train a network on the collection first and index the car-tuned vectors; "
    "queries follow automatically. head: a projection on the embeddings (seconds; dev protocol, lite0: "
    "top-1 35.5% -> 57.8%); cpu-hour: the last stages of the backbone on cached activations of the "
    "photos (about an hour on 2 cores; see docs/benchmarks.md). Default: head for a labelled collection "
    "with >= 5 photos per class, else none. `carsearch train --list-presets` shows each preset.",
)
@click.option("--frozen", is_flag=True, help="Index the embeddings as they are (no tuning).")
@runtime_option
@click.option("--tune-head", is_flag=True, hidden=True, help="Old name of --tune head.")
@click.option(
    "--tune-holdout",
    default=defaults.TUNE_HOLDOUT,
    show_default=True,
    type=FloatRange(0, 1, min_open=True, max_open=True),
    help="--tune: share of each class held out to choose the epoch and calibrate the threshold.",
)
@click.option(
    "--tune-epochs",
    type=click.IntRange(1),
    help=f"--tune: epochs [default: the preset's; head {defaults.HEAD_EPOCHS}].",
)
@click.option(
    "--exclude",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="File of image ids to leave out, one photo a line (e.g. an audit's exclude-duplicates.txt: "
    "id<TAB>path); repeatable.",
)
@ALLOW_DUPLICATES
@click.option(
    "--drop-uploads",
    is_flag=True,
    help="Rebuild a folder even though it holds photos added over POST /api/images (they are dropped).",
)
@click.option(
    "--allow-incomplete",
    is_flag=True,
    help="Index an embedding folder whose embed run has not finished (its finished shards only).",
)
@json_option
def index_build(
    emb_dirs: tuple[str, ...],
    out: str,
    tune: str | None,
    frozen: bool,
    tune_head: bool,
    tune_holdout: float,
    tune_epochs: int | None,
    runtime: str,
    allow_incomplete: bool,
    as_json: bool,
    **options: Any,
) -> None:
    """Build an index over one or more embedding folders (EMB_DIRS) into --out.

    A labelled collection with at least 5 photos per class is tuned with the head preset unless --frozen
    or another --tune is given (dev protocol: top-1 35.5% frozen, 57.8% tuned). A folder whose embed run
    has not finished is refused unless --allow-incomplete."""
    from carsearch.embed.store import require_complete

    for emb_dir in emb_dirs:
        require_complete(emb_dir, allow_incomplete)
    from carsearch.index.settings import IndexSettings

    index_settings = settings_from(IndexSettings, options)
    exclude = options["exclude"]
    if tune_head:
        if tune not in (None, "head"):
            raise click.UsageError(f"--tune-head is --tune head; leave out --tune {tune}.")
        tune = "head"
    if tune and frozen:
        raise click.UsageError(f"--frozen indexes the embeddings as they are; leave out --tune {tune}.")
    if tune and exclude:
        raise click.UsageError("--exclude is not supported with --tune yet; build with --frozen.")
    if tune and len(emb_dirs) != 1:
        raise click.UsageError("--tune takes one embedding folder.")
    if tune is None and not frozen and not exclude and len(emb_dirs) == 1:
        tune = _default_tune(emb_dirs[0])
    if tune:
        from carsearch.train.settings import get_preset
        from carsearch.train.tuned import build_tuned_index

        settings = get_preset(tune).settings.override(epochs=tune_epochs)
        with prefix_runtime(runtime, settings.device):  # --tune cpu-hour's cached-prefix step
            info = build_tuned_index(
                emb_dirs[0],
                out,
                preset=tune,
                settings=settings,
                index=index_settings,
                holdout=tune_holdout,
            )
    else:
        from carsearch.index.build import build_index

        info = build_index(
            list(emb_dirs),
            out,
            index_settings,
            exclude=list(exclude),
            allow_duplicates=options["allow_duplicates"],
            drop_uploads=options["drop_uploads"],
        )
    emit(info, as_json, _human_index)


def _default_tune(emb_dir: str) -> str | None:
    """head for a labelled collection with >= MIN_PER_CLASS_TO_TUNE photos in every class, else None."""
    import logging

    import numpy as np

    from carsearch.embed.store import load_embeddings

    try:
        classes = load_embeddings(emb_dir, verify=False).class_ids
    except Exception:  # the build itself reports an unreadable folder in its own words
        return None
    if len(classes) == 0 or (classes < 0).any():
        return None
    if np.unique(classes, return_counts=True)[1].min() < defaults.MIN_PER_CLASS_TO_TUNE:
        return None
    logging.getLogger("carsearch").info(
        "index build: a labelled collection with >= %d photos per class: tuning a projection head first "
        "(--tune head, seconds); pass --frozen to index the embeddings as they are.",
        defaults.MIN_PER_CLASS_TO_TUNE,
    )
    return "head"


@index.command("info")
@click.argument("index_dir", type=click.Path(file_okay=False))
@json_option
def index_info_cmd(index_dir: str, as_json: bool) -> None:
    """Describe an index (after checking its files against index.json)."""
    from carsearch.index.build import index_info

    emit(index_info(index_dir), as_json, _human_index)


@index.command("add")
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.argument("emb_dir", type=click.Path(file_okay=False))
@ALLOW_DUPLICATES
@json_option
def index_add(index_dir: str, emb_dir: str, allow_duplicates: bool, as_json: bool) -> None:
    """Add the shards of EMB_DIR that INDEX_DIR does not hold yet, without rebuilding.

    Refused for shards of another backbone, weights or preprocessing, or with ids already in the index.
    Photos whose file the index already holds (same sha256) are skipped and counted.
    """
    from carsearch.index.changes import add_to_index

    emit(add_to_index(index_dir, emb_dir, allow_duplicates), as_json, _human_index)


@index.command("remove")
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.argument("ids", nargs=-1, type=int)
@click.option(
    "--ids-file",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="File of image ids, one photo a line (e.g. an audit's suspects.txt: id<TAB>path); repeatable.",
)
@json_option
def index_remove(index_dir: str, ids: tuple[int, ...], ids_file: tuple[str, ...], as_json: bool) -> None:
    """Remove images by id (Flat and IVF indexes; HNSW cannot forget and must be rebuilt)."""
    from carsearch.index.changes import remove_from_index
    from carsearch.index.idlist import read_id_files

    wanted = sorted({*ids, *read_id_files(list(ids_file)).tolist()})
    if not wanted:
        raise click.UsageError("give image ids, or --ids-file FILE.")
    emit(remove_from_index(index_dir, wanted, list(ids_file)), as_json, _human_index)


@index.command("calibrate")
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.option(
    "--queries",
    required=True,
    type=click.Path(file_okay=False),
    help="Embedding folder of held-out images; images of classes not in the index count as unknown.",
)
@click.option("--tpr", default=defaults.TPR, show_default=True, type=FloatRange(0, 1, min_open=True))
@click.option(
    "--k", "k", type=click.IntRange(1), help="Neighbour whose similarity is the score (default: as built)."
)
@json_option
def index_calibrate(index_dir: str, queries: str, tpr: float, k: int | None, as_json: bool) -> None:
    """Set the unknown-model threshold so that --tpr of known-class queries are kept."""
    from carsearch.index.calibrate import calibrate_index

    emit(calibrate_index(index_dir, queries, tpr, k), as_json, _human_index)
