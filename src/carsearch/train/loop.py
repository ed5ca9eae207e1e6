"""The epoch loop both training modes run: train an epoch, validate, keep the best, checkpoint, resume.

A mode (full fine-tune in `full.py`, head-only in `head.py`) supplies what differs: how one epoch trains,
how validation embeds, and which parts make up the training state. The bookkeeping (history, best epoch,
train_state.pt, model.safetensors / best.safetensors / checkpoint.json) is written once, here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from carsearch.errors import CarsearchError
from carsearch.models import checkpoint as ckpt
from carsearch.train.settings import TrainSettings
from carsearch.train.state import restore, snapshot

log = logging.getLogger(__name__)


def schedule_and_ema(opt: object, net: object, s: TrainSettings, steps: int) -> tuple[object, object | None]:
    """timm's warm-up cosine schedule, stepped per batch (`step_update`), over `s.epochs` epochs of `steps`
    batches, and timm's EMA of `net`'s weights (ModelEmaV3, with its warm-up) when `s.ema_decay` > 0."""
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3

    sched = CosineLRScheduler(
        opt,
        t_initial=s.epochs * steps,
        warmup_t=s.warmup_epochs * steps,
        warmup_lr_init=s.lr * 0.01,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    ema = ModelEmaV3(net, decay=s.ema_decay, use_warmup=True) if s.ema_decay else None
    return sched, ema


def network_run(
    out: Path,
    net: object,
    backbone: str,
    base_weights: object,
    preprocessing: dict,
    mode: str,
    settings: dict,
    baseline: float,
    parts: dict[str, object],
) -> Run:
    """The Run of a mode that trains the network itself (full, partial): checkpoint.json describes the whole
    network, so `embed --weights CKPT_DIR` rebuilds it."""
    from carsearch.provenance import library_versions

    return Run(
        out,
        {
            **ckpt.architecture(net, backbone),
            "base_weights": {"id": base_weights.id, "sha256": base_weights.sha256},
            "dim": net.dim,
            "preprocessing": preprocessing,
            "mode": mode,
            "training": settings,
            "baseline_recall_at_1": baseline,
            "versions": library_versions(),
        },
        parts,
    )


def lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to zero over the remaining steps."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


@dataclass
class Run:
    """One training run's folder and bookkeeping."""

    out: Path
    info: dict  # checkpoint.json, without the per-epoch fields (they are added when it is written)
    parts: dict[str, object]  # what train_state.pt restores: model/head, loss, optimizer, scheduler
    history: list[dict] = field(default_factory=list)
    best: tuple[int, float] = (0, -1.0)
    start: int = 1
    extra_state: dict = field(default_factory=dict)  # mode-specific entries of train_state.pt

    def resume_from(self, state: dict | None) -> None:
        """Continue a run saved by an earlier process (None: a fresh run)."""
        if state is None:
            return
        self.history, self.best, self.start = restore(state, self.parts)
        self.extra_state = {k: state[k] for k in self.extra_state if k in state}
        # What the last delivery recorded: a resume that trains no further epoch delivers it unchanged.
        old = ckpt.read_info(self.out)
        self.info.update(
            {k: old[k] for k in ("epoch", "best_epoch", "best_recall_at_1", "history") if k in old}
        )
        self.info["files"] = old.get("files", {})
        log.info(
            "resuming %s after epoch %d (best Recall@1 %.3f at epoch %d).",
            self.out,
            state["epoch"],
            self.best[1],
            self.best[0],
        )

    def deliver(
        self, epoch: int, model: dict, best: dict | None, best_extra: dict[str, dict] | None = None
    ) -> None:
        """Write model.safetensors (and best.safetensors when `best` is given, with `best_extra`: file name
        -> tensors that belong to that epoch, e.g. the class weights), then checkpoint.json, which records
        their sha256s: a crash at any point leaves the previous description valid."""
        files = dict(self.info.get("files", {}))
        files[ckpt.MODEL_FILE] = ckpt.save_weights(self.out, model)
        if best is not None:
            files[ckpt.BEST_FILE] = ckpt.save_weights(self.out, best, ckpt.BEST_FILE)
            for name, tensors in (best_extra or {}).items():
                files[name] = ckpt.save_weights(self.out, tensors, name)
        self.info.update(
            {
                "epoch": epoch,
                "best_epoch": self.best[0],
                "best_recall_at_1": self.best[1],
                "history": self.history,
                "files": files,
            }
        )
        ckpt.save_info(self.out, self.info)

    def deliver_best(self, model: dict, extra: dict) -> None:
        """Replace best.safetensors by `model` (a network trained after the run, e.g. a refit) and record
        `extra` in checkpoint.json, written last, as `deliver` does."""
        files = dict(self.info.get("files", {}))
        files[ckpt.BEST_FILE] = ckpt.save_weights(self.out, model, ckpt.BEST_FILE)
        # What belonged to the replaced epoch (its class weights) does not describe the new network.
        stale = [name for name in files if name not in (ckpt.MODEL_FILE, ckpt.BEST_FILE)]
        for name in stale:
            del files[name]
        self.info.update({**extra, "files": files})
        ckpt.save_info(self.out, self.info)
        for name in stale:
            (self.out / name).unlink(missing_ok=True)


def fit(
    run: Run,
    epochs: int,
    train_epoch: Callable[[int], dict],
    validate: Callable[[], float] | None,
    on_improved: Callable[[int], None],
    checkpoint: Callable[[int, bool], None] | None,
    report: Callable[[dict, bool], None],
    on_epoch: Callable[[dict], None] | None = None,
    metric: str = "recall@1",
) -> None:
    """Run epochs run.start..epochs. Each: `train_epoch(epoch)` -> {"loss", ...}, `validate()` -> the
    validation score (higher is better; history names it `metric`, Recall@1 by default),
    `on_improved(epoch)` when it is the best so far, train_state.pt, then `checkpoint(epoch, improved)`
    (None: the mode delivers once at the end), `report` and `on_epoch`. `validate` None: a run without
    validation (a refit), no epoch is ever "best"."""
    for epoch in range(run.start, epochs + 1):
        metrics = train_epoch(epoch)
        if not math.isfinite(metrics["loss"]):
            raise CarsearchError(
                f"training diverged at epoch {epoch} (the loss is {metrics['loss']}); lower --lr, or "
                f"resume from the last good epoch with --resume."
            )
        entry = {"epoch": epoch, "loss": metrics.pop("loss")}
        improved = False
        if validate is not None:
            entry[metric] = r1 = validate()
            improved = r1 > run.best[1]
            if improved:
                run.best = (epoch, r1)
                on_improved(epoch)
        run.history.append({**entry, **metrics})
        # The resume state first (it alone restores a run), the deliverables next.
        ckpt.save_state(run.out, {**snapshot(run.parts, epoch, run.history, run.best), **run.extra_state})
        if checkpoint is not None:
            checkpoint(epoch, improved)
        report(run.history[-1], improved)
        if on_epoch is not None:
            on_epoch(run.history[-1])


def mean_loss(losses: list[float]) -> float:
    """An epoch's mean loss; an epoch without a single usable batch is an error, not a NaN."""
    if not losses:
        raise CarsearchError(
            "no batch of this epoch held two usable images; check failures and --batch-size."
        )
    return float(np.mean(losses))
