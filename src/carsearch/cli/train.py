"""`carsearch train images` (a network on photos: the cpu-hour and gpu presets) and `carsearch train head`
(a projection head on cached embeddings): two commands, each with only the options that apply to it.
`carsearch train DATA ...` without a subcommand is `train images` (click-default-group)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import click
from click_default_group import DefaultGroup

from carsearch import defaults
from carsearch.cli.common import (
    WORKERS,
    FloatRange,
    dataset_options,
    device_options,
    emit,
    json_option,
    prefix_runtime,
    runtime_option,
)
from carsearch.errors import CarsearchError
from carsearch.train.settings import DEFAULT_PRESET, LOSSES, PRESETS, TrainSettings

IMAGE_PRESETS = [name for name, p in PRESETS.items() if p.settings.mode != "head"]


def _human_train(r: dict) -> str:
    key = r.get("validation_metric", "recall@1")
    metric = {"recall@1": "Recall@1", "knn_top1": "kNN top-1"}.get(key, key)
    lines = [f"{r['mode']} training of {r['backbone']} ({r['dim']}-d) -> {r['out']}"]
    for h in r["history"][-5:]:
        speed = f", {h['images_per_second']:.1f} images/s" if "images_per_second" in h else ""
        lines.append(f"  epoch {h['epoch']}: loss {h['loss']:.4f}, validation {metric} {h[key]:.1%}{speed}")
    lines.append(
        f"  best: epoch {r['best_epoch']}, {metric} {r['best_recall_at_1']:.1%} "
        f"(frozen features: {r['baseline_recall_at_1']:.1%})"
    )
    lines.append(
        f"  use it: carsearch embed DATA_DIR --out EMB --backbone {r['backbone']} --weights {r['out']}"
    )
    return "\n".join(lines)


def _list_presets(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from carsearch.train.settings import preset_table

    click.echo(preset_table())
    ctx.exit(0)


def _redirect_head_only(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        raise click.UsageError(
            "the head trains on an embedding folder with its own command: "
            "carsearch train head EMB_DIR --out CKPT (--head-only is gone)."
        )


def training_options(f: Callable) -> Callable:
    """What every training run takes: the checkpoint folder, which classes train and validate, the loss
    and its batches, the schedule's length and rate, the seed, resuming, and --json. "The preset" is
    --preset's for `train images`, the head preset for `train head`."""
    for option in reversed(
        (
            click.option(
                "--out", "-o", required=True, type=click.Path(file_okay=False), help="Checkpoint folder."
            ),
            click.option("--classes", help="Class ids to train on, e.g. 1-98 (default: all)."),
            click.option(
                "--val-classes",
                help="Class ids for validation Recall@1 (default: the other classes; if none "
                "remain, 20% of the training classes' images).",
            ),
            click.option(
                "--train-fraction",
                type=FloatRange(0, 1, min_open=True),
                help="Train on this share of each class (the split `bench --gallery-fraction` makes with "
                "the same --seed); the rest is held out and validates when no --val-classes are given "
                "[default: 1].",
            ),
            click.option("--epochs", type=click.IntRange(1), help="Epochs [default: the preset's]."),
            click.option("--loss", type=click.Choice(LOSSES), help="Loss [default: the preset's]."),
            click.option(
                "--embed-dim",
                type=click.IntRange(0),
                help=f"Projection size (0: no projection) [default: {defaults.EMBED_DIM}].",
            ),
            click.option(
                "--batch-size", type=click.IntRange(2), help="Images per batch [default: the preset's]."
            ),
            click.option(
                "--per-class",
                type=click.IntRange(2),
                help=f"Images per class in a proxy-anchor batch [default: {defaults.PER_CLASS}].",
            ),
            click.option("--seed", default=defaults.SEED, show_default=True, type=int),
            click.option("--resume", is_flag=True, help="Continue the run in --out from its last epoch."),
            click.option("--overwrite", is_flag=True, help="Replace a checkpoint already in --out."),
            json_option,
        )
    ):
        f = option(f)
    return f


