"""Dataset readers: turn a dataset layout into sorted `Record`s (path, label, make, model, year)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

from carsearch import defaults
from carsearch.datasets.csv_layout import read_csv
from carsearch.datasets.folders import (
    VMMRDB_FOLDER,
    check_guessed_folders,
    read_folders,
    read_unlabeled,
    read_vmmrdb,
)
from carsearch.datasets.records import Record, split_make_model_year
from carsearch.datasets.scan import class_folders, left_out_files, top_level_images
from carsearch.datasets.stanford import SPLITS, devkit_dir, read_stanford
from carsearch.errors import CarsearchError

FORMATS = defaults.FORMATS

__all__ = [
    "FORMATS",
    "SPLITS",
    "Dataset",
    "Record",
    "detect_format",
    "holds_photos",
    "read_dataset",
    "split_make_model_year",
]


@dataclass(frozen=True)
class Dataset:
    """A collection: its absolute root, the layout it was read as, and its records sorted by path."""

    root: Path
    format: str
    records: list[Record]
    left_out: dict[str, int] = field(default_factory=dict)  # files not read as images, by extension

    @property
    def labeled(self) -> bool:
        return any(r.label for r in self.records)

    def records_sha256(self) -> str:
        """Fingerprint of the record list: any added, removed or relabelled image changes it."""
        h = hashlib.sha256()
        for r in self.records:
            line = f"{r.path}\t{r.label}\t{r.make}\t{r.model}\t{r.year}\t{r.class_id}\t{r.bbox}\n"
            # File names that are not UTF-8 reach us as surrogate escapes: hash their original bytes.
            h.update(line.encode("utf-8", "surrogateescape"))
        return h.hexdigest()


def detect_format(root: Path) -> str:
    """Guess the layout of `root`: csv, stanford, vmmrdb, folders or unlabeled."""
    if (root / "labels.csv").is_file():
        return "csv"
    if devkit_dir(root) is not None:
        return "stanford"
    folders = class_folders(root)
    if folders:
        return "vmmrdb" if all(VMMRDB_FOLDER.match(f.name) for f in folders) else "folders"
    if top_level_images(root):
        return "unlabeled"
    raise CarsearchError(
        f"found no images under {root}: expected labels.csv, a Stanford devkit, class sub-folders "
        "or image files."
    )


def holds_photos(folder: Path) -> bool:
    """Whether `folder` looks like a photo collection (a layout `--format auto` would read)."""
    try:
        detect_format(folder)
    except (CarsearchError, OSError):
        return False
    return True


def read_dataset(
    root: str | Path,
    format: str = "auto",
    *,
    labels_file: str | Path | None = None,
    split: str = "all",
    bbox_crop: bool = False,
) -> Dataset:
    """Read the dataset at `root` in the given layout (`auto` detects it)."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise CarsearchError(f"dataset folder {root} does not exist or is not a folder.")
    if format not in FORMATS:
        raise CarsearchError(f"unknown dataset format {format!r}; choose one of {', '.join(FORMATS)}.")
    fmt = detect_format(root) if format == "auto" else format
    if fmt == "csv":
        records = read_csv(root, Path(labels_file).resolve() if labels_file else None)
    elif fmt == "folders":
        records = read_folders(root)
        if format == "auto":
            check_guessed_folders(root, records)
    elif fmt == "vmmrdb":
        records = read_vmmrdb(root)
    elif fmt == "stanford":
        records = read_stanford(root, split=split, bbox_crop=bbox_crop)
    else:
        records = read_unlabeled(root)
    if not records:
        raise CarsearchError(f"the {fmt} reader found no images under {root}.")
    return Dataset(root=root, format=fmt, records=number_classes(records), left_out=left_out_files(root))


def number_classes(records: list[Record]) -> list[Record]:
    """Give every labelled record a class id: the dataset's own where it has them for all classes, else
    1..C in the sorted order of the class names (so protocols that split by class id still work)."""
    labeled = [r for r in records if r.label]
    if not labeled or all(r.class_id >= 0 for r in labeled):
        return records
    ids = {name: i for i, name in enumerate(sorted({r.label for r in labeled}), start=1)}
    return [replace(r, class_id=ids[r.label]) if r.label else r for r in records]
