"""One training run of a partial fine-tune on cached activations (`Phase`), and the refit that trains the
picked network again on every image (`refit`). train/partial.py prepares the cache and the data for both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from carsearch.eval.class_cosine import CLASS_WEIGHTS_FILE
from carsearch.models import EmbeddingNet, Preprocessing, load_backbone
from carsearch.models import checkpoint as ckpt
from carsearch.models.cut import cut, resolve_trained
from carsearch.models.network import freeze_batchnorm
from carsearch.progress import Progress
from carsearch.train.data import BalancedBatches
from carsearch.train.loop import Run, fit, mean_loss, network_run, schedule_and_ema
from carsearch.train.losses import CLASSIFIER_LOSSES, class_weights, make_loss
from carsearch.train.settings import TrainSettings
from carsearch.train.state import prepare_out

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """Where and how a phase runs: the training device, bf16 autocast, progress bars."""

    device: torch.device
    bf16: bool
    progress: bool


class Phase:
    """One training run of the suffix (BatchNorm kept as pretrained), the projection head and the loss's
    class weights on cached views: AdamW, timm's warm-up cosine schedule and EMA, and one epoch's steps.

    `x` (n, views, C, H, W) bf16 cached activations; `classes` (n,) int64 class ids."""

    def __init__(
        self,
        net: EmbeddingNet,
        split: object,
        s: TrainSettings,
        x: torch.Tensor,
        classes: np.ndarray,
        where: Placement,
    ) -> None:
        self.net, self.split, self.s, self.x = net, split, s, x
        self.dev, self.bf16, self.progress = where.device, where.bf16, where.progress
        ids = sorted(set(classes.tolist()))
        self.class_ids, self.n_classes = ids, len(ids)
        lookup = {c: i for i, c in enumerate(ids)}
        self.y = torch.tensor([lookup[int(c)] for c in classes]).to(self.dev)
        for p in net.parameters():
            p.requires_grad_(False)
        for m in [split.suffix, net.head]:
            for p in m.parameters():
                p.requires_grad_(True)
        freeze_batchnorm(split.suffix)
        self.loss_fn = make_loss(
            s.loss, self.n_classes, net.projection_dim, s.scale, s.margin, s.label_smoothing
        )
        self.loss_fn.to(self.dev)  # before the optimizer and the EMA copy are made
        suffix_params = [p for p in split.suffix.parameters() if p.requires_grad]
        head_lr = s.lr * s.head_lr_mult
        self.opt = torch.optim.AdamW(
            [
                {"params": suffix_params, "lr": s.lr},
                {"params": list(net.head.parameters()), "lr": head_lr},
                {"params": list(self.loss_fn.parameters()), "lr": head_lr, "weight_decay": 0.0},
            ],
            lr=s.lr,
            weight_decay=s.weight_decay,
        )
        classifier = s.loss in CLASSIFIER_LOSSES
        y = self.y.tolist()
        self.sampler = None if classifier else BalancedBatches(y, s.per_class, s.batch_size, s.seed)
        self.steps = len(self.sampler) if self.sampler else max(1, len(y) // s.batch_size)
        self.sched, self.ema = schedule_and_ema(self.opt, net, s, self.steps)
        self.evaluated = self.ema.module if self.ema is not None else net
        self.eval_suffix = cut(self.evaluated.backbone, len(split.trained)).suffix
        self.parts: dict[str, object] = {
            "model": net,
            "loss": self.loss_fn,
            "optimizer": self.opt,
            "scheduler": self.sched,
        }
        if self.ema is not None:
            self.parts["ema"] = self.ema

    def class_weights(self) -> dict[str, dict] | None:
        """The loss's class weights with their class ids, as the checkpoint keeps them beside the network
        (eval/class_cosine.py); None for a loss without them."""
        w = class_weights(self.loss_fn)
        if w is None:
            return None
        if self.net.with_features:  # the embedding carries the features after the projection: zeros there
            w = torch.cat([w, w.new_zeros(len(w), self.net.backbone_dim)], dim=1)
        return {
            CLASS_WEIGHTS_FILE: {"weights": w, "class_ids": torch.tensor(self.class_ids, dtype=torch.int64)}
        }

    def timed(self, first: int, last: int) -> Callable[[int], dict]:
        """`train_epoch` for `fit`: an epoch's loss and speed, and the ETA of epochs first..last."""
        t_start = time.perf_counter()

        def train_epoch(epoch: int) -> dict:
            metrics = self.epoch(epoch, last)
            done = epoch - first + 1
            metrics["eta_seconds"] = (time.perf_counter() - t_start) / done * (last - epoch)
            return metrics

        return train_epoch

    def epoch(self, epoch: int, last: int) -> dict:
        s, net, steps = self.s, self.net, self.steps
        net.train()
        freeze_batchnorm(net)
        g = torch.Generator().manual_seed(s.seed * 1_000_003 + epoch)
        n_views = self.x.shape[1]
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
            batches = [torch.tensor(b) for b in self.sampler]
        else:
            order = torch.randperm(len(self.y), generator=g)
            batches = [order[i * s.batch_size : (i + 1) * s.batch_size] for i in range(steps)]
        t0, losses, seen = time.perf_counter(), [], 0
        with Progress(steps * s.batch_size, f"epoch {epoch}/{last}", "img", self.progress) as bar:
            for i, b in enumerate(batches):
                views = torch.randint(n_views, (len(b),), generator=g)
                x = (
                    self.x[b, views]
                    .to(self.dev, non_blocking=True)
                    .contiguous(memory_format=torch.channels_last)
                )
                with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.bf16):
                    emb = net.project(self.split.suffix(x))
                value = self.loss_fn(emb.float(), self.y[b])
                self.opt.zero_grad(set_to_none=True)
                value.backward()
                self.opt.step()
                step = (epoch - 1) * steps + i + 1
                self.sched.step_update(step)
                if self.ema is not None:
                    self.ema.update(net, step=step)
                losses.append(value.item())
                seen += len(b)
                bar.update(len(b), loss=f"{np.mean(losses[-20:]):.3f}")
        seconds = time.perf_counter() - t0
        return {"loss": mean_loss(losses), "images_per_second": seen / seconds, "seconds": seconds}


