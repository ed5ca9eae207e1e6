"""Training loops: full fine-tune of backbone + head on images, or a projection head on cached embeddings.

Every epoch ends with a validation Recall@1 (held-out classes when there are any, held-out images
otherwise) and an atomic checkpoint; the best epoch is kept as best.safetensors; --resume continues
from train_state.pt (model, optimizer, schedule, proxies, epoch, RNG).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from carsearch.bench.protocols import class_range, retrieval_recall
from carsearch.datasets import read_dataset
from carsearch.embed.backbones import load_backbone
from carsearch.embed.encoder import resolve_device, resolve_precision
from carsearch.embed.job import default_workers
from carsearch.errors import CarsearchError
from carsearch.progress import Progress
from carsearch.provenance import library_versions
from carsearch.train import checkpoint as ckpt
from carsearch.train.data import BalancedBatches, TrainImages, collate
from carsearch.train.losses import make_loss
from carsearch.train.model import EmbeddingNet, freeze_batchnorm, set_backbone_trainable

log = logging.getLogger(__name__)

# Settings that must match for --resume to continue a run (the rest may change, e.g. --epochs).
RESUME_FIELDS = (
    "mode",
    "backbone",
    "weights",
    "weights_sha256",
    "embed_dim",
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

    def to_json(self) -> dict:
        return asdict(self)


def recall_at_1(vectors: np.ndarray, classes: np.ndarray) -> float:
    """Each vector queries all others (exact cosine); share whose nearest has the same class."""
    if len(vectors) < 2:
        return float("nan")
    x = np.ascontiguousarray(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), dtype=np.float32)
    return retrieval_recall(x, np.asarray(classes), (1,))["recall@1"]


def _lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _split_classes(
    class_ids: np.ndarray,
    classes: str | None,
    val_classes: str | None,
    seed: int,
    train_fraction: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, str]:
    """(train mask, validation mask, how).

    Training uses the images of `classes` (all classes by default), or with train_fraction < 1 only that
    share of each (the stratified split `carsearch bench --gallery-fraction` makes with the same seed).
    Validation uses `val_classes` when given; else the held-out images of the training classes when
    train_fraction < 1; else the remaining classes; else 20% of the training classes' images."""
    from carsearch.bench.protocols import stratified_split

    present = set(np.unique(class_ids).tolist()) - {-1}
    train = class_range(classes) & present if classes else present
    if not train:
        raise CarsearchError(f"no images of the classes {classes!r} in this dataset.")
    member = np.isin(class_ids, sorted(train))
    val = class_range(val_classes) & present if val_classes else set()
    if val & train:
        raise CarsearchError("--classes and --val-classes overlap; validation needs other classes.")

    def held_out(fraction: float) -> tuple[np.ndarray, np.ndarray]:
        gal, qry = stratified_split(class_ids, fraction, seed)
        tmask, hmask = np.zeros(len(class_ids), bool), np.zeros(len(class_ids), bool)
        tmask[gal], hmask[qry] = member[gal], member[qry]
        return tmask, hmask

    if train_fraction < 1:
        tmask, hmask = held_out(train_fraction)
        if val:
            return tmask, np.isin(class_ids, sorted(val)), "held-out classes"
        return tmask, hmask, f"held-out images of the training classes ({1 - train_fraction:.0%})"
    if not val:
        val = present - train
    if val:
        return member, np.isin(class_ids, sorted(val)), "held-out classes"
    tmask, hmask = held_out(0.8)
    return tmask, hmask, "held-out images of the training classes (20%)"


def _prepare_out(out: Path, settings: dict, resume: bool, overwrite: bool) -> dict | None:
    """The saved training state to resume from, or None for a fresh run; refuses to clobber by accident."""
    out.mkdir(parents=True, exist_ok=True)
    exists = (out / ckpt.INFO_FILE).is_file()
    if resume:
        if not exists:
            raise CarsearchError(f"{out} holds no checkpoint to resume; start without --resume.")
        old = ckpt.read_info(out)["training"]
        for name in RESUME_FIELDS:
            if old.get(name) != settings.get(name):
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


