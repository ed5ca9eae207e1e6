"""`carsearch train`: metric-learning fine-tunes, full or head-only."""

from __future__ import annotations

import click

from carsearch import defaults
from carsearch.cli.common import WORKERS, dataset_options, device_options, emit, json_option


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


@click.command()
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Checkpoint folder.")
@dataset_options
@click.option("--backbone", default=defaults.TRAIN_BACKBONE, show_default=True)
@click.option(
    "--weights",
    default=defaults.WEIGHTS,
    show_default=True,
    help="Starting weights (imagenet, none, a file, a checkpoint folder).",
)
@click.option("--classes", help="Class ids to train on, e.g. 1-98 (default: all).")
@click.option(
    "--val-classes",
    help="Class ids for validation Recall@1 (default: the other classes; if none "
    "remain, 20% of the training classes' images).",
)
@click.option(
    "--train-fraction",
    default=defaults.TRAIN_FRACTION,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="Train on this share of each class (the split `bench --gallery-fraction` makes with the same "
    "--seed); the rest is held out and validates when no --val-classes are given.",
)
@click.option(
    "--epochs",
    type=click.IntRange(1),
    help=f"Epochs [default: {defaults.EPOCHS}; --head-only {defaults.HEAD_EPOCHS}].",
)
@click.option(
    "--loss",
    default=defaults.LOSS,
    show_default=True,
    type=click.Choice(["proxy-anchor", "normalized-softmax"]),
)
@click.option(
    "--embed-dim",
    default=defaults.EMBED_DIM,
    show_default=True,
    type=click.IntRange(0),
    help="Projection size after the backbone (0: no projection).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(2),
    help=f"Images per batch [default: {defaults.TRAIN_BATCH}; --head-only {defaults.HEAD_BATCH}].",
)
@click.option(
    "--per-class",
    default=defaults.PER_CLASS,
    show_default=True,
    type=click.IntRange(2),
    help="Images per class in a batch.",
)
@click.option(
    "--lr",
    type=click.FloatRange(0, min_open=True),
    help=f"Learning rate [default: {defaults.LR:g} for the backbone, head {defaults.HEAD_LR_MULT}x, proxies "
    f"{defaults.PROXY_LR_MULT}x; --head-only: {defaults.HEAD_LR:g} for the head, proxies "
    f"{defaults.HEAD_ONLY_PROXY_LR_MULT}x].",
)
@click.option(
    "--freeze-epochs",
    default=defaults.FREEZE_EPOCHS,
    show_default=True,
    type=click.IntRange(0),
    help="First epochs with the backbone frozen (head and proxies only).",
)
@click.option("--warmup-epochs", default=defaults.WARMUP_EPOCHS, show_default=True, type=click.IntRange(0))
@click.option(
    "--image-size",
    type=click.IntRange(32),
    help="Train and embed at this resolution (default: the backbone's).",
)
@click.option(
    "--crop", default=defaults.CROP, show_default=True, type=click.Choice(["center", "squash", "pad"])
)
@device_options
@click.option("--workers", default="auto", show_default=True, type=WORKERS)
@click.option("--seed", default=defaults.SEED, show_default=True, type=int)
@click.option(
    "--head-only",
    is_flag=True,
    help="Train only a projection head on cached embeddings: DATA_DIR is "
    "then an embedding folder from `carsearch embed` (seconds on a CPU).",
)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last epoch.")
@click.option("--overwrite", is_flag=True, help="Replace a checkpoint already in --out.")
@json_option
@click.pass_context
def train(
    ctx: click.Context,
    data_dir: str,
    out: str,
    format: str,
    labels: str | None,
    split: str,
    backbone: str,
    weights: str,
    classes: str | None,
    val_classes: str | None,
    train_fraction: float,
    epochs: int | None,
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
    from carsearch.train import train_head, train_model

    common = {
        "classes": classes,
        "val_classes": val_classes,
        "train_fraction": train_fraction,
        "loss": loss,
        "embed_dim": embed_dim or None,
        "per_class": per_class,
        "seed": seed,
        "resume": resume,
        "overwrite": overwrite,
    }
    if head_only:
        _refuse_image_options(ctx)
        result = train_head(
            data_dir,
            out,
            epochs=epochs or defaults.HEAD_EPOCHS,
            batch_size=batch_size or defaults.HEAD_BATCH,
            lr=lr or defaults.HEAD_LR,
            **common,
        )
    else:
        result = train_model(
            data_dir,
            out,
            format=format,
            labels_file=labels,
            split=split,
            backbone=backbone,
            weights=weights,
            epochs=epochs or defaults.EPOCHS,
            batch_size=batch_size or defaults.TRAIN_BATCH,
            lr=lr or defaults.LR,
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


# Options that shape how images become features: a head trained on cached embeddings has none of them.
_IMAGE_OPTIONS = (
    "format",
    "labels",
    "split",
    "backbone",
    "weights",
    "crop",
    "image_size",
    "device",
    "precision",
    "workers",
    "freeze_epochs",
    "warmup_epochs",
)


def _refuse_image_options(ctx: click.Context) -> None:
    given = [
        f"--{name.replace('_', '-')}"
        for name in _IMAGE_OPTIONS
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
    ]
    if given:
        raise click.UsageError(
            f"--head-only trains on the embeddings in DATA_DIR, which fix the backbone, weights and "
            f"preprocessing, so {', '.join(given)} cannot apply; leave {'it' if len(given) == 1 else 'them'} "
            "out, or train without --head-only."
        )
