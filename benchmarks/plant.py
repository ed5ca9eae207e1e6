"""Plant near-duplicates and flip labels in copies of the dev folder, for the audit benchmarks.

- `plant_duplicates`: a csv-layout folder whose images/ links to every dev photo, plus N planted copies
  of N seeded-random photos under planted/, each edited one way (low JPEG quality, resized, cropped a
  little, brightened, mirrored, or two of these), labelled as their original. Returns the planted pairs.
- `flip_labels`: a seeded 5% of the labels moved to another class at random.
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

EDITS = (
    "jpeg_q20",
    "resize_60",
    "crop_8",
    "brighten_130",
    "mirror",
    "crop_5+jpeg_q35",
    "resize_75+brighten_115",
)
# A listing photo re-posted elsewhere: cropped a little, downscaled, recompressed hard and colour-shifted
# (issue 19, kind 10: frozen-feature cosines of 0.81-0.87 to their originals).
REPOST_EDITS = (
    "crop_6+resize_60+saturate_125+jpeg_q30",
    "crop_4+resize_50+tint_106+jpeg_q25",
    "crop_8+resize_60+contrast_115+brighten_110+jpeg_q30",
    "crop_5+resize_55+saturate_80+tint_95+jpeg_q25",
)


def _edit(img: Image.Image, edit: str) -> tuple[Image.Image, int]:
    quality = 90
    for step in edit.split("+"):
        name, _, value = step.partition("_")
        v = int(value.lstrip("q") or 0)
        if name == "jpeg":
            quality = v
        elif name == "resize":
            img = img.resize((max(1, img.width * v // 100), max(1, img.height * v // 100)), Image.BICUBIC)
        elif name == "crop":
            dx, dy = img.width * v // 200, img.height * v // 200  # v% in all, half each side
            img = img.crop((dx, dy, img.width - dx, img.height - dy))
        elif name == "brighten":
            img = ImageEnhance.Brightness(img).enhance(v / 100)
        elif name == "saturate":
            img = ImageEnhance.Color(img).enhance(v / 100)
        elif name == "contrast":
            img = ImageEnhance.Contrast(img).enhance(v / 100)
        elif name == "tint":  # warmer (v > 100) or cooler: red scaled by v%, blue by (200 - v)%
            r, g, b = img.split()
            red = [min(255, x * v // 100) for x in range(256)]
            blue = [min(255, x * (200 - v) // 100) for x in range(256)]
            img = Image.merge("RGB", (r.point(red), g, b.point(blue)))
        elif name == "mirror":
            img = ImageOps.mirror(img)
    return img, quality


def plant_duplicates(
    dev: Path, out: Path, n: int, seed: int = 0, edits: tuple[str, ...] = EDITS
) -> list[tuple[str, str, str]]:
    """Build the folder at `out`; returns (original path, planted path, edit) for each planted copy."""
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    (out / "planted").mkdir()
    with open(dev / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        os.symlink(dev / row["image"], out / row["image"])
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(rows), size=n, replace=False))
    pairs, planted_rows = [], []
    for k, i in enumerate(chosen):
        row, edit = rows[i], edits[k % len(edits)]
        with Image.open(dev / row["image"]) as im:
            img, quality = _edit(ImageOps.exif_transpose(im).convert("RGB"), edit)
        name = f"planted/{Path(row['image']).stem}_{edit.replace('+', '-')}.jpg"
        img.save(out / name, quality=quality)
        pairs.append((row["image"], name, edit))
        planted_rows.append({**row, "image": name})
    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows + planted_rows)
    shutil.copyfile(dev / "classes.csv", out / "classes.csv")
    return pairs


def flip_labels(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`fraction` of the labels moved to another label drawn at random; returns (noisy, flipped mask)."""
    rng = np.random.default_rng(seed)
    names = np.unique(labels)
    flipped = np.zeros(len(labels), dtype=bool)
    flipped[rng.choice(len(labels), size=round(fraction * len(labels)), replace=False)] = True
    noisy = labels.copy()
    for i in np.flatnonzero(flipped):
        choices = names[names != labels[i]]
        noisy[i] = choices[rng.integers(len(choices))]
    return noisy, flipped