def _save_epoch(
    out: Path,
    net: EmbeddingNet,
    loss_fn: nn.Module,
    opt,
    sched,
    epoch: int,
    history: list[dict],
    best: tuple[int, float],
    improved: bool,
    info: dict,
) -> None:
    # Order: the resume state first (it alone restores a run), the deliverables next, the description
    # last (it records their sha256s), so a crash at any point leaves a resumable folder.
    ckpt.save_state(
        out,
        {
            "epoch": epoch,
            "model": net.state_dict(),
            "loss": loss_fn.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "best_epoch": best[0],
            "best_recall": best[1],
            "rng": torch.get_rng_state(),
            "history": history,
        },
    )
    files = dict(info.get("files", {}))
    files[ckpt.MODEL_FILE] = ckpt.save_model(out, net)
    if improved:
        files[ckpt.BEST_FILE] = ckpt.save_model(out, net, ckpt.BEST_FILE)
    info.update(
        {
            "epoch": epoch,
            "best_epoch": best[0],
            "best_recall_at_1": best[1],
            "history": history,
            "files": files,
        }
    )
    ckpt.save_info(out, info)


def _restore(state: dict, **parts: object) -> tuple[list[dict], tuple[int, float], int]:
    """Load each part's state from a saved training state; returns (history, best, first epoch to run)."""
    for key, part in parts.items():
        part.load_state_dict(state[key])
    torch.set_rng_state(state["rng"])
    return list(state["history"]), (state["best_epoch"], state["best_recall"]), state["epoch"] + 1