@click.group(cls=DefaultGroup, default="images")
@click.option(
    "--list-presets",
    is_flag=True,
    is_eager=True,
    expose_value=False,
    callback=_list_presets,
    help="Print the presets' settings side by side and exit.",
)
def train() -> None:
    """Fine-tune a network so that neighbours are the same car model, with a preset for your budget.

    \b
      carsearch train images DATA_DIR --out CKPT [--preset cpu-hour|gpu]   a network on photos
      carsearch train head EMB_DIR --out CKPT                              a head on embeddings (seconds)

    `carsearch train DATA_DIR ...` is `train images`. The checkpoint plugs into every stage:
    carsearch embed DATA --out EMB --backbone B --weights CKPT_DIR.
    """


# Its options keep the variables of the one `train` command it was (CARSEARCH_TRAIN_EPOCHS, ...).
@train.command("images", context_settings={"auto_envvar_prefix": "CARSEARCH_TRAIN"})
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option(
    "--preset",
    type=click.Choice(IMAGE_PRESETS),
    help="The budget you have: cpu-hour (the last stages on cached activations, ~60 min on 2 cores), gpu "
    "(the whole network at 288 px); the head preset is `carsearch train head`. Every option below "
    "overrides the preset. [default: cpu-hour]",
)
@training_options
@dataset_options
@click.option("--backbone", help=f"Backbone [default: the preset's, {defaults.TRAIN_BACKBONE}].")
@click.option(
    "--weights",
    help="Starting weights (imagenet, none, a file, a checkpoint folder) [default: imagenet].",
)
@click.option(
    "--train-blocks",
    help="Train the last N stages (a count, or the first trained stage such as blocks.5 or layer4) on "
    "cached activations of the rest; 'all' trains the whole network on images [default: the preset's].",
)
@click.option(
    "--views",
    type=click.IntRange(0),
    help="Augmented views cached per training image besides the image and its mirror (crops with colour "
    "jitter) [default: the preset's].",
)
@click.option("--ema", type=FloatRange(0, 1, max_open=True), help="EMA decay of weights (0: off).")
@click.option(
    "--cache",
    type=click.Path(file_okay=False),
    help="Activation cache folder (default OUT/activations); a rerun with the same settings reuses it.",
)
@click.option(
    "--with-features/--projection-only",
    "with_features",
    default=None,
    help="The embedding: the projection and the backbone's pooled features together (better on models "
    "never trained on), or the projection alone [default: the preset's].",
)
@click.option(
    "--lr",
    type=FloatRange(0, min_open=True),
    help=f"Learning rate [default: the preset's; full fine-tunes {defaults.LR:g} for the backbone, head "
    f"{defaults.HEAD_LR_MULT}x, proxies {defaults.PROXY_LR_MULT}x].",
)
@click.option(
    "--freeze-epochs",
    type=click.IntRange(0),
    help="Full fine-tune: first epochs with the backbone frozen (head and proxies only).",
)
@click.option("--warmup-epochs", type=click.IntRange(0), help="Epochs of linear warm-up.")
@click.option(
    "--image-size",
    type=click.IntRange(32),
    help="Train at this resolution (default: the preset's, else the backbone's).",
)
@click.option(
    "--test-image-size",
    type=click.IntRange(32),
    help="Embed and validate at this resolution (default: the preset's, else --image-size). Networks "
    "trained on random crops gain from a larger test size.",
)
@click.option(
    "--refit/--no-refit",
    default=None,
    help="Partial: once the held-out images picked the epoch, train again on every image for that many "
    "epochs (the threshold still calibrated by the network before). Not measured yet: off in every preset.",
)
@click.option("--crop", type=click.Choice(defaults.CROP_MODES), help=f"[default: {defaults.CROP}]")
@device_options
@runtime_option
@click.option("--workers", default="auto", show_default=True, type=WORKERS)
@click.option("--head-only", is_flag=True, hidden=True, expose_value=False, callback=_redirect_head_only)
def train_images(
    data_dir: str,
    out: str,
    preset: str | None,
    train_blocks: str | None,
    views: int | None,
    ema: float | None,
    cache: str | None,
    resume: bool,
    overwrite: bool,
    as_json: bool,
    **options: Any,
) -> None:
    """Fine-tune a network on the labelled photos in DATA_DIR (the cpu-hour or gpu preset)."""
    import logging

    from carsearch.train.settings import describe, get_preset

    name = preset or DEFAULT_PRESET
    base = get_preset(name).settings
    mode = ("full" if train_blocks == "all" else "partial") if train_blocks is not None else base.mode
    runtime = str(options.pop("runtime"))  # the cached-prefix step's (partial presets such as cpu-hour)
    dataset = {key: options.pop(key) for key in ("format", "labels", "split")}  # how DATA_DIR is read
    s = _settings(
        base,
        options,
        mode=mode,
        train_blocks=None if train_blocks == "all" else train_blocks,
        augmented_views=views,
        ema_decay=ema,
    )
    logging.getLogger("carsearch").info("%s", describe(s, name))
    run = dict(resume=resume, overwrite=overwrite)
    with prefix_runtime(runtime, s.device):
        result = _run(s, data_dir, out, dataset, cache, run)
    emit(result.to_json(), as_json, _human_train)


