"""Full fine-tune: backbone + projection head on images, with a metric-learning loss."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from carsearch import defaults
from carsearch.datasets import read_dataset
from carsearch.embed.encoder import resolve_device, resolve_precision
from carsearch.errors import CarsearchError
from carsearch.models import EmbeddingNet, load_backbone
from carsearch.models import checkpoint as ckpt
from carsearch.models.network import freeze_batchnorm, set_backbone_trainable
from carsearch.progress import Progress
from carsearch.provenance import library_versions
from carsearch.train.data import BalancedBatches, TrainImages, collate, split_classes
from carsearch.train.loop import Run, fit, lr_lambda, mean_loss
from carsearch.train.losses import make_loss
from carsearch.train.state import TrainResult, prepare_out
from carsearch.train.validation import ImageValidation, require_validation

log = logging.getLogger(__name__)


def train_model(
    data_dir: str | Path,
    out: str | Path,
    *,
    backbone: str = defaults.TRAIN_BACKBONE,
    weights: str = defaults.WEIGHTS,
    classes: str | None = None,
    val_classes: str | None = None,
    epochs: int = defaults.EPOCHS,
    loss: str = defaults.LOSS,
    embed_dim: int | None = defaults.EMBED_DIM,
    batch_size: int = defaults.TRAIN_BATCH,
    per_class: int = defaults.PER_CLASS,
    lr: float = defaults.LR,
    weight_decay: float = defaults.WEIGHT_DECAY,
    freeze_epochs: int = defaults.FREEZE_EPOCHS,
    warmup_epochs: int = defaults.WARMUP_EPOCHS,
    image_size: int | None = None,
    crop: str = defaults.CROP,
    device: str = defaults.DEVICE,
    precision: str = defaults.PRECISION,
    workers: int | None = None,
    val_images: int = defaults.VAL_IMAGES,
    train_fraction: float = defaults.TRAIN_FRACTION,
    seed: int = defaults.SEED,
    resume: bool = False,
    overwrite: bool = False,
    format: str = "auto",
    labels_file: str | Path | None = None,
    split: str = "all",
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Fine-tune backbone + projection head with a metric-learning loss; checkpoint into `out`.

    `on_epoch(history_entry)` is called after each epoch's checkpoint is on disk."""
    if epochs < 1 or batch_size < 2 or per_class < 2:
        raise CarsearchError(
            "--epochs must be >= 1, --batch-size and --per-class >= 2 (positives per class)."
        )
    out = Path(out).expanduser().resolve()
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    dataset = read_dataset(data_dir, format, labels_file=labels_file, split=split)
    if not dataset.labeled:
        raise CarsearchError(f"{dataset.root} has no class labels; training needs labelled images.")
    class_ids = np.array([r.class_id for r in dataset.records])
    tmask, vmask, how = split_classes(class_ids, classes, val_classes, seed, train_fraction)
    base = load_backbone(backbone, weights)
    prep = base.preprocessing.with_crop(crop)
    if image_size:
        prep = replace(
            prep, size=image_size, resize=max(image_size, round(image_size * prep.resize / prep.size))
        )
    settings = {
        "mode": "full",
        "backbone": backbone,
        "weights": base.weights.id,
        "weights_sha256": base.weights.sha256,
        "embed_dim": embed_dim,
        "loss": loss,
        "classes": classes,
        "val_classes": val_classes,
        "crop": crop,
        "image_size": image_size,
        "batch_size": batch_size,
        "per_class": per_class,
        "lr": lr,
        "seed": seed,
        "data": dataset.records_sha256(),
        "train_fraction": train_fraction,
        "epochs": epochs,
        "freeze_epochs": freeze_epochs,
        "warmup_epochs": warmup_epochs,
        "weight_decay": weight_decay,
        "precision": prec,
        "data_root": str(dataset.root),
        "validation": how,
    }
    state = prepare_out(out, settings, resume, overwrite)

    torch.manual_seed(seed)
    net = EmbeddingNet(base.model, base.dim, embed_dim).to(dev, memory_format=torch.channels_last)
    train_idx = np.flatnonzero(tmask)
    train_classes = sorted(set(class_ids[train_idx].tolist()))
    target = {c: i for i, c in enumerate(train_classes)}
    loss_fn = make_loss(loss, len(train_classes), net.dim).to(dev)
    records = [dataset.records[i] for i in train_idx]
    targets = [target[int(class_ids[i])] for i in train_idx]
    sampler = BalancedBatches(targets, per_class, batch_size, seed)
    workers = defaults.default_workers() if workers is None else workers
    loader = DataLoader(
        TrainImages(dataset.root, records, targets, prep),
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=workers > 0,
        pin_memory=dev.type == "cuda",
    )
    val_idx = np.flatnonzero(vmask)
    if len(val_idx) > val_images:
        val_idx = np.sort(np.random.default_rng(seed).choice(val_idx, val_images, replace=False))
    val = ImageValidation(
        dataset.root, [dataset.records[i] for i in val_idx], class_ids[val_idx].tolist(), prep
    )
    require_validation(len(val), how)

    backbone_params = [
        p
        for m in net.backbone.modules()
        if not isinstance(m, nn.modules.batchnorm._BatchNorm)
        for p in m.parameters(recurse=False)
    ]
    opt = torch.optim.AdamW(
        [
            {"params": backbone_params, "lr": lr},
            {"params": list(net.head.parameters()), "lr": lr * defaults.HEAD_LR_MULT},
            # Proxies start random and must move fast (Proxy-Anchor trains them at 100x the network's rate).
            {"params": list(loss_fn.parameters()), "lr": lr * defaults.PROXY_LR_MULT, "weight_decay": 0.0},
        ],
        lr=lr,
        weight_decay=weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(epochs * len(sampler), warmup_epochs * len(sampler))
    )
    baseline = val.recall(net.backbone, base.dim, dev, prec)
    run = Run(
        out,
        {
            **ckpt.architecture(net, backbone),
            "base_weights": {"id": base.weights.id, "sha256": base.weights.sha256},
            "dim": net.dim,
            "preprocessing": prep.to_dict(),
            "mode": "full",
            "training": settings,
            "baseline_recall_at_1": baseline,
            "versions": library_versions(),
        },
        {"model": net, "loss": loss_fn, "optimizer": opt, "scheduler": sched},
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
        t0, seen, losses = time.perf_counter(), 0, []
        with Progress(
            len(sampler) * sampler.p * sampler.k, f"epoch {epoch}/{epochs}", "img", progress
        ) as bar:
            for pixels, y in loader:
                if len(y) < 2:
                    continue
                x = prep.normalize(pixels.to(dev, non_blocking=True))
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                    emb = net(x)
                value = loss_fn(emb.float(), y.to(dev))
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                sched.step()
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

    fit(
        run,
        epochs,
        train_epoch,
        lambda: val.recall(net, net.dim, dev, prec),
        on_improved=lambda _epoch: None,
        # Every epoch: the network as it is, and as best.safetensors when it is the best so far.
        checkpoint=lambda epoch, improved: run.deliver(
            epoch, net.state_dict(), net.state_dict() if improved else None
        ),
        report=report,
        on_epoch=on_epoch,
    )
    return TrainResult(
        str(out),
        "full",
        backbone,
        net.dim,
        epochs,
        run.best[0],
        run.best[1],
        baseline,
        run.history,
        str(dev),
        prec,
    )