def _embed_arrays(
    net: nn.Module, prep, arrays: np.ndarray, device: torch.device, bf16: bool, batch: int = 64
) -> np.ndarray:
    net.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(arrays), batch):
            x = prep.normalize(torch.from_numpy(arrays[i : i + batch]).to(device))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out.append(torch.nn.functional.normalize(net(x).float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def train_model(
    data_dir: str | Path,
    out: str | Path,
    *,
    backbone: str = "efficientnet_lite0",
    weights: str = "imagenet",
    classes: str | None = None,
    val_classes: str | None = None,
    epochs: int = 10,
    loss: str = "proxy-anchor",
    embed_dim: int | None = 512,
    batch_size: int = 32,
    per_class: int = 4,
    lr: float = 1e-4,
    weight_decay: float = 1e-4,
    freeze_epochs: int = 1,
    warmup_epochs: int = 1,
    image_size: int | None = None,
    crop: str = "squash",
    device: str = "auto",
    precision: str = "auto",
    workers: int | None = None,
    val_images: int = 3000,
    train_fraction: float = 1.0,
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    format: str = "auto",
    labels_file: str | Path | None = None,
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
    dataset = read_dataset(data_dir, format, labels_file=labels_file)
    if not dataset.labeled:
        raise CarsearchError(f"{dataset.root} has no class labels; training needs labelled images.")
    class_ids = np.array([r.class_id for r in dataset.records])
    if not 0 < train_fraction <= 1:
        raise CarsearchError("--train-fraction must be in (0, 1].")
    tmask, vmask, how = _split_classes(class_ids, classes, val_classes, seed, train_fraction)
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
    state = _prepare_out(out, settings, resume, overwrite)

    torch.manual_seed(seed)
    net = EmbeddingNet(base.model, base.dim, embed_dim).to(dev, memory_format=torch.channels_last)
    train_idx = np.flatnonzero(tmask)
    train_classes = sorted(set(class_ids[train_idx].tolist()))
    target = {c: i for i, c in enumerate(train_classes)}
    loss_fn = make_loss(loss, len(train_classes), net.dim).to(dev)
    records = [dataset.records[i] for i in train_idx]
    targets = [target[int(class_ids[i])] for i in train_idx]
    sampler = BalancedBatches(targets, per_class, batch_size, seed)
    workers = default_workers() if workers is None else workers
    loader = DataLoader(
        TrainImages(dataset.root, records, targets, prep),
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=workers > 0,
        pin_memory=dev.type == "cuda",
    )
    # Validation images: decoded and framed once, kept as uint8 arrays.
    val_idx = np.flatnonzero(vmask)
    if len(val_idx) > val_images:
        val_idx = np.sort(np.random.default_rng(seed).choice(val_idx, val_images, replace=False))
    val_ds = TrainImages(
        dataset.root, [dataset.records[i] for i in val_idx], class_ids[val_idx].tolist(), prep, augment=False
    )
    val_items = [val_ds[i] for i in range(len(val_ds))]
    val_arrays = np.stack([a for a, _ in val_items if a is not None])
    val_classes_arr = np.array([t for a, t in val_items if a is not None])

    backbone_params = [
        p
        for m in net.backbone.modules()
        if not isinstance(m, nn.modules.batchnorm._BatchNorm)
        for p in m.parameters(recurse=False)
    ]
    opt = torch.optim.AdamW(
        [
            {"params": backbone_params, "lr": lr},
            {"params": list(net.head.parameters()), "lr": lr * 10},
            # Proxies start random and must move fast (Proxy-Anchor trains them at 100x the network's rate).
            {"params": list(loss_fn.parameters()), "lr": lr * 100, "weight_decay": 0.0},
        ],
        lr=lr,
        weight_decay=weight_decay,
    )
    steps = epochs * len(sampler)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, warmup_epochs * len(sampler)))
    bf16 = prec == "bf16"
    baseline = recall_at_1(_embed_arrays(net.backbone, prep, val_arrays, dev, bf16), val_classes_arr)
    history: list[dict] = []
    best = (0, -1.0)
    start = 1
    if state is not None:
        history, best, start = _restore(state, model=net, loss=loss_fn, optimizer=opt, scheduler=sched)
        log.info(
            "resuming %s after epoch %d (best Recall@1 %.3f at epoch %d).",
            out,
            state["epoch"],
            best[1],
            best[0],
        )
    info = {
        "backbone": backbone,
        "base_weights": {"id": base.weights.id, "sha256": base.weights.sha256},
        "backbone_dim": base.dim,
        "embed_dim": embed_dim,
        "dim": net.dim,
        "preprocessing": prep.to_dict(),
        "mode": "full",
        "training": settings,
        "baseline_recall_at_1": baseline,
        "versions": library_versions(),
    }
    if state is not None:
        info["files"] = ckpt.read_info(out).get("files", {})
    log.info(
        "train: %d images of %d classes, validation on %d images (%s); frozen features Recall@1 %.3f",
        len(records),
        len(train_classes),
        len(val_arrays),
        how,
        baseline,
    )
    for epoch in range(start, epochs + 1):
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
        r1 = recall_at_1(_embed_arrays(net, prep, val_arrays, dev, bf16), val_classes_arr)
        improved = r1 > best[1]
        if improved:
            best = (epoch, r1)
        history.append(
            {
                "epoch": epoch,
                "loss": float(np.mean(losses)) if losses else float("nan"),
                "recall@1": r1,
                "images_per_second": seen / seconds,
                "seconds": seconds,
                "backbone_frozen": frozen,
            }
        )
        log.info(
            "epoch %d/%d: loss %.4f, validation Recall@1 %.3f%s, %.1f images/s",
            epoch,
            epochs,
            history[-1]["loss"],
            r1,
            " (best)" if improved else "",
            history[-1]["images_per_second"],
        )
        _save_epoch(out, net, loss_fn, opt, sched, epoch, history, best, improved, info)
        if on_epoch is not None:
            on_epoch(history[-1])
    return TrainResult(
        str(out), "full", backbone, net.dim, epochs, best[0], best[1], baseline, history, str(dev), prec
    )


def train_head(
    emb_dir: str | Path,
    out: str | Path,
    *,
    classes: str | None = None,
    val_classes: str | None = None,
    epochs: int = 60,
    loss: str = "proxy-anchor",
    embed_dim: int | None = 512,
    batch_size: int = 256,
    per_class: int = 4,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    train_fraction: float = 1.0,
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """--head-only: train a projection head on cached embeddings (seconds on a CPU); the checkpoint holds
    the embeddings' backbone with its weights plus the head, so `embed --weights CKPT_DIR` works as usual."""
    from carsearch.embed import load_embeddings

    if embed_dim is None:
        raise CarsearchError("--head-only trains a projection: give --embed-dim.")
    out = Path(out).expanduser().resolve()
    emb = load_embeddings(emb_dir)
    if (emb.class_ids < 0).all():
        raise CarsearchError(f"{emb.folder} has no class labels; training needs labelled embeddings.")
    if not 0 < train_fraction <= 1:
        raise CarsearchError("--train-fraction must be in (0, 1].")
    tmask, vmask, how = _split_classes(emb.class_ids, classes, val_classes, seed, train_fraction)
    prov = emb.provenance
    settings = {
        "mode": "head-only",
        "backbone": prov["backbone"],
        "weights": prov["weights"],
        "weights_sha256": prov["weights_sha256"],
        "embed_dim": embed_dim,
        "loss": loss,
        "classes": classes,
        "val_classes": val_classes,
        "crop": prov["preprocessing"]["crop"],
        "image_size": None,
        "batch_size": batch_size,
        "per_class": per_class,
        "lr": lr,
        "seed": seed,
        "data": emb.manifest["dataset"]["records_sha256"],
        "train_fraction": train_fraction,
        "epochs": epochs,
        "weight_decay": weight_decay,
        "embeddings": str(emb.folder),
        "validation": how,
    }
    state = _prepare_out(out, settings, resume, overwrite)
    torch.manual_seed(seed)
    x_train = torch.from_numpy(emb.vectors[tmask])
    train_classes = sorted(set(emb.class_ids[tmask].tolist()))
    lookup = {c: i for i, c in enumerate(train_classes)}
    y_train = torch.tensor([lookup[int(c)] for c in emb.class_ids[tmask]])
    x_val, c_val = emb.vectors[vmask], emb.class_ids[vmask]
    head = nn.Linear(emb.dim, embed_dim)
    nn.init.orthogonal_(head.weight)
    nn.init.zeros_(head.bias)
    loss_fn = make_loss(loss, len(train_classes), embed_dim)
    opt = torch.optim.AdamW(
        [
            {"params": head.parameters(), "lr": lr},
            {"params": loss_fn.parameters(), "lr": lr * 10, "weight_decay": 0.0},
        ],
        weight_decay=weight_decay,
    )
    sampler = BalancedBatches(y_train.tolist(), per_class, batch_size, seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(epochs * len(sampler), len(sampler)))
    baseline = recall_at_1(x_val, c_val)
    history: list[dict] = []
    best, best_head, start = (0, -1.0), None, 1
    if state is not None:
        history, best, start = _restore(state, head=head, loss=loss_fn, optimizer=opt, scheduler=sched)
        best_head = state["best_head"]
    base = load_backbone(prov["backbone"], prov["weights"], prov.get("weights_sha256"))
    info = {
        "backbone": prov["backbone"],
        "base_weights": {"id": prov["weights"], "sha256": prov["weights_sha256"]},
        "backbone_dim": emb.dim,
        "embed_dim": embed_dim,
        "dim": embed_dim,
        "preprocessing": prov["preprocessing"],
        "mode": "head-only",
        "training": settings,
        "baseline_recall_at_1": baseline,
        "versions": library_versions(),
    }
    if state is not None:
        info["files"] = ckpt.read_info(out).get("files", {})
    with Progress(epochs - start + 1, "train head", "epoch", progress, every=10) as bar:
        for epoch in range(start, epochs + 1):
            sampler.set_epoch(epoch)
            t0, losses = time.perf_counter(), []
            head.train()
            for batch in sampler:
                value = loss_fn(head(x_train[batch]), y_train[batch])
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                sched.step()
                losses.append(value.item())
            head.eval()
            with torch.inference_mode():
                r1 = recall_at_1(head(torch.from_numpy(x_val)).numpy(), c_val)
            improved = r1 > best[1]
            if improved:
                best, best_head = (epoch, r1), {k: v.clone() for k, v in head.state_dict().items()}
            history.append(
                {
                    "epoch": epoch,
                    "loss": float(np.mean(losses)),
                    "recall@1": r1,
                    "seconds": time.perf_counter() - t0,
                }
            )
            bar.update(1, loss=f"{history[-1]['loss']:.3f}", r1=f"{r1:.3f}")
            ckpt.save_state(
                out,
                {
                    "epoch": epoch,
                    "head": head.state_dict(),
                    "best_head": best_head,
                    "loss": loss_fn.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "best_epoch": best[0],
                    "best_recall": best[1],
                    "rng": torch.get_rng_state(),
                    "history": history,
                },
            )
    # Deliverables once at the end (each epoch takes milliseconds; the state above makes it resumable).
    net = EmbeddingNet(base.model, base.dim, embed_dim)
    files = {}
    net.head.load_state_dict(head.state_dict())
    files[ckpt.MODEL_FILE] = ckpt.save_model(out, net)
    net.head.load_state_dict(best_head)
    files[ckpt.BEST_FILE] = ckpt.save_model(out, net, ckpt.BEST_FILE)
    info.update(
        {
            "epoch": epochs,
            "best_epoch": best[0],
            "best_recall_at_1": best[1],
            "history": history,
            "files": files,
        }
    )
    ckpt.save_info(out, info)
    log.info(
        "head-only: validation Recall@1 %.3f (frozen features %.3f), best epoch %d",
        best[1],
        baseline,
        best[0],
    )
    return TrainResult(
        str(out), "head-only", prov["backbone"], embed_dim, epochs, best[0], best[1], baseline, history
    )
