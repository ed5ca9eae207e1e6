"""The `carsearch` command: a thin click layer, one command per stage, no logic of its own.

Heavy libraries (torch, faiss, fastapi) are imported inside the commands, so `carsearch --help` is instant.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import click

from carsearch import __version__
from carsearch.errors import CarsearchError

log = logging.getLogger("carsearch")

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110, "auto_envvar_prefix": "CARSEARCH"}


class _Group(click.Group):
    """Turns errors a user can cause into one sentence and an exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CarsearchError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted; run the same command again to resume where it stopped.", err=True)
            sys.exit(130)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    # faiss's loader reports which SIMD build it picked at INFO level: noise for users.
    logging.getLogger("faiss").setLevel(max(level, logging.WARNING))


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value:
        from carsearch.config import load_config, to_default_map

        try:
            ctx.default_map = to_default_map(load_config(value), ctx.command)
        except CarsearchError as e:
            raise click.BadParameter(str(e)) from None
    return value


def emit(result: Any, as_json: bool, human: Callable[[Any], str]) -> None:
    """Print a result: one JSON document on stdout with --json, else a human summary."""
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        click.echo(human(result))


def device_options(f: Callable) -> Callable:
    """--device and --precision, as every command that runs the network takes them."""
    f = click.option(
        "--precision",
        default="auto",
        show_default=True,
        type=click.Choice(["auto", "fp32", "bf16"]),
        help="auto: bf16 autocast where the hardware runs it natively (CUDA, AVX-512-BF16/AMX CPUs).",
    )(f)
    return click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")(f)


def dataset_options(f: Callable) -> Callable:
    """--format, --labels and --split: how a dataset folder is read."""
    f = click.option(
        "--split",
        default="all",
        show_default=True,
        type=click.Choice(["train", "test", "all"]),
        help="stanford layout: which split.",
    )(f)
    f = click.option(
        "--labels",
        type=click.Path(dir_okay=False),
        help="csv layout: labels file (default DATA_DIR/labels.csv).",
    )(f)
    return click.option(
        "--format",
        "format",
        default="auto",
        show_default=True,
        type=click.Choice(["auto", "csv", "folders", "stanford", "vmmrdb", "unlabeled"]),
        help="Dataset layout.",
    )(f)


def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")(f)


class _Workers(click.ParamType):
    name = "auto|N"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | None:
        if value in (None, "auto"):
            return None
        try:
            n = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not 'auto' or a whole number", param, ctx)
        if n < 0:
            self.fail("must be 0 or more", param, ctx)
        return n


class _Bytes(click.ParamType):
    """'4G', '512M', '1.5GiB', '1000000' -> bytes."""

    name = "SIZE"
    _units: ClassVar[dict[str, int]] = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        s = str(value).strip().upper().removesuffix("IB").removesuffix("B")
        try:
            n = float(s[:-1]) * self._units[s[-1]] if s and s[-1] in self._units else float(s)
        except (ValueError, KeyError):
            self.fail(f"{value!r} is not a size such as 512M or 4G", param, ctx)
        if n <= 0:
            self.fail("must be positive", param, ctx)
        return int(n)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="carsearch")
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    callback=_load_config,
    is_eager=True,
    expose_value=False,
    help="TOML settings file (see configs/); flags and CARSEARCH_* variables override it.",
)
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
def cli(verbose: int, quiet: bool) -> None:
    """Reverse image search and open-set classification for car photos.

    \b
    Stages, each reading and writing files:
      carsearch embed DATA_DIR --out EMB_DIR        images -> HDF5 embedding shards
      carsearch index build EMB_DIR --out INDEX     shards -> faiss index
      carsearch search --index INDEX photo.jpg      most similar cars
      carsearch classify --index INDEX photo.jpg    make/model/year by kNN vote, or "unknown"
    """
    _setup_logging(verbose, quiet)


# --- embed ---------------------------------------------------------------------------------------------


def _human_embed(r: dict) -> str:
    failed = ", ".join(f"{k} {v}" for k, v in r["failed"].items()) or "none"
    state = "complete" if r["complete"] else "incomplete: run again to continue"
    return (
        f"{r['rows']} embeddings in {r['shards']} shards at {r['out']} ({state}); "
        f"this run: {r['images']} images in {r['seconds']:.1f} s = {r['images_per_second']:.1f} images/s "
        f"({r['backbone']}, {r['precision']}, {r['device']}), {r['resumed_shards']} shards resumed; "
        f"skipped: {failed}"
    )


