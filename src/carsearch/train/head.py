"""Head-only training: a projection head on cached embeddings (seconds on a CPU).

The checkpoint holds the embeddings' network (a registry backbone, or a fine-tuned checkpoint) with the
head stacked on it, applied to the L2-normalised features it was trained on, so `embed --weights CKPT_DIR`
and every later stage work as usual."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from carsearch import defaults
from carsearch.embed.store import load_embeddings
from carsearch.errors import CarsearchError
from carsearch.models import EmbeddingNet, load_backbone
from carsearch.models import checkpoint as ckpt
from carsearch.progress import Progress
from carsearch.provenance import library_versions
from carsearch.train.data import BalancedBatches, split_classes
from carsearch.train.loop import Run, fit, lr_lambda, mean_loss
from carsearch.train.losses import make_loss
from carsearch.train.settings import TrainSettings
from carsearch.train.state import TrainResult, prepare_out
from carsearch.train.validation import recall_at_1, require_validation

log = logging.getLogger(__name__)


def train_head(
    emb_dir: str | Path,
    out: str | Path,
    s: TrainSettings,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """`carsearch train head`: train a projection head on the embeddings of `emb_dir` (settings `s`, mode
    "head": the head preset with the options given); checkpoint into `out`.

    Raises CarsearchError for another mode, no projection (`embed_dim` None), unlabelled embeddings or too
    small a validation set."""
    if s.mode != "head":
        raise CarsearchError(f"train_head runs mode 'head', not {s.mode!r}.")
    if s.embed_dim is None:
        raise CarsearchError("train head trains a projection: give --embed-dim above 0.")
    out = Path(out).expanduser().resolve()
    emb = load_embeddings(emb_dir)
    if (emb.class_ids < 0).all():
        raise CarsearchError(f"{emb.folder} has no class labels; training needs labelled embeddings.")
    tmask, vmask, how = split_classes(emb.class_ids, s.classes, s.val_classes, s.seed, s.train_fraction)
    require_validation(int(vmask.sum()), how)
    prov = emb.provenance
    settings = {
        "mode": "head-only",
        "backbone": prov["backbone"],
        "weights": prov["weights"],
        "weights_sha256": prov["weights_sha256"],
        "embed_dim": s.embed_dim,
        "loss": s.loss,
        "classes": s.classes,
        "val_classes": s.val_classes,
        "crop": prov["preprocessing"]["crop"],
        "image_size": None,
        "batch_size": s.batch_size,
        "per_class": s.per_class,
        "lr": s.lr,
        "seed": s.seed,
        "data": emb.manifest["dataset"]["records_sha256"],
        "train_fraction": s.train_fraction,
        "epochs": s.epochs,
        "weight_decay": s.weight_decay,
        "embeddings": str(emb.folder),
        "validation": how,
    }
    state = prepare_out(out, settings, resume, overwrite)
    torch.manual_seed(s.seed)
    x_train = torch.from_numpy(emb.vectors[tmask])
    train_classes = sorted(set(emb.class_ids[tmask].tolist()))
    lookup = {c: i for i, c in enumerate(train_classes)}
    y_train = torch.tensor([lookup[int(c)] for c in emb.class_ids[tmask]])
    x_val, c_val = emb.vectors[vmask], emb.class_ids[vmask]
    head = nn.Linear(emb.dim, s.embed_dim)
    nn.init.orthogonal_(head.weight)
    nn.init.zeros_(head.bias)
    loss_fn = make_loss(s.loss, len(train_classes), s.embed_dim)
    opt = torch.optim.AdamW(
        [
            {"params": head.parameters(), "lr": s.lr},
            {
                "params": loss_fn.parameters(),
                "lr": s.lr * defaults.HEAD_ONLY_PROXY_LR_MULT,
                "weight_decay": 0.0,
            },
        ],
        weight_decay=s.weight_decay,
    )
    sampler = BalancedBatches(y_train.tolist(), s.per_class, s.batch_size, s.seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(s.epochs * len(sampler), len(sampler)))
    baseline = recall_at_1(x_val, c_val)
    # The network the embeddings came from, with the head stacked on its (normalised) output.
    base = load_backbone(prov["backbone"], prov["weights"], prov.get("weights_sha256"))
    net = EmbeddingNet(base.model, base.dim, s.embed_dim, head_input="normalized")
    run = Run(
        out,
        {
            **ckpt.architecture(net, prov["backbone"]),
            "base_weights": {"id": prov["weights"], "sha256": prov["weights_sha256"]},
            "dim": s.embed_dim,
            "preprocessing": prov["preprocessing"],
            "mode": "head-only",
            "training": settings,
            "baseline_recall_at_1": baseline,
            "versions": library_versions(),
        },
        {"head": head, "loss": loss_fn, "optimizer": opt, "scheduler": sched},
        extra_state={"best_head": None},
    )
    run.resume_from(state)

    def train_epoch(epoch: int) -> dict:
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
        return {"loss": mean_loss(losses), "seconds": time.perf_counter() - t0}

    def validate() -> float:
        head.eval()
        with torch.inference_mode():
            return recall_at_1(head(torch.from_numpy(x_val)).numpy(), c_val)

    def keep_best(_epoch: int) -> None:
        run.extra_state["best_head"] = {k: v.clone() for k, v in head.state_dict().items()}

    with Progress(s.epochs - run.start + 1, "train head", "epoch", progress, every=10) as bar:
        fit(
            run,
            s.epochs,
            train_epoch,
            validate,
            on_improved=keep_best,
            checkpoint=None,  # each epoch takes milliseconds: the deliverables are written once, below
            report=lambda e, _improved: bar.update(1, loss=f"{e['loss']:.3f}", r1=f"{e['recall@1']:.3f}"),
        )
    net.head.load_state_dict(head.state_dict())
    model_state = {k: v.clone() for k, v in net.state_dict().items()}
    net.head.load_state_dict(run.extra_state["best_head"])
    run.deliver(s.epochs, model_state, net.state_dict())
    log.info(
        "head-only: validation Recall@1 %.3f (frozen features %.3f), best epoch %d",
        run.best[1],
        baseline,
        run.best[0],
    )
    return TrainResult.of_run(run, "head-only", prov["backbone"], s.embed_dim, s.epochs, baseline)
