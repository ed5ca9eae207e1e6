"""`carsearch index build|info|add|remove|calibrate`: faiss indexes over embedding folders."""

from __future__ import annotations

import click

from carsearch import defaults
from carsearch.cli.common import BYTES, emit, json_option


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
    else:
        lines.append('  no open-set threshold: run `carsearch index calibrate` to enable "unknown" answers')
    for key, label in (("added", "added"), ("removed", "removed")):
        if key in i:
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
    type=click.FloatRange(0, 1, min_open=True),
    help="Tune efSearch / nprobe to the cheapest value reaching this recall@10 against exact search.",
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
    type=click.FloatRange(0, 1, min_open=True),
    help="Share of known-model images the threshold keeps.",
)
@click.option("--seed", default=defaults.SEED, show_default=True, type=int)
@click.option(
    "--tune-head",
    is_flag=True,
    help="Labelled collections: train a projection head on the embeddings first (seconds on a CPU), index "
    "the car-tuned vectors; queries follow automatically (dev protocol, lite0: top-1 35.5% -> 57.8%).",
)
@click.option(
    "--tune-holdout",
    default=defaults.TUNE_HOLDOUT,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="--tune-head: share of each class held out to choose the epoch and calibrate the threshold.",
)
@click.option("--tune-epochs", default=defaults.HEAD_EPOCHS, show_default=True, type=click.IntRange(1))
@click.option(
    "--exclude",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="File of image ids to leave out, one per line (e.g. an audit's exclude-duplicates.txt); repeatable.",
)
@json_option
def index_build(
    emb_dirs: tuple[str, ...],
    out: str,
    factory: str,
    memory_budget: int,
    target_recall: float,
    calibrate: bool,
    openset_k: int,
    tpr: float,
    seed: int,
    tune_head: bool,
    tune_holdout: float,
    tune_epochs: int,
    exclude: tuple[str, ...],
    as_json: bool,
) -> None:
    """Build an index over one or more embedding folders (EMB_DIRS) into --out."""
    if tune_head and exclude:
        raise click.UsageError("--exclude is not supported with --tune-head yet; build without it.")
    if tune_head:
        from carsearch.train.tuned import build_tuned_index

        if len(emb_dirs) != 1:
            raise click.UsageError("--tune-head takes one embedding folder.")
        info = build_tuned_index(
            emb_dirs[0],
            out,
            factory=factory,
            memory_budget=memory_budget,
            target_recall=target_recall,
            epochs=tune_epochs,
            holdout=tune_holdout,
            calibrate=calibrate,
            openset_k=openset_k,
            tpr=tpr,
            seed=seed,
        )
    else:
        from carsearch.index.build import build_index

        info = build_index(
            list(emb_dirs),
            out,
            factory,
            memory_budget,
            target_recall,
            calibrate,
            openset_k,
            tpr,
            seed,
            exclude=list(exclude),
        )
    emit(info, as_json, _human_index)


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
@json_option
def index_add(index_dir: str, emb_dir: str, as_json: bool) -> None:
    """Add the shards of EMB_DIR that INDEX_DIR does not hold yet, without rebuilding.

    Refused for shards of another backbone, weights or preprocessing, or with ids already in the index.
    """
    from carsearch.index.build import add_to_index

    emit(add_to_index(index_dir, emb_dir), as_json, _human_index)


@index.command("remove")
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.argument("ids", nargs=-1, type=int)
@click.option(
    "--ids-file",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="File of image ids, one per line (e.g. an audit's suspects.txt); repeatable.",
)
@json_option
def index_remove(index_dir: str, ids: tuple[int, ...], ids_file: tuple[str, ...], as_json: bool) -> None:
    """Remove images by id (Flat and IVF indexes; HNSW cannot forget and must be rebuilt)."""
    from carsearch.index.build import remove_from_index
    from carsearch.index.idlist import read_id_files

    wanted = sorted({*ids, *read_id_files(list(ids_file)).tolist()})
    if not wanted:
        raise click.UsageError("give image ids, or --ids-file FILE.")
    emit(remove_from_index(index_dir, wanted), as_json, _human_index)


@index.command("calibrate")
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.option(
    "--queries",
    required=True,
    type=click.Path(file_okay=False),
    help="Embedding folder of held-out images; images of classes not in the index count as unknown.",
)
@click.option("--tpr", default=defaults.TPR, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option(
    "--k", "k", type=click.IntRange(1), help="Neighbour whose similarity is the score (default: as built)."
)
@json_option
def index_calibrate(index_dir: str, queries: str, tpr: float, k: int | None, as_json: bool) -> None:
    """Set the unknown-model threshold so that --tpr of known-class queries are kept."""
    from carsearch.index.build import calibrate_index

    emit(calibrate_index(index_dir, queries, tpr, k), as_json, _human_index)
