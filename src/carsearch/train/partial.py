"""Partial fine-tuning on cached activations: the last stages of a backbone + a projection, on a CPU.

The network is cut at a stage boundary (models/cut.py). The frozen prefix runs once per training image and
view (train/activations.py); every epoch trains only the suffix, the projection head and the loss's class
weights, on one randomly chosen cached view of each training image. Validation, the best epoch and the
collection's own embeddings all come from cached activations, so no photo is decoded twice. The checkpoint
is the whole network (prefix and trained suffix), loaded by `embed --weights CKPT_DIR` like any other.

Recipe pieces come from libraries: timm's warm-up cosine schedule (CosineLRScheduler, per step) and EMA of
weights (ModelEmaV3); losses from train/losses.py (pytorch-metric-learning's, or a cosine classifier).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from carsearch import defaults
from carsearch.embed.encoder import resolve_device, resolve_precision
from carsearch.errors import CarsearchError
from carsearch.models import EmbeddingNet, Preprocessing, load_backbone
from carsearch.models import checkpoint as ckpt
from carsearch.models.cut import cut, resolve_trained
from carsearch.train.activations import ActivationCache, Group, Prefix, cache_key
from carsearch.train.data import framings, split_classes
from carsearch.train.loop import fit, network_run
from carsearch.train.phase import Phase, Placement, refit
from carsearch.train.settings import MIRROR, PLAIN, TrainSettings
from carsearch.train.state import TrainResult, prepare_out
from carsearch.train.validation import recall_at_1, require_validation

log = logging.getLogger(__name__)

CACHE_DIR = "activations"


@dataclass(frozen=True)
class Collection:
    """Labelled images to train on: paths relative to `root`, class ids (n,) int64, and what identifies
    the set (`data`: a sha256 of the records)."""

    root: Path
    paths: tuple[str, ...]
    class_ids: np.ndarray
    data: str


@dataclass
class PartialRun:
    """What `train_partial` returns: the run's result, and (with `embed_all`) every image's embedding."""

    result: TrainResult
    embeddings: np.ndarray | None  # (n, dim) float32, L2-normalised, rows in the collection's order
    ok: np.ndarray | None  # (n,) bool: the image decoded (rows of False are zeros)
    weights_sha256: str | None
    # With a refit: every image's embedding by the network the held-out images picked, before the refit
    # trained on them (what the open-set threshold is calibrated on). Else None.
    calibration: np.ndarray | None = None


def train_partial(
    data: Collection,
    out: str | Path,
    s: TrainSettings,
    *,
    cache_dir: str | Path | None = None,
    flip: bool = False,
    embed_all: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
) -> PartialRun:
    """Train the last `s.train_blocks` stages of `s.backbone` + an `s.embed_dim` projection on `data`.

    `flip`: embeddings average the image's and its mirror's (as `embed --flip`). `embed_all`: also return
    every image's embedding by the best checkpoint, from the cache. With `s.refit` (and held-out images of
    the training classes as validation) the delivered network is trained again on every image for the
    epochs validation picked (`train/phase.py`'s `refit`). Raises CarsearchError for unlabelled
    data, a backbone that cannot be cut, or a validation set of fewer than two images."""
    if s.mode != "partial":
        raise CarsearchError(f"train_partial runs mode 'partial', not {s.mode!r}.")
    out = Path(out).expanduser().resolve()
    dev = resolve_device(s.device)
    prec = resolve_precision(s.precision, dev)
    bf16 = prec == "bf16"
    if (data.class_ids < 0).any():
        raise CarsearchError(f"{data.root}: every image needs a class label to train on.")
    tmask, vmask, how = split_classes(data.class_ids, s.classes, s.val_classes, s.seed, s.train_fraction)
    val_idx = np.flatnonzero(vmask)
    if not embed_all and len(val_idx) > s.val_images:
        val_idx = np.sort(np.random.default_rng(s.seed).choice(val_idx, s.val_images, replace=False))
    require_validation(len(val_idx), how)
    train_idx = np.flatnonzero(tmask)

    base = load_backbone(s.backbone, s.weights)
    prep, test_prep = framings(base.preprocessing, s.crop, s.image_size, s.test_image_size)
    trained = resolve_trained(base.model, s.train_blocks)
    torch.manual_seed(s.seed)
    # On the training device from the start: the frozen prefix that fills the cache is part of it. The
    # cached activations stay in host memory and go over batch by batch.
    net = EmbeddingNet(base.model, base.dim, s.embed_dim, with_features=s.with_features).to(dev)
    split = cut(net.backbone, trained)
    settings = {
        **s.to_dict(),
        "weights": base.weights.id,
        "weights_sha256": base.weights.sha256,
        "train_blocks": ",".join(split.trained),
        "precision": prec,
        "data": data.data,
        "data_root": str(data.root),
        "validation": how,
        "flip": flip,
    }
    state = prepare_out(out, settings, resume, overwrite)

    # --- the cache: training images with every view; the others with the plain view (and its mirror).
    # With a test size of its own, a second cache (inside the first) holds every image's plain view(s) at
    # that size: validation and the collection's embeddings use it, training the first.
    key = lambda p: cache_key(s.backbone, base.weights.sha256, split.trained, p, s.seed, bf16)  # noqa: E731
    cache = ActivationCache(Path(cache_dir) if cache_dir else out / CACHE_DIR, key(prep))
    cache.prepare()
    test_cache = cache
    if test_prep != prep:
        test_cache = ActivationCache(cache.folder / f"test-{test_prep.size}px", key(test_prep))
        test_cache.prepare()
    workers = defaults.default_workers() if s.workers is None else s.workers
    plain_views = (PLAIN, MIRROR) if flip else (PLAIN,)
    other_idx = np.flatnonzero(~tmask) if embed_all else val_idx
    t_cache = time.perf_counter()

    def load(c: ActivationCache, framing: Preprocessing, name: str, rows: np.ndarray, views: tuple[str, ...]):
        prefix = Prefix(split.prefix, framing, dev, bf16, workers)
        return c.load(Group(name, tuple(data.paths[i] for i in rows), views), data.root, prefix, progress)

    x_train, ok_train = load(cache, prep, "train", train_idx, s.views())
    x_other, ok_other = load(test_cache, test_prep, "other", other_idx, plain_views)
    # The training images as the gallery (validation) and as part of the collection: plain view(s).
    if test_cache is cache:
        g_train = x_train[:, : len(plain_views)]
    else:
        g_train, ok_g = load(test_cache, test_prep, "train", train_idx, plain_views)
        ok_train &= ok_g
    cache_seconds = time.perf_counter() - t_cache

    keep = np.flatnonzero(ok_train)
    x_train, g_train = x_train[torch.from_numpy(keep)], g_train[torch.from_numpy(keep)]
    c_train = data.class_ids[train_idx[keep]]
    val_pos = np.flatnonzero(np.isin(other_idx, val_idx) & ok_other)
    x_val, c_val = x_other[torch.from_numpy(val_pos)], data.class_ids[other_idx[val_pos]]
    require_validation(len(val_pos), how)
    where = Placement(dev, bf16, progress)
    phase = Phase(net, split, s, x_train, c_train, where)

    # Validation as the product is used: held-out images classified by the weighted kNN vote over the
    # training images (which become the gallery). With validation classes of their own (zero-shot), there
    # is no gallery of them: Recall@1 among the held-out images.
    metric = "knn_top1" if set(c_val.tolist()) <= set(c_train.tolist()) else "recall@1"

    def score(model: EmbeddingNet, suffix: nn.Module, head: bool = True) -> float:
        q = embed_cached(model, suffix, x_val, bf16, head=head)
        if metric == "recall@1":
            return recall_at_1(q, c_val)
        g = embed_cached(model, suffix, g_train, bf16, head=head)
        return knn_top1(g, c_train, q, c_val)

    baseline = score(net, split.suffix, head=False)
    run = network_run(
        out, net, s.backbone, base.weights, test_prep.to_dict(), "partial", settings, baseline, phase.parts
    )
    run.resume_from(state)
    log.info(
        "partial: training %s + head on %d images x %d cached views (%d classes); validation on %d images "
        "(%s); frozen features Recall@1 %.3f; caching took %.0f s",
        ", ".join(split.trained),
        len(c_train),
        len(s.views()),
        phase.n_classes,
        len(val_pos),
        how,
        baseline,
        cache_seconds,
    )

    def report(entry: dict, improved: bool) -> None:
        log.info(
            "epoch %d/%d: loss %.4f, validation %s %.3f%s, %.0f images/s, ETA %.0f s",
            entry["epoch"],
            s.epochs,
            entry["loss"],
            metric,
            entry[metric],
            " (best)" if improved else "",
            entry["images_per_second"],
            entry["eta_seconds"],
        )

    fit(
        run,
        s.epochs,
        phase.timed(run.start, s.epochs),
        lambda: score(phase.evaluated, phase.eval_suffix),
        on_improved=lambda _epoch: None,
        checkpoint=lambda epoch, improved: run.deliver(
            epoch,
            phase.evaluated.state_dict(),
            phase.evaluated.state_dict() if improved else None,
            phase.class_weights(),
        ),
        report=report,
        on_epoch=on_epoch,
        metric=metric,
    )
    result = TrainResult.of_run(
        run,
        "partial",
        s.backbone,
        net.dim,
        s.epochs,
        baseline,
        device=str(dev),
        precision=prec,
        validation_metric=metric,
    )

    def embed_collection(model: EmbeddingNet) -> tuple[np.ndarray, np.ndarray]:
        """Every image's embedding (rows of images that failed to decode are zeros) and the ok mask."""
        suffix = cut(model.backbone, trained).suffix
        vectors = np.zeros((len(data.paths), model.dim), np.float32)
        vectors[train_idx[keep]] = embed_cached(model, suffix, g_train, bf16)
        good_other = np.flatnonzero(ok_other)
        vectors[other_idx[good_other]] = embed_cached(
            model, suffix, x_other[torch.from_numpy(good_other)], bf16
        )
        ok = np.zeros(len(data.paths), bool)
        ok[train_idx[keep]] = True
        ok[other_idx[good_other]] = True
        return vectors, ok

    calibration = None
    if s.refit and metric == "knn_top1":
        if embed_all:  # the held-out images' embeddings by a network that never saw them
            calibration = embed_collection(ckpt.load_checkpoint(out, s.backbone).model)[0]
        held = np.flatnonzero(vmask)
        x_held, ok_held = load(cache, prep, "held-out", held, s.views())
        result.refit = refit(
            run,
            s,
            settings,
            baseline,
            (x_train, c_train),
            (x_held, data.class_ids[held], ok_held),
            test_prep,
            where,
        )
    elif s.refit:
        log.info("refit: not done (validation on classes of their own: no held-out images to add).")
    best = ckpt.load_checkpoint(out, s.backbone)
    if not embed_all:
        return PartialRun(result, None, None, best.weights.sha256)
    vectors, ok = embed_collection(best.model)
    return PartialRun(result, vectors, ok, best.weights.sha256, calibration)


def knn_top1(gallery: np.ndarray, g_classes: np.ndarray, queries: np.ndarray, q_classes: np.ndarray) -> float:
    """Top-1 of the weighted kNN vote (k=20, T=0.07: the classifier's) of L2-normalised `queries` (m, d)
    against `gallery` (n, d) float32, exact inner product."""
    from carsearch.eval.knn import knn_metrics
    from carsearch.eval.neighbors import exact_search

    k = min(defaults.K_VOTE, len(gallery))
    sims, rows = exact_search(gallery, np.arange(len(gallery)), np.ascontiguousarray(queries, np.float32), k)
    # The vote works on label strings.
    return knn_metrics(np.asarray(g_classes).astype(str), np.asarray(q_classes).astype(str), sims, rows)[
        "top1"
    ]


@torch.inference_mode()
def embed_cached(
    net: EmbeddingNet, suffix: nn.Module, x: torch.Tensor, bf16: bool, head: bool = True, batch: int = 256
) -> np.ndarray:
    """Embeddings (n, dim) float32, L2-normalised, from cached activations (n, views, C, H, W): the view 0
    embedding, plus the view 1 one when two views are given (test-time flip), as `Encoder.encode` does."""
    was = net.training
    net.eval()
    device = next(net.parameters()).device  # the cache stays on the CPU; each batch goes to the network
    normalize = nn.functional.normalize
    out = []
    for i in range(0, len(x), batch):
        chunk = x[i : i + batch]
        y = None
        for v in range(min(2, chunk.shape[1])):
            a = chunk[:, v].to(device).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                f = suffix(a if bf16 else a.float())
                f = net.embed(f) if head else f
                f = normalize(f.float(), dim=1)
            y = f if y is None else y + f
        out.append(normalize(y, dim=1).cpu().numpy())
    net.train(was)
    dim = net.dim if head else net.backbone_dim
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)