@cli.command()
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option(
    "--out", "-o", required=True, type=click.Path(file_okay=False), help="Folder for shards + manifest."
)
@dataset_options
@click.option("--bbox-crop", is_flag=True, help="stanford layout: crop each image to its annotated box.")
@click.option("--backbone", default="resnet50", show_default=True, help="Network; see `carsearch backbones`.")
@click.option(
    "--weights",
    default="imagenet",
    show_default=True,
    help="imagenet, imagenet-v1, none, a .pth file, or a `carsearch train` checkpoint folder.",
)
@click.option("--weights-sha256", help="Expected sha256 of the weights file.")
@click.option(
    "--crop",
    default="squash",
    show_default=True,
    type=click.Choice(["center", "squash", "pad"]),
    help="squash: resize to a square (best for wide cars, docs/benchmarks.md); center: resize + centre "
    "crop; pad: letterbox.",
)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option(
    "--workers",
    default="auto",
    show_default=True,
    type=_Workers(),
    help="Image decoding processes (0 = decode in the main process).",
)
@click.option(
    "--shard-size", default=4096, show_default=True, type=click.IntRange(1), help="Records per shard."
)
@device_options
@click.option(
    "--limit", type=click.IntRange(1), help="Embed only the first N images (a later run continues)."
)
@click.option(
    "--id-start",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="First id: give a second collection its own id range to add it to an index.",
)
@click.option(
    "--max-pixels",
    default=89_478_485,
    show_default=True,
    type=click.IntRange(1),
    help="Skip images with more pixels (decompression bombs).",
)
@click.option("--overwrite", is_flag=True, help="Discard what an earlier run wrote to --out and start again.")
@json_option
def embed(
    data_dir: str,
    out: str,
    format: str,
    labels: str | None,
    split: str,
    bbox_crop: bool,
    backbone: str,
    weights: str,
    weights_sha256: str | None,
    crop: str,
    batch_size: int,
    workers: int | None,
    shard_size: int,
    device: str,
    precision: str,
    limit: int | None,
    id_start: int,
    max_pixels: int,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Embed every image of DATA_DIR into HDF5 shards under --out (resumable).

    A second run with the same settings skips finished shards; one with different settings is refused
    and names the setting. Unreadable images are skipped, counted by reason and listed in failures.jsonl.
    """
    from carsearch.embed import embed_dataset

    result = embed_dataset(
        data_dir,
        out,
        format=format,
        labels_file=labels,
        split=split,
        bbox_crop=bbox_crop,
        backbone=backbone,
        weights=weights,
        weights_sha256=weights_sha256,
        crop=crop,
        batch_size=batch_size,
        workers=workers,
        shard_size=shard_size,
        device=device,
        precision=precision,
        limit=limit,
        overwrite=overwrite,
        id_start=id_start,
        max_pixels=max_pixels,
        progress=True,
    )
    emit(result.to_json(), as_json, _human_embed)


@cli.command()
@json_option
def backbones(as_json: bool) -> None:
    """List the registered backbones with their embedding size and weights choices."""
    from carsearch.embed.backbones import _REGISTRY

    rows = [
        {"name": s.name, "dim": s.dim, "weights": list(s.weight_choices), "description": s.description}
        for s in _REGISTRY.values()
    ]
    emit(
        rows,
        as_json,
        lambda rs: "\n".join(
            f"{r['name']:<20} {r['dim']:>5}-d  weights: {', '.join(r['weights'])}  {r['description']}"
            for r in rs
        ),
    )


@cli.command()
@click.argument("data_dir", type=click.Path(file_okay=False))
@dataset_options
@json_option
def dataset(data_dir: str, format: str, labels: str | None, split: str, as_json: bool) -> None:
    """Show how DATA_DIR is read: layout, image and class counts, a few parsed records."""
    from collections import Counter

    from carsearch.datasets import read_dataset

    ds = read_dataset(data_dir, format, labels_file=labels, split=split)
    classes = Counter(r.label for r in ds.records if r.label)
    info = {
        "root": str(ds.root),
        "format": ds.format,
        "images": len(ds.records),
        "classes": len(classes),
        "makes": len({r.make for r in ds.records if r.make}),
        "images_per_class": {"min": min(classes.values()), "max": max(classes.values())} if classes else None,
        "examples": [
            {"path": r.path, "label": r.label, "make": r.make, "model": r.model, "year": r.year}
            for r in ds.records[:: max(1, len(ds.records) // 5)][:5]
        ],
    }
    emit(
        info,
        as_json,
        lambda i: (
            f"{i['root']}: {i['format']} layout, {i['images']} images, {i['classes']} classes, "
            f"{i['makes']} makes\n"
            + "\n".join(f"  {e['path']}: {e['make']} | {e['model']} | {e['year']}" for e in i["examples"])
        ),
    )


# --- index -------------------------------------------------------------------------------------------


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


@cli.group()
def index() -> None:
    """Build and maintain faiss indexes over embedding folders."""


@index.command("build")
@click.argument("emb_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Index folder to write.")
@click.option(
    "--factory",
    default="auto",
    show_default=True,
    help="faiss factory string (Flat, HNSW32, IVF256,Flat, IVF1024,PQ64, OPQ64,IVF1024,PQ64, ...) or auto.",
)
@click.option(
    "--memory-budget",
    default="4G",
    show_default=True,
    type=_Bytes(),
    help="auto: the most memory the index may take.",
)
@click.option(
    "--target-recall",
    default=0.95,
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
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Unknown-model score: similarity to this neighbour (1 = the nearest).",
)
@click.option(
    "--tpr",
    default=0.95,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="Share of known-model images the threshold keeps.",
)
@click.option("--seed", default=0, show_default=True, type=int)
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
    as_json: bool,
) -> None:
    """Build an index over one or more embedding folders (EMB_DIRS) into --out."""
    from carsearch.index.build import build_index

    info = build_index(
        list(emb_dirs), out, factory, memory_budget, target_recall, calibrate, openset_k, tpr, seed
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
@click.argument("ids", nargs=-1, required=True, type=int)
@json_option
def index_remove(index_dir: str, ids: tuple[int, ...], as_json: bool) -> None:
    """Remove images by id (Flat and IVF indexes; HNSW cannot forget and must be rebuilt)."""
    from carsearch.index.build import remove_from_index

    emit(remove_from_index(index_dir, list(ids)), as_json, _human_index)


@index.command("calibrate")
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.option(
    "--queries",
    required=True,
    type=click.Path(file_okay=False),
    help="Embedding folder of held-out images; images of classes not in the index count as unknown.",
)
@click.option("--tpr", default=0.95, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option(
    "--k", "k", type=click.IntRange(1), help="Neighbour whose similarity is the score (default: as built)."
)
@json_option
def index_calibrate(index_dir: str, queries: str, tpr: float, k: int | None, as_json: bool) -> None:
    """Set the unknown-model threshold so that --tpr of known-class queries are kept."""
    from carsearch.index.build import calibrate_index

    emit(calibrate_index(index_dir, queries, tpr, k), as_json, _human_index)


# --- search / classify ---------------------------------------------------------------------------------


def _exit_if_all_failed(results: list) -> None:
    if results and all(r.error for r in results):
        sys.exit(1)


def _human_search(results: list[dict]) -> str:
    out = []
    for r in results:
        out.append(r["query"])
        if r["error"]:
            out.append(f"   error: {r['error']}")
        for i, n in enumerate(r["neighbors"], 1):
            out.append(
                f"  {i:>3}. {n['score']:.3f}  {n['label'] or '(unlabeled)':<40} {n['path']}  (id {n['id']})"
            )
    return "\n".join(out)


@cli.command()
@click.option("--index", "index_dir", required=True, type=click.Path(file_okay=False), help="Index folder.")
@click.argument("queries", nargs=-1, required=True, type=click.Path())
@click.option("-k", default=10, show_default=True, type=click.IntRange(1, 1000), help="Neighbours per query.")
@device_options
@json_option
def search(
    index_dir: str, queries: tuple[str, ...], k: int, device: str, precision: str, as_json: bool
) -> None:
    """Find the cars most similar to each query image (files or folders of images)."""
    from carsearch.search import Searcher, expand_queries

    searcher = Searcher.open(index_dir, device, precision)
    results = searcher.search(expand_queries(queries), k)
    emit([r.to_json() for r in results], as_json, _human_search)
    _exit_if_all_failed(results)


def _human_classify(results: list[dict]) -> str:
    out = []
    for r in results:
        if r["error"]:
            out.append(f"{r['query']}: error: {r['error']}")
            continue
        if r["label"] is None:
            verdict = "no labelled neighbours"
        elif r["unknown"]:
            verdict = f"unknown model (closest: {r['label']}, {r['confidence']:.0%} of the vote)"
        else:
            verdict = f"{r['label']} ({r['confidence']:.0%} of the vote)"
        out.append(f"{r['query']}: {verdict}")
        if r["top5"]:
            out.append("   votes: " + " | ".join(f"{v['label']} {v['share']:.0%}" for v in r["top5"]))
    return "\n".join(out)


@cli.command()
@click.option("--index", "index_dir", required=True, type=click.Path(file_okay=False), help="Index folder.")
@click.argument("queries", nargs=-1, required=True, type=click.Path())
@click.option("-k", default=20, show_default=True, type=click.IntRange(1, 1000), help="Neighbours that vote.")
@click.option(
    "--level",
    default="model",
    show_default=True,
    type=click.Choice(["model", "make", "year"]),
    help="Vote over full class names (make model year), makes, or model years.",
)
@click.option(
    "--temperature",
    default=0.07,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Vote weight exp(cosine / T) (DINO's kNN protocol).",
)
@click.option("--no-reject", is_flag=True, help="Never answer unknown, even below the threshold.")
@device_options
@json_option
def classify(
    index_dir: str,
    queries: tuple[str, ...],
    k: int,
    level: str,
    temperature: float,
    no_reject: bool,
    device: str,
    precision: str,
    as_json: bool,
) -> None:
    """Label each query image by the weighted vote of its nearest indexed cars, or say "unknown model"."""
    from carsearch.search import Searcher, expand_queries

    searcher = Searcher.open(index_dir, device, precision)
    results = searcher.classify(expand_queries(queries), k, level, temperature, reject=not no_reject)
    emit([r.to_json() for r in results], as_json, _human_classify)
    _exit_if_all_failed(results)


# --- bench ---------------------------------------------------------------------------------------------


def _human_bench(r: dict) -> str:
    lines = [f"report: {r['out']}/report.md ({r['seconds']} s)"]
    for f, c in (r.get("closed") or {}).items():
        m = c["model"]
        lines.append(
            f"  {f:<28} top-1 {m['top1']:.1%}  top-5 {m['top5']:.1%}  hit@1 {m['hit1']:.1%}  "
            f"hit@5 {m['hit5']:.1%}"
        )
    if r.get("zeroshot"):
        z = r["zeroshot"]
        lines.append("  zero-shot " + "  ".join(f"R@{k} {z[f'recall@{k}']:.1%}" for k in (1, 2, 4, 8)))
    if r.get("openset"):
        o = r["openset"]
        lines.append(
            f"  open set AUROC {o['auroc']:.3f}  FPR@95%TPR {o['fpr@95tpr']:.1%}  "
            f"open-set accuracy {o['open_set_accuracy']:.1%}"
        )
    for f, x in (r.get("index") or {}).items():
        lines.append(
            f"  {f:<28} R@10 {x['recall@10']:.3f}  {x['qps_batched']:,.0f} QPS batched  "
            f"p99 {x['p99_ms']:.2f} ms  {x['memory_bytes'] / 2**20:.1f} MiB"
        )
    return "\n".join(lines)


@cli.command()
@click.argument("emb_dir", type=click.Path(file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Report folder.")
@click.option(
    "--factory",
    "factories",
    multiple=True,
    help="Index type to compare (repeat); default: Flat, HNSW32, IVF-Flat, IVF-PQ, OPQ+IVF-PQ.",
)
@click.option(
    "--protocol",
    default="closed,zeroshot,openset,index",
    show_default=True,
    help="Comma-separated: closed, zeroshot, openset, index.",
)
@click.option(
    "--k", "k", default=20, show_default=True, type=click.IntRange(1, 1000), help="Voting neighbours."
)
@click.option("--temperature", default=0.07, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the gallery / query split.")
@click.option(
    "--gallery-fraction",
    default=2 / 3,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Share of each class in the gallery.",
)
@click.option("--classes", help="Only these class ids take part, e.g. 1-98 (default: all).")
@click.option("--known-classes", default="1-98", show_default=True, help="openset: class ids in the gallery.")
@click.option("--test-classes", default="99-196", show_default=True, help="zeroshot: class ids queried.")
@click.option("--openset-k", default=1, show_default=True, type=click.IntRange(1))
@click.option("--target-recall", default=0.95, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option(
    "--max-queries", type=click.IntRange(1), help="Time and score at most this many held-out queries."
)
@click.option(
    "--peers/--no-peers",
    default=True,
    show_default=True,
    help="Also measure hnswlib and numpy / torch brute force.",
)
@click.option("--sweep/--no-sweep", default=True, show_default=True, help="Recall-vs-QPS curves.")
@click.option("--plots/--no-plots", default=True, show_default=True)
@json_option
def bench(
    emb_dir: str,
    out: str,
    factories: tuple[str, ...],
    protocol: str,
    k: int,
    temperature: float,
    seed: int,
    gallery_fraction: float,
    classes: str | None,
    known_classes: str,
    test_classes: str,
    openset_k: int,
    target_recall: float,
    max_queries: int | None,
    peers: bool,
    sweep: bool,
    plots: bool,
    as_json: bool,
) -> None:
    """Benchmark index types and the closed-set, zero-shot and open-set protocols on EMB_DIR.

    Writes report.json, report.md and PNG plots to --out; --json prints report.json.
    """
    from carsearch.bench.runner import BenchSettings, run_bench

    settings = BenchSettings(
        factories=list(factories),
        protocols=tuple(p.strip() for p in protocol.split(",") if p.strip()),
        k=k,
        temperature=temperature,
        seed=seed,
        gallery_fraction=gallery_fraction,
        classes=classes,
        known_classes=known_classes,
        test_classes=test_classes,
        openset_k=openset_k,
        target_recall=target_recall,
        max_queries=max_queries,
        peers=peers,
        sweep=sweep,
        plots=plots,
    )
    report = run_bench(emb_dir, out, settings)
    emit({**report, "out": str(Path(out).resolve())}, as_json, _human_bench)


# --- serve ---------------------------------------------------------------------------------------------


@cli.command()
@click.option("--index", "index_dir", required=True, type=click.Path(file_okay=False), help="Index folder.")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind; the default answers this machine only.",
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Server processes, each with its own copy of the index.",
)
@click.option(
    "--max-upload-mb",
    default=20.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Larger uploads are refused (413) while they are read.",
)
@click.option(
    "--max-pixels",
    default=89_478_485,
    show_default=True,
    type=click.IntRange(1),
    help="Larger images are refused (400).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
def serve(
    index_dir: str, host: str, port: int, workers: int, max_upload_mb: float, max_pixels: int, device: str
) -> None:
    """Serve the HTTP API and the web page over INDEX_DIR (read-only).

    \b
    POST /api/search        multipart field `image`; ?k=1..200&level=model|make|year
    GET  /images/{id}       an indexed image by id (?size=N for a thumbnail)
    GET  /api/info, /healthz, /api/docs, /  (the page)
    """
    import os

    import uvicorn

    from carsearch.index.store import open_bundle
    from carsearch.serve import app as serve_app

    open_bundle(index_dir)  # a damaged or missing index fails here, in one sentence, before any worker starts
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: other machines can reach this server.", host)
    os.environ.update(
        {
            serve_app.ENV_INDEX: str(Path(index_dir).resolve()),
            serve_app.ENV_UPLOAD: str(int(max_upload_mb * 1e6)),
            serve_app.ENV_PIXELS: str(max_pixels),
            serve_app.ENV_DEVICE: device,
        }
    )
    log.info("carsearch serving %s on http://%s:%d/", index_dir, host, port)
    uvicorn.run(
        "carsearch.serve.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
    )


# --- train ---------------------------------------------------------------------------------------------


def _human_train(r: dict) -> str:
    lines = [f"{r['mode']} training of {r['backbone']} ({r['dim']}-d) -> {r['out']}"]
    for h in r["history"][-5:]:
        speed = f", {h['images_per_second']:.1f} images/s" if "images_per_second" in h else ""
        lines.append(
            f"  epoch {h['epoch']}: loss {h['loss']:.4f}, validation Recall@1 {h['recall@1']:.1%}{speed}"
        )
    lines.append(
        f"  best: epoch {r['best_epoch']}, Recall@1 {r['best_recall_at_1']:.1%} "
        f"(frozen features: {r['baseline_recall_at_1']:.1%})"
    )
    lines.append(
        f"  use it: carsearch embed DATA_DIR --out EMB --backbone {r['backbone']} --weights {r['out']}"
    )
    return "\n".join(lines)


@cli.command()
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Checkpoint folder.")
@click.option("--backbone", default="efficientnet_lite0", show_default=True)
@click.option(
    "--weights", default="imagenet", show_default=True, help="Starting weights (imagenet, none, a file)."
)
@click.option("--classes", help="Class ids to train on, e.g. 1-98 (default: all).")
@click.option(
    "--val-classes",
    help="Class ids for validation Recall@1 (default: the other classes; if none "
    "remain, 20% of the training classes' images).",
)
@click.option(
    "--train-fraction",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="Train on this share of each class (the split `bench --gallery-fraction` makes with the same "
    "--seed); the rest is held out and validates when no --val-classes are given.",
)
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(1))
@click.option(
    "--loss",
    default="proxy-anchor",
    show_default=True,
    type=click.Choice(["proxy-anchor", "normalized-softmax"]),
)
@click.option(
    "--embed-dim",
    default=512,
    show_default=True,
    type=click.IntRange(0),
    help="Projection size after the backbone (0: no projection).",
)
@click.option("--batch-size", type=click.IntRange(2), help="Images per batch [default: 32; --head-only 256].")
@click.option(
    "--per-class", default=4, show_default=True, type=click.IntRange(2), help="Images per class in a batch."
)
@click.option(
    "--lr",
    type=click.FloatRange(0, min_open=True),
    help="Learning rate of the backbone [default: 1e-4; --head-only 1e-3]; head 10x, proxies 100x.",
)
@click.option(
    "--freeze-epochs",
    default=1,
    show_default=True,
    type=click.IntRange(0),
    help="First epochs with the backbone frozen (head and proxies only).",
)
@click.option("--warmup-epochs", default=1, show_default=True, type=click.IntRange(0))
@click.option(
    "--image-size",
    type=click.IntRange(32),
    help="Train and embed at this resolution (default: the backbone's).",
)
@click.option("--crop", default="squash", show_default=True, type=click.Choice(["center", "squash", "pad"]))
@device_options
@click.option("--workers", default="auto", show_default=True, type=_Workers())
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--head-only",
    is_flag=True,
    help="Train only a projection head on cached embeddings: DATA_DIR is "
    "then an embedding folder from `carsearch embed` (seconds on a CPU).",
)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last epoch.")
@click.option("--overwrite", is_flag=True, help="Replace a checkpoint already in --out.")
@json_option
def train(
    data_dir: str,
    out: str,
    backbone: str,
    weights: str,
    classes: str | None,
    val_classes: str | None,
    train_fraction: float,
    epochs: int,
    loss: str,
    embed_dim: int,
    batch_size: int | None,
    per_class: int,
    lr: float | None,
    freeze_epochs: int,
    warmup_epochs: int,
    image_size: int | None,
    crop: str,
    device: str,
    precision: str,
    workers: int | None,
    seed: int,
    head_only: bool,
    resume: bool,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Fine-tune a backbone so that neighbours are the same car model (metric learning).

    The checkpoint plugs into every stage: carsearch embed DATA --out EMB --backbone B --weights CKPT_DIR.
    """
    from carsearch.train.loop import train_head, train_model

    common = {
        "classes": classes,
        "val_classes": val_classes,
        "train_fraction": train_fraction,
        "epochs": epochs,
        "loss": loss,
        "embed_dim": embed_dim or None,
        "per_class": per_class,
        "seed": seed,
        "resume": resume,
        "overwrite": overwrite,
    }
    if head_only:
        result = train_head(data_dir, out, batch_size=batch_size or 256, lr=lr or 1e-3, **common)
    else:
        result = train_model(
            data_dir,
            out,
            backbone=backbone,
            weights=weights,
            batch_size=batch_size or 32,
            lr=lr or 1e-4,
            freeze_epochs=freeze_epochs,
            warmup_epochs=warmup_epochs,
            image_size=image_size,
            crop=crop,
            device=device,
            precision=precision,
            workers=workers,
            **common,
        )
    emit(result.to_json(), as_json, _human_train)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="carsearch")
