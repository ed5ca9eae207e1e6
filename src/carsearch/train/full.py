"""Full fine-tune: backbone + projection head on images, with a metric-learning loss."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from carsearch import defaults
from carsearch.datasets import read_dataset
from carsearch.embed.encoder import resolve_device, resolve_precision
from carsearch.embed.reader import decoding_workers
from carsearch.errors import CarsearchError
from carsearch.models import EmbeddingNet, load_backbone
from carsearch.models.network import freeze_batchnorm, set_backbone_trainable
from carsearch.progress import Progress
from carsearch.train.data import BalancedBatches, TrainImages, collate, framings, split_classes
from carsearch.train.loop import fit, mean_loss, network_run, schedule_and_ema
from carsearch.train.losses import CLASSIFIER_LOSSES, make_loss
from carsearch.train.settings import TrainSettings
from carsearch.train.state import TrainResult, prepare_out
from carsearch.train.validation import ImageValidation, require_validation

log = logging.getLogger(__name__)


def train_model(
    data_dir: str | Path,
    out: str | Path,
    s: TrainSettings,
    *,
    format: str = "auto",
    labels_file: str | Path | None = None,
    split: str = "all",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Fine-tune backbone + projection head on the images of `data_dir` (settings `s`, mode "full");
    checkpoint into `out`. `on_epoch(history_entry)` is called after each epoch's checkpoint is on disk.

    Raises CarsearchError for unlabelled data, an empty class selection or too small a validation set."""
    if s.mode != "full":
        raise CarsearchError(f"train_model runs mode 'full', not {s.mode!r}.")
    out = Path(out).expanduser().resolve()
    dev = resolve_device(s.device)
    prec = resolve_precision(s.precision, dev)
    dataset = read_dataset(data_dir, format, labels_file=labels_file, split=split)
    if not dataset.labeled:
        raise CarsearchError(f"{dataset.root} has no class labels; training needs labelled images.")
    class_ids = np.array([r.class_id for r in dataset.records])
    tmask, vmask, how = split_classes(class_ids, s.classes, s.val_classes, s.seed, s.train_fraction)
    base = load_backbone(s.backbone, s.weights)
    prep, test_prep = framings(base.preprocessing, s.crop, s.image_size, s.test_image_size)
    settings = {
        **s.to_dict(),
        "weights": base.weights.id,
        "weights_sha256": base.weights.sha256,
        "data": dataset.records_sha256(),
        "precision": prec,
        "data_root": str(dataset.root),
        "validation": how,
    }
    state = prepare_out(out, settings, resume, overwrite)

    torch.manual_seed(s.seed)
    net = EmbeddingNet(base.model, base.dim, s.embed_dim, with_features=s.with_features).to(
        dev, memory_format=torch.channels_last
    )
    train_idx = np.flatnonzero(tmask)
    train_classes = sorted(set(class_ids[train_idx].tolist()))
    target = {c: i for i, c in enumerate(train_classes)}
    loss_fn = make_loss(
        s.loss, len(train_classes), net.projection_dim, s.scale, s.margin, s.label_smoothing
    ).to(dev)
    records = [dataset.records[i] for i in train_idx]
    targets = [target[int(class_ids[i])] for i in train_idx]
    sampler = BalancedBatches(targets, s.per_class, s.batch_size, s.seed)
    workers = defaults.default_workers() if s.workers is None else s.workers
    loader = DataLoader(
        TrainImages(dataset.root, records, targets, prep),
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=workers > 0,
        pin_memory=dev.type == "cuda",
    )
    val_idx = np.flatnonzero(vmask)
    if len(val_idx) > s.val_images:
        val_idx = np.sort(np.random.default_rng(s.seed).choice(val_idx, s.val_images, replace=False))
    val = ImageValidation(
        dataset.root, [dataset.records[i] for i in val_idx], class_ids[val_idx].tolist(), test_prep
    )
    require_validation(len(val), how)
    lr, epochs, freeze_epochs = s.lr, s.epochs, s.freeze_epochs
    proxy_mult = s.head_lr_mult if s.loss in CLASSIFIER_LOSSES else defaults.PROXY_LR_MULT

    backbone_params = [
        p
        for m in net.backbone.modules()
        if not isinstance(m, nn.modules.batchnorm._BatchNorm)
        for p in m.parameters(recurse=False)
    ]
    opt = torch.optim.AdamW(
        [
            {"params": backbone_params, "lr": lr},
            {"params": list(net.head.parameters()), "lr": lr * s.head_lr_mult},
            # Proxies start random and must move fast (Proxy-Anchor trains them at 100x the network's rate);
            # a cosine classifier's class weights move with the head.
            {"params": list(loss_fn.parameters()), "lr": lr * proxy_mult, "weight_decay": 0.0},
        ],
        lr=lr,
        weight_decay=s.weight_decay,
    )
    steps = len(sampler)
    sched, ema = schedule_and_ema(opt, net, s, steps)
    evaluated = ema.module if ema is not None else net
    baseline = val.recall(net.backbone, base.dim, dev, prec)
    parts: dict[str, object] = {"model": net, "loss": loss_fn, "optimizer": opt, "scheduler": sched}
    if ema is not None:
        parts["ema"] = ema
    # The checkpoint embeds at the test framing (what `embed --weights` and queries use).
    run = network_run(
        out, net, s.backbone, base.weights, test_prep.to_dict(), "full", settings, baseline, parts
    )
    run.resume_from(state)
    log.info(
        "train: %d images of %d classes, validation on %d images (%s); frozen features Recall@1 %.3f",
        len(records),
        len(train_classes),
        len(val),
        how,
        baseline,
    )
    bf16 = prec == "bf16"

    def train_epoch(epoch: int) -> dict:
        frozen = epoch <= freeze_epochs
        set_backbone_trainable(net, not frozen)
        net.train()
        freeze_batchnorm(net)
        sampler.set_epoch(epoch)
        t0, seen, losses, done = time.perf_counter(), 0, [], 0
        with Progress(
            len(sampler) * sampler.p * sampler.k, f"epoch {epoch}/{epochs}", "img", progress
        ) as bar:
            for pixels, y in loader:
                if len(y) < 2:
                    continue
                x = prep.normalize(pixels.to(dev, non_blocking=True))
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                    emb = net.project(net.backbone(x))  # the loss trains the projection
                value = loss_fn(emb.float(), y.to(dev))
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                step = (epoch - 1) * steps + done + 1
                sched.step_update(step)
                if ema is not None:
                    ema.update(net, step=step)
                done += 1
                losses.append(value.item())
                seen += len(y)
                bar.update(len(y), loss=f"{np.mean(losses[-20:]):.3f}")
        seconds = time.perf_counter() - t0
        return {
            "loss": mean_loss(losses),
            "images_per_second": seen / seconds,
            "seconds": seconds,
            "backbone_frozen": frozen,
        }

    def report(entry: dict, improved: bool) -> None:
        log.info(
            "epoch %d/%d: loss %.4f, validation Recall@1 %.3f%s, %.1f images/s",
            entry["epoch"],
            epochs,
            entry["loss"],
            entry["recall@1"],
            " (best)" if improved else "",
            entry["images_per_second"],
        )

    with decoding_workers("finished epochs are kept: run the same command again with --resume"):
        fit(
            run,
            epochs,
            train_epoch,
            lambda: val.recall(evaluated, net.dim, dev, prec),
            on_improved=lambda _epoch: None,
            # Every epoch: the network as it is, and as best.safetensors when it is the best so far.
            checkpoint=lambda epoch, improved: run.deliver(
                epoch, evaluated.state_dict(), evaluated.state_dict() if improved else None
            ),
            report=report,
            on_epoch=on_epoch,
        )
    return TrainResult.of_run(
        run, "full", s.backbone, net.dim, epochs, baseline, device=str(dev), precision=prec
    )
