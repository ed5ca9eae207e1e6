"""Training settings as one object, and the presets that fill it by the budget a user has.

`TrainSettings` is what every trainer takes (the CLI and `index build --tune` build one from a preset plus
the options given); a preset is a named, documented set of its fields, each overridable. The figures quoted
beside a preset are measured on the dev protocol (docs/benchmarks.md, "Training presets").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from carsearch import defaults
from carsearch.errors import CarsearchError

MODES = ("head", "partial", "full")
# The losses train/losses.py builds (named here, torch-free, for the CLI's choices).
LOSSES = ("proxy-anchor", "normalized-softmax", "cosine-ce", "cosface", "arcface", "pml-proxy-anchor")
# Views whose prefix activations are cached per training image: the framed image, its mirror, and
# augmented views (random-resized crop + colour jitter, half of them mirrored), each seeded by
# (seed, view, image) so a rerun or a resume computes the same pixels.
PLAIN, MIRROR = "plain", "mirror"


@dataclass(frozen=True)
class TrainSettings:
    """Everything a training run is made of. `mode`: head (a projection on cached embeddings), partial (the
    last `train_blocks` stages on cached prefix activations) or full (the whole network on images)."""

    mode: str = "partial"
    backbone: str = defaults.TRAIN_BACKBONE
    weights: str = defaults.WEIGHTS
    train_blocks: str = "2"  # partial: a count of final stages, or the first trained stage ("blocks.5")
    augmented_views: int = 10  # partial: cached augmented views per training image (besides plain, mirror)
    epochs: int = defaults.EPOCHS
    loss: str = defaults.LOSS
    scale: float = 16.0  # cosine classifiers: logit scale s (= 1 / temperature)
    margin: float = 0.0  # cosface / arcface margin
    label_smoothing: float = 0.1  # cosine-ce
    embed_dim: int | None = defaults.EMBED_DIM
    # partial / full: the embedding is the projection and the backbone features together (EmbeddingNet.embed)
    with_features: bool = False
    batch_size: int = defaults.TRAIN_BATCH
    per_class: int = defaults.PER_CLASS  # proxy-anchor batches hold P classes x this many images
    lr: float = defaults.LR
    head_lr_mult: float = defaults.HEAD_LR_MULT
    weight_decay: float = defaults.WEIGHT_DECAY
    warmup_epochs: int = defaults.WARMUP_EPOCHS
    freeze_epochs: int = defaults.FREEZE_EPOCHS  # full: first epochs with the backbone frozen
    ema_decay: float = 0.0  # 0: no EMA of weights; else timm's ModelEmaV3 with this decay per step
    image_size: int | None = None  # train at this resolution; None: the backbone's
    # Embed (and validate) at this resolution; None: image_size. Networks trained on random-resized crops
    # see cars larger than a whole framed photo shows them; a larger test size compensates ("FixRes",
    # Touvron et al. 2019, arXiv:1906.06423; timm's test_input_size).
    test_image_size: int | None = None
    crop: str = defaults.CROP
    device: str = defaults.DEVICE
    precision: str = defaults.PRECISION
    workers: int | None = None
    classes: str | None = None
    val_classes: str | None = None
    train_fraction: float = defaults.TRAIN_FRACTION
    # partial: after validation picks the epoch, train again from the same start on the training and the
    # held-out images together for that many epochs of the same schedule (scikit-learn's `refit`).
    refit: bool = False
    val_images: int = defaults.VAL_IMAGES
    seed: int = defaults.SEED

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CarsearchError(f"unknown training mode {self.mode!r}; choose one of {', '.join(MODES)}.")
        if self.epochs < 1 or self.batch_size < 2 or self.per_class < 2:
            raise CarsearchError(
                "--epochs must be >= 1, --batch-size and --per-class >= 2 (positives per class)."
            )
        if self.augmented_views < 0:
            raise CarsearchError("--views must be >= 0.")
        if not 0 <= self.ema_decay < 1:
            raise CarsearchError("--ema must be in [0, 1) (0 turns it off).")

    def to_dict(self) -> dict:
        return asdict(self)

    def views(self) -> tuple[str, ...]:
        """The cached views of a training image, in order."""
        return (PLAIN, MIRROR, *(f"aug{i}" for i in range(self.augmented_views)))

    def override(self, **given: object) -> TrainSettings:
        """These settings with the options a user gave (None means not given)."""
        known = {f.name for f in fields(self)}
        unknown = set(given) - known
        if unknown:
            raise CarsearchError(f"unknown training settings: {', '.join(sorted(unknown))}.")
        return replace(self, **{k: v for k, v in given.items() if v is not None})


@dataclass(frozen=True)
class Preset:
    name: str
    budget: str
    summary: str
    settings: TrainSettings


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "head",
            "seconds",
            "a projection head on the collection's cached embeddings (no CNN)",
            TrainSettings(
                mode="head",
                epochs=defaults.HEAD_EPOCHS,
                loss="proxy-anchor",
                batch_size=defaults.HEAD_BATCH,
                lr=defaults.HEAD_LR,
                warmup_epochs=1,
            ),
        ),
        Preset(
            "cpu-hour",
            "60 minutes on 2 CPU cores, caching included",
            "the last 3 stages of EfficientNet-Lite0 + a 512-d projection on cached activations of 12 "
            "views per image (plain, mirror, 10 crops with colour jitter); cosine classifier (scale 16, "
            "label smoothing 0.1), AdamW, warm-up cosine schedule, EMA of weights; trained at 224 px, "
            "embedded at 320 px as the projection and the pooled features together",
            TrainSettings(
                mode="partial",
                backbone="efficientnet_lite0",
                train_blocks="3",  # blocks.4-6: 82.4% top-1 against 81.3% for 2 (docs/benchmarks.md)
                augmented_views=10,
                epochs=50,
                loss="cosine-ce",
                scale=16.0,
                label_smoothing=0.1,
                batch_size=64,
                lr=1e-3,
                head_lr_mult=10,
                weight_decay=0.05,
                warmup_epochs=1,
                ema_decay=0.998,
                test_image_size=320,
                with_features=True,
            ),
        ),
        Preset(
            "gpu",
            "minutes on a GPU",
            "the whole network at 288 px with augmented images every epoch; cosine classifier, EMA",
            TrainSettings(
                mode="full",
                backbone="efficientnet_lite0",
                epochs=30,
                loss="cosine-ce",
                scale=16.0,
                label_smoothing=0.1,
                batch_size=64,
                lr=3e-4,
                head_lr_mult=10,
                weight_decay=0.05,
                warmup_epochs=1,
                freeze_epochs=0,
                ema_decay=0.999,
                image_size=288,
            ),
        ),
    )
}
DEFAULT_PRESET = "cpu-hour"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise CarsearchError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}.") from None


# The fields a preset table shows (the rest keep their defaults in every preset).
TABLE_FIELDS = (
    "mode",
    "backbone",
    "train_blocks",
    "augmented_views",
    "epochs",
    "loss",
    "batch_size",
    "lr",
    "ema_decay",
    "image_size",
    "test_image_size",
    "with_features",
    "refit",
)


def preset_table() -> str:
    """The presets side by side, as printed by `carsearch train --list-presets`."""
    rows = [["setting", *PRESETS]]
    rows.append(["budget", *(p.budget for p in PRESETS.values())])
    for name in TABLE_FIELDS:
        rows.append(
            [name, *(_show(getattr(p.settings, name), name, p.settings.mode) for p in PRESETS.values())]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append("")
    lines += [f"{p.name}: {p.summary}." for p in PRESETS.values()]
    return "\n".join(lines)


def describe(s: TrainSettings, preset: str | None) -> str:
    """One line of what a run will do, printed at its start."""
    shown = ", ".join(f"{n} {_show(getattr(s, n), n, s.mode)}" for n in TABLE_FIELDS if n != "mode")
    return f"{s.mode} training{f' (preset {preset})' if preset else ''}: {shown}"


PARTIAL_ONLY = ("train_blocks", "augmented_views")  # settings that apply to the partial mode alone


def _show(v: object, name: str, mode: str) -> str:
    if name in PARTIAL_ONLY and mode != "partial":
        return "-"
    return "-" if v is None or (isinstance(v, float) and v == 0.0) else str(v)