@train.command("head")
@click.argument("emb_dir", type=click.Path(file_okay=False))
@training_options
@click.option(
    "--lr",
    type=FloatRange(0, min_open=True),
    help=f"Learning rate of the head [default: {defaults.HEAD_LR:g}; proxies "
    f"{defaults.HEAD_ONLY_PROXY_LR_MULT}x].",
)
def train_head_cmd(
    emb_dir: str, out: str, resume: bool, overwrite: bool, as_json: bool, **options: object
) -> None:
    """Train a projection head on the cached embeddings in EMB_DIR (from `carsearch embed`): seconds on a
    CPU. The embeddings fix the backbone, weights and preprocessing; `carsearch project` applies the head
    to embeddings without re-running the network."""
    import logging

    from carsearch.train import train_head
    from carsearch.train.settings import describe, get_preset

    s = _settings(get_preset("head").settings, options)
    logging.getLogger("carsearch").info("%s", describe(s, "head"))
    result = train_head(emb_dir, out, s, resume=resume, overwrite=overwrite)
    emit(result.to_json(), as_json, _human_train)


def _settings(base: TrainSettings, options: dict, **fixed: object) -> TrainSettings:
    """`base` with the options given (None: not given) and `fixed`; --embed-dim 0 means no projection."""
    embed_dim = options.pop("embed_dim")
    s = base.override(**options, **fixed)
    return replace(s, embed_dim=embed_dim or None) if embed_dim is not None else s


def _run(s: TrainSettings, data_dir: str, out: str, dataset: dict, cache: str | None, run: dict) -> Any:
    """The training `s.mode` asks for (partial or full), and its result."""
    if s.mode == "partial":
        import numpy as np

        from carsearch.datasets import read_dataset
        from carsearch.train.partial import Collection, train_partial

        ds = read_dataset(data_dir, dataset["format"], labels_file=dataset["labels"], split=dataset["split"])
        if not ds.labeled:
            raise CarsearchError(f"{ds.root} has no class labels; training needs labelled images.")
        data = Collection(
            ds.root,
            tuple(r.path for r in ds.records),
            np.array([r.class_id for r in ds.records]),
            ds.records_sha256(),
        )
        return train_partial(data, out, s, cache_dir=cache, **run).result
    from carsearch.train import train_model

    return train_model(
        data_dir,
        out,
        s,
        format=dataset["format"],
        labels_file=dataset["labels"],
        split=dataset["split"],
        **run,
    )