REFIT_DIR = "refit"


def refit(
    run: Run,
    s: TrainSettings,
    settings: dict,
    baseline: float,
    train: tuple[torch.Tensor, np.ndarray],
    held: tuple[torch.Tensor, np.ndarray, np.ndarray],
    test_prep: Preprocessing,
    where: Placement,
) -> dict:
    """Train again from the same start on the training and the held-out images together, for the epochs the
    held-out images picked (the same schedule, stopped there: scikit-learn's `refit`), and make that network
    the checkpoint's best.safetensors. Its own run folder (out/refit) resumes like any other."""
    epochs = run.best[0]
    x_held, c_held, ok_held = held
    good = torch.from_numpy(np.flatnonzero(ok_held))
    x = torch.cat([train[0], x_held[good]])
    classes = np.concatenate([train[1], c_held[ok_held]])
    base = load_backbone(s.backbone, s.weights)
    torch.manual_seed(s.seed)  # the network starts where the first run's did
    net = EmbeddingNet(base.model, base.dim, s.embed_dim, with_features=s.with_features).to(where.device)
    split = cut(net.backbone, resolve_trained(base.model, s.train_blocks))
    phase = Phase(net, split, s, x, classes, where)
    folder = run.out / REFIT_DIR
    refit_settings = {**settings, "refit_epochs": epochs, "validation": "none (refit on every image)"}
    resume = (folder / ckpt.INFO_FILE).is_file() and (folder / ckpt.STATE_FILE).is_file()
    state = prepare_out(folder, refit_settings, resume=resume, overwrite=not resume)
    refit_run = network_run(
        folder,
        net,
        s.backbone,
        base.weights,
        test_prep.to_dict(),
        "partial",
        refit_settings,
        baseline,
        phase.parts,
    )
    refit_run.resume_from(state)
    log.info(
        "refit: training again on %d images (%d held out before) for the %d epochs they picked",
        len(classes),
        int(ok_held.sum()),
        epochs,
    )
    t0 = time.perf_counter()

    def report(entry: dict, _improved: bool) -> None:
        log.info(
            "refit epoch %d/%d: loss %.4f, %.0f images/s, ETA %.0f s",
            entry["epoch"],
            epochs,
            entry["loss"],
            entry["images_per_second"],
            entry["eta_seconds"],
        )

    fit(
        refit_run,
        epochs,
        phase.timed(refit_run.start, epochs),
        None,
        on_improved=lambda _epoch: None,
        checkpoint=lambda epoch, _improved: refit_run.deliver(epoch, phase.evaluated.state_dict(), None),
        report=report,
    )
    summary = {
        "epochs": epochs,
        "images": len(classes),
        "seconds": round(time.perf_counter() - t0, 1),
        "history": refit_run.history,
    }
    run.deliver_best(phase.evaluated.state_dict(), {"refit": summary})
    return summary
