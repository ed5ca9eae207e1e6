"""Training data: class-balanced batches and augmentation suited to car photos."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T
from PIL import Image

from carsearch.datasets import Record
from carsearch.embed.images import BadImage, load_image, safe_join
from carsearch.embed.preprocess import Preprocessing

_INTERP = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


class BalancedBatches(torch.utils.data.Sampler[list[int]]):
    """Batches of P classes x K images (with replacement inside a class when it has fewer than K), so
    every batch holds positives for the metric-learning loss. One epoch covers about every image once."""

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
