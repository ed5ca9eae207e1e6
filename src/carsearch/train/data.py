"""Training data: which images train and which validate, class-balanced batches, and augmentation
suited to car photos."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T
from PIL import Image

from carsearch.datasets import Record
from carsearch.embed.images import BadImage, load_image, safe_join
from carsearch.errors import CarsearchError
from carsearch.eval.splits import class_range, stratified_split
from carsearch.models import Preprocessing

_INTERP = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


def split_classes(
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
    if not 0 < train_fraction <= 1:
        raise CarsearchError("--train-fraction must be in (0, 1].")
    present = set(np.unique(class_ids).tolist()) - {-1}
    train = class_range(classes) & present if classes else present
    if not train:
        raise CarsearchError(f"no images of the classes {classes!r} in this dataset.")
    member = np.isin(class_ids, sorted(train))
    val = class_range(val_classes) & present if val_classes else set()
    if val_classes and not val:
        raise CarsearchError(f"--val-classes {val_classes} names no class of this dataset.")
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


class BalancedBatches(torch.utils.data.Sampler[list[int]]):
    """Batches of P classes x K images (with replacement inside a class when it has fewer than K), so
    every batch holds positives for the metric-learning loss. One epoch covers about every image once.

    Not pytorch-metric-learning's MPerClassSampler: it draws from NumPy's global generator and shuffles
    its class list in place from epoch to epoch, so epoch e depends on every epoch before it and a run
    resumed at epoch e cannot draw the batches the uninterrupted run drew. Here epoch e's batches are a
    function of (seed, e) alone (`set_epoch`)."""

    def __init__(self, labels: list[int], per_class: int, batch_size: int, seed: int = 0) -> None:
        self.by_class: dict[int, list[int]] = defaultdict(list)
        for i, c in enumerate(labels):
            self.by_class[c].append(i)
        self.k = max(1, per_class)
        self.p = max(1, batch_size // self.k)
        self.batches = max(1, len(labels) // (self.p * self.k))
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed * 100_003 + self.epoch)
        classes = list(self.by_class)
        for _ in range(self.batches):
            batch = []
            for c in rng.sample(classes, min(self.p, len(classes))):
                members = self.by_class[c]
                pick = (
                    rng.sample(members, self.k) if len(members) >= self.k else rng.choices(members, k=self.k)
                )
                batch.extend(pick)
            yield batch


def framings(
    base: Preprocessing, crop: str, size: int | None, test_size: int | None
) -> tuple[Preprocessing, Preprocessing]:
    """(training framing, test framing): the backbone's preprocessing with `crop`, at `size` and
    `test_size` pixels (None: the backbone's size; the test size defaults to the training size). The resize
    before a centre crop keeps the backbone's ratio."""
    prep = base.with_crop(crop)

    def at(px: int | None) -> Preprocessing:
        if not px:
            return prep
        return replace(prep, size=px, resize=max(px, round(px * prep.resize / prep.size)))

    train = at(size)
    return train, at(test_size) if test_size else train


def augmentation(prep: Preprocessing) -> T.Compose:
    """Random resized crop (on the image as the crop mode frames it), horizontal flip, colour jitter.

    Cars are near-symmetric left/right, so flips are safe; crops keep at least 35% of the framed car."""
    interp = _INTERP[prep.interpolation]
    steps: list = []
    if prep.crop == "squash":
        steps.append(T.Resize((prep.resize, prep.resize), interpolation=interp))
    elif prep.crop == "pad":
        steps.append(_Letterbox(prep))
    steps += [
        T.RandomResizedCrop(prep.size, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3), interpolation=interp),
        T.RandomHorizontalFlip(),
        T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03),
    ]
    return T.Compose(steps)


class _Letterbox:
    """The `pad` framing as a transform step (a class, not a lambda, so DataLoader workers can pickle it)."""

    def __init__(self, prep: Preprocessing) -> None:
        self.prep = prep.with_crop("pad")

    def __call__(self, img: Image.Image) -> Image.Image:
        return Image.fromarray(self.prep.apply(img))


class TrainImages(torch.utils.data.Dataset):
    """(uint8 HWC array or None, class index) per record; unreadable images come back as None."""

    def __init__(
        self, root: Path, records: list[Record], targets: list[int], prep: Preprocessing, augment: bool = True
    ) -> None:
        self.root, self.records, self.targets, self.prep = root, records, targets, prep
        self.transform = augmentation(prep) if augment else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[np.ndarray | None, int]:
        rec = self.records[i]
        try:
            img = load_image(safe_join(self.root, rec.path), draft_size=self.prep.draft_size)
        except BadImage:
            return None, self.targets[i]
        arr = np.asarray(self.transform(img)) if self.transform else self.prep.apply(img)
        return np.ascontiguousarray(arr, dtype=np.uint8), self.targets[i]


def collate(items: list[tuple[np.ndarray | None, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    good = [(a, t) for a, t in items if a is not None]
    if not good:
        return torch.zeros((0, 1, 1, 3), dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    return torch.from_numpy(np.stack([a for a, _ in good])), torch.tensor([t for _, t in good])
