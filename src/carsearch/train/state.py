"""A training run's folder: refusing to clobber, resuming only with the same settings, saving the state
that restores a run, and the result it reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from carsearch.errors import CarsearchError
from carsearch.models import checkpoint as ckpt
from carsearch.train.settings import TrainSettings

# Settings that must match for --resume to continue a run (the rest may change, e.g. --epochs).
RESUME_FIELDS = (
    "mode",
    "backbone",
    "weights",
    "weights_sha256",
    "embed_dim",
    "with_features",
    "loss",
    "classes",
    "val_classes",
    "train_fraction",
    "crop",
    "image_size",
    "batch_size",
    "per_class",
    "lr",
    "seed",
    "data",
    "train_blocks",
    "augmented_views",
    "label_smoothing",
    "scale",
    "ema_decay",
    "flip",
)


@dataclass
class TrainResult:
    out: str
    mode: str
    backbone: str
    dim: int
    epochs: int
    best_epoch: int
    best_recall_at_1: float
    baseline_recall_at_1: float  # the features before training, same validation set
    history: list[dict] = field(default_factory=list)
    device: str = "cpu"
    precision: str = "fp32"
    # What best_recall_at_1 and baseline_recall_at_1 measure: "recall@1" (held-out images among
    # themselves) or "knn_top1" (the classifier's weighted kNN vote of held-out images against the
    # training images, what `index build --tune` delivers).
    validation_metric: str = "recall@1"
    # A refit (train/partial.py): epochs, images, seconds and history of the network trained again on the
    # training and held-out images together, which the checkpoint delivers. None: no refit.
    refit: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def of_run(
        cls, run, mode: str, backbone: str, dim: int, epochs: int, baseline: float, **more
    ) -> TrainResult:
        """The result of `run` (train/loop.Run: its folder, best epoch and Recall@1, history); `more`: the
        device, precision and validation metric where they are not the defaults."""
        return cls(
            str(run.out), mode, backbone, dim, epochs, run.best[0], run.best[1], baseline, run.history, **more
        )


def prepare_out(out: Path, settings: dict, resume: bool, overwrite: bool) -> dict | None:
    """The saved training state to resume from, or None for a fresh run; refuses to clobber by accident."""
    out.mkdir(parents=True, exist_ok=True)
    exists = (out / ckpt.INFO_FILE).is_file()
    if resume:
        if not exists:
            raise CarsearchError(f"{out} holds no checkpoint to resume; start without --resume.")
        old = ckpt.read_info(out)["training"]
        for name in RESUME_FIELDS:
            if name not in old and settings.get(name) is None:
                continue  # a setting this kind of run does not record nor take (the head's with_features)
            # A setting newer than the run (with_features): the run had its default.
            if old.get(name, getattr(TrainSettings(), name, None)) != settings.get(name):
                raise CarsearchError(
                    f"{out} was trained with a different {name} ({old.get(name)!r}, now "
                    f"{settings.get(name)!r}); resume with the same settings or start again with --overwrite."
                )
        return ckpt.load_state(out)
    if exists and not overwrite:
        raise CarsearchError(
            f"{out} already holds a checkpoint; pass --resume to continue it or --overwrite."
        )
    for name in (ckpt.INFO_FILE, ckpt.MODEL_FILE, ckpt.BEST_FILE, ckpt.STATE_FILE):
        (out / name).unlink(missing_ok=True)
    return None


def restore(state: dict, parts: dict[str, object]) -> tuple[list[dict], tuple[int, float], int]:
    """Load each part's state from a saved training state; returns (history, best, first epoch to run)."""
    for key, part in parts.items():
        part.load_state_dict(state[key])
    torch.set_rng_state(state["rng"])
    return list(state["history"]), (state["best_epoch"], state["best_recall"]), state["epoch"] + 1


def snapshot(parts: dict[str, object], epoch: int, history: list[dict], best: tuple[int, float]) -> dict:
    """The training state that `restore` takes back (train_state.pt)."""
    return {
        "epoch": epoch,
        **{key: part.state_dict() for key, part in parts.items()},
        "best_epoch": best[0],
        "best_recall": best[1],
        "rng": torch.get_rng_state(),
        "history": history,
    }
