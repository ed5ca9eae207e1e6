"""`carsearch embed`, `backbones` and `dataset`: images into embedding shards, and what is available."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from carsearch import defaults
from carsearch.cli.common import (
    WORKERS,
    FloatRange,
    dataset_options,
    device_options,
    emit,
    json_option,
    runtime_option,
)
from carsearch.errors import CarsearchError


def _human_embed(r: dict) -> str:
    failed = ", ".join(f"{k} {v}" for k, v in r["failed"].items()) or "none"
    state = "complete" if r["complete"] else "incomplete: run again to continue"
    notes = ""
    if r["transient_failures"]:
        notes += (
            f"\n{r['transient_failures']} images were missing or unreadable: once they are back, "
            "run again with --retry-failed."
        )
    if r["retried_shards"] or r["changed_images"]:
        notes += (
            f"\nembedded again: {r['retried_shards']} shards with failures, "
            f"{r['changed_images']} changed images."
        )
    return (
        f"{r['rows']} embeddings in {r['shards']} shards at {r['out']} ({state}); "
        f"this run: {r['images']} images in {r['seconds']:.1f} s = {r['images_per_second']:.1f} images/s "
        f"({r['backbone']}, {r['precision']}, {r['device']}{_on(r)}), {r['resumed_shards']} shards resumed"
        + (f" and {r['resumed_images']} images of an unfinished one" if r.get("resumed_images") else "")
        + "; "
        f"skipped: {failed}"
        + (f"; left out (not images): {left_out_text(r['left_out'])}" if r.get("left_out") else "")
        + notes
    )


def left_out_text(counts: dict[str, int]) -> str:
    return f"{sum(counts.values())} files (" + ", ".join(f"{ext} {n}" for ext, n in counts.items()) + ")"


def _on(r: dict) -> str:
    """The runtime (embed/runtimes.py), and the Ray workers when there were some."""
    return f", {r['runtime']}" + (f", {r['workers']} Ray workers" if r["engine"] == "ray" else "")


# Options whose built-in default a rerun replaces with the setting the folder was made with.
FOLDER_SETTINGS = (
    "format",
    "split",
    "bbox_crop",
    "backbone",
    "crop",
    "shard_size",
    "precision",
    "id_start",
    "max_pixels",
    "flip",
)


@click.command()
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option(
    "--out", "-o", required=True, type=click.Path(file_okay=False), help="Folder for shards + manifest."
)
@dataset_options
@click.option("--bbox-crop", is_flag=True, help="stanford layout: crop each image to its annotated box.")
@click.option(
    "--backbone",
    default=defaults.BACKBONE,
    show_default=True,
    help="Network; see `carsearch backbones`: a registered name, or onnx:PATH, torchscript:PATH, timm:NAME.",
)
@click.option(
    "--declare",
    multiple=True,
    metavar="KEY=VALUE",
    help="A file backbone's preprocessing and embedding point, as in the TOML beside it (wins over it): "
    "size, resize, crop_pct, crop, mean, std, interpolation; output, layer, cut_head (README).",
)
@click.option(
    "--weights",
    help="The backbone's pretrained weights by default (imagenet; pretrained = Hugging Face cache for "
    "DINOv2 / CLIP), or imagenet-v1, none, a .pth file, or a `carsearch train` checkpoint folder.",
)
@click.option("--weights-sha256", help="Expected sha256 of the weights file.")
@click.option(
    "--crop",
    default=defaults.CROP,
    show_default=True,
    type=click.Choice(defaults.CROP_MODES),
    help="squash: resize to a square (best for wide cars, docs/benchmarks.md); center: resize + centre "
    "crop; pad: letterbox.",
)
@click.option(
    "--flip",
    is_flag=True,
    help="Test-time flip: average each image's embedding with its mirror image's (twice the compute); "
    "queries of an index built on it are embedded the same way.",
)
@click.option("--batch-size", default=defaults.BATCH_SIZE, show_default=True, type=click.IntRange(1))
@click.option(
    "--workers",
    default="auto",
    show_default=True,
    type=WORKERS,
    help="local engine: image decoding processes (0 = decode in the main process); ray engine: workers, "
    "each holding one network (auto = as many as the cluster's CPUs or GPUs hold).",
)
@click.option(
    "--engine",
    default="local",
    show_default=True,
    type=click.Choice(defaults.ENGINES),
    help="local: this machine; ray: workers on a Ray cluster (README: Running on a cluster).",
)
@click.option(
    "--ray-address",
    help="Ray cluster to join (host:port); default RAY_ADDRESS, else a local cluster started for the run.",
)
@click.option(
    "--cpus-per-worker",
    default=1.0,
    show_default=True,
    type=FloatRange(min=0, min_open=True),
    help="ray engine: CPUs each worker reserves (and decodes with).",
)
@click.option(
    "--gpus-per-worker",
    default=0.0,
    show_default=True,
    type=FloatRange(min=0),
    help="ray engine: GPUs each worker reserves; above 0 the workers embed on CUDA.",
)
@click.option(
    "--shard-size",
    default=defaults.SHARD_SIZE,
    show_default=True,
    type=click.IntRange(1),
    help="Records per shard.",
)
@click.option(
    "--save-every",
    default=defaults.SAVE_EVERY,
    show_default=True,
    type=FloatRange(0),
    metavar="SECONDS",
    help="Save the shard in progress this often (and on Ctrl-C), so that a rerun goes on from there; "
    "0: after every batch.",
)
@device_options
@runtime_option
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
    default=defaults.MAX_PIXELS,
    show_default=True,
    type=click.IntRange(1),
    help="Skip images with more pixels (decompression bombs).",
)
@click.option("--overwrite", is_flag=True, help="Discard what an earlier run wrote to --out and start again.")
@click.option(
    "--retry-failed",
    is_flag=True,
    help="Embed again the finished shards that skipped images (files restored, links or permissions fixed).",
)
@click.option(
    "--verify",
    is_flag=True,
    help="Re-hash the images of finished shards and embed again those whose files changed.",
)
@json_option
def embed(
    data_dir: str,
    out: str,
    declare: tuple[str, ...],
    engine: str,
    ray_address: str | None,
    cpus_per_worker: float,
    gpus_per_worker: float,
    as_json: bool,
    **options: Any,
) -> None:
    """Embed every image of DATA_DIR into HDF5 shards under --out (resumable).

    A second run goes on where the first stopped (Ctrl-C loses nothing; a killed run at most --save-every
    seconds), with the settings --out was made with unless they are given; a different one is refused and
    named. Unreadable images are skipped, counted by reason and listed in failures.jsonl.
    """
    from carsearch.embed import EmbedJob, Engine, embed_dataset
    from carsearch.models import declare_backbone

    # A file backbone's full name (path, declared keys).
    options["backbone"] = declare_backbone(options["backbone"], declare)
    options["labels_file"] = options.pop("labels")
    ctx = click.get_current_context()
    for name in FOLDER_SETTINGS:
        # None for a built-in default: a rerun then takes the folder's own setting.
        if ctx.get_parameter_source(name) is ParameterSource.DEFAULT:
            options[name] = None
    run_on = Engine(engine, ray_address, cpus_per_worker, gpus_per_worker)
    job = EmbedJob(data_dir, out, **options)
    result = embed_dataset(job, engine=run_on, progress=True)
    emit(result.to_json(), as_json, _human_embed)
    if result.rows == 0 and result.records > 0:
        reasons = ", ".join(f"{k} {v}" for k, v in result.failed.items()) or "none embedded yet"
        raise CarsearchError(
            f"embedded none of the {result.records} images ({reasons}; each is listed in "
            f"{result.out}/failures.jsonl); fix them and run again with --retry-failed."
        )


@click.command()
@json_option
def backbones(as_json: bool) -> None:
    """List the registered backbones: embedding size, parameters, input size, weights choices, and the
    accuracy a user can expect as published (not measured here)."""
    from carsearch.models import FILE_KINDS, list_backbones

    files = [{"name": name, "kind": "file", "description": text} for name, text in FILE_KINDS]
    emit(
        [spec.describe() for spec in list_backbones()] + files,
        as_json,
        lambda rs: (
            "\n".join(
                f"{r['name']:<20} {r['dim']:>5}-d  {r['params_millions']:>5.1f}M params  {r['input']} px  "
                f"weights: {', '.join(r['weights'])}\n{'':<22}{r['description']}; published: {r['published']}"
                for r in rs
                if r.get("kind") != "file"
            )
            + "\nnetworks from files (preprocessing declared in a TOML beside the file or by --declare):\n"
            + "\n".join(f"{r['name']:<20} {r['description']}" for r in files)
        ),
    )


@click.command()
@click.argument("data_dir", type=click.Path(file_okay=False))
@dataset_options
@json_option
def dataset(data_dir: str, format: str, labels: str | None, split: str, as_json: bool) -> None:
    """Show how DATA_DIR is read: layout, image and class counts, a few parsed records, and each class's id
    (what `bench --known-classes / --test-classes` take)."""
    from collections import Counter

    from carsearch.datasets import read_dataset

    ds = read_dataset(data_dir, format, labels_file=labels, split=split)
    classes = Counter(r.label for r in ds.records if r.label)
    ids = Counter((r.class_id, r.label) for r in ds.records if r.label)
    info = {
        "root": str(ds.root),
        "format": ds.format,
        "images": len(ds.records),
        "classes": len(classes),
        "makes": len({r.make for r in ds.records if r.make}),
        "images_per_class": {"min": min(classes.values()), "max": max(classes.values())} if classes else None,
        "left_out": ds.left_out,
        "examples": [
            {"path": r.path, "label": r.label, "make": r.make, "model": r.model, "year": r.year}
            for r in ds.records[:: max(1, len(ds.records) // 5)][:5]
        ],
        "class_ids": [{"id": c, "label": label, "images": n} for (c, label), n in sorted(ids.items())],
    }
    emit(
        info,
        as_json,
        lambda i: (
            f"{i['root']}: {i['format']} layout, {i['images']} images, {i['classes']} classes, "
            f"{i['makes']} makes"
            + (f"; left out (not images): {left_out_text(i['left_out'])}" if i["left_out"] else "")
            + "\n"
            + "\n".join(f"  {e['path']}: {e['make']} | {e['model']} | {e['year']}" for e in i["examples"])
            + (
                "\nclass ids (bench --known-classes / --test-classes take them):\n"
                + "\n".join(f"  {c['id']:>5}  {c['label']} ({c['images']} images)" for c in i["class_ids"])
                if i["class_ids"]
                else ""
            )
        ),
    )


@click.command()
@click.argument("emb_dir", type=click.Path(file_okay=False))
@click.option(
    "--head",
    "head",
    required=True,
    type=click.Path(file_okay=False),
    help="A head checkpoint (`carsearch train head`).",
)
@click.option(
    "--out", "-o", required=True, type=click.Path(file_okay=False), help="Folder for the new shards."
)
@json_option
def project(emb_dir: str, head: str, out: str, as_json: bool) -> None:
    """Apply a head checkpoint (`train head`) to EMB_DIR's shards, without the CNN (seconds).

    The new shards record the checkpoint as their weights, so an index over them embeds queries through it.
    """
    from carsearch.embed.project import project_embeddings

    body = project_embeddings(emb_dir, head, out)
    summary = {"out": str(Path(out).resolve()), "rows": body["rows"], "dim": body["provenance"]["dim"]}
    emit(summary, as_json, lambda r: f"{r['rows']} embeddings projected to {r['dim']}-d in {r['out']}")
