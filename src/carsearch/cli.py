"""The `carsearch` command: a thin click layer, one command per stage, no logic of its own.

Heavy libraries (torch, faiss, fastapi) are imported inside the commands, so `carsearch --help` is instant.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any

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


def _size(text: str) -> int:
    """'4G', '512M', '1.5GiB', '1000000' -> bytes."""
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        return int(float(s[:-1]) * units[s[-1]]) if s and s[-1] in units else int(float(s))
    except (ValueError, KeyError):
        raise click.BadParameter(f"{text!r} is not a size such as 512M or 4G") from None


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
@click.option(
    "--format",
    "format",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "csv", "folders", "stanford", "vmmrdb", "unlabeled"]),
    help="Dataset layout.",
)
@click.option(
    "--labels", type=click.Path(dir_okay=False), help="csv layout: labels file (default DATA_DIR/labels.csv)."
)
@click.option(
    "--split",
    default="all",
    show_default=True,
    type=click.Choice(["train", "test", "all"]),
    help="stanford layout: which split.",
)
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
    default="center",
    show_default=True,
    type=click.Choice(["center", "squash", "pad"]),
    help="center: resize + centre crop; squash: resize to a square; pad: letterbox.",
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
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option(
    "--precision",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "fp32", "bf16"]),
    help="auto: bf16 autocast where the hardware runs it natively (CUDA, AVX-512-BF16/AMX CPUs).",
)
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
@click.option(
    "--format",
    "format",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "csv", "folders", "stanford", "vmmrdb", "unlabeled"]),
)
@click.option("--labels", type=click.Path(dir_okay=False), help="csv layout: labels file.")
@click.option("--split", default="all", show_default=True, type=click.Choice(["train", "test", "all"]))
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


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="carsearch")
