"""`folders` (one sub-folder per class), `vmmrdb` (make_model_year folders) and `unlabeled` layouts."""

from __future__ import annotations

import re
from pathlib import Path

from carsearch.datasets.csv_layout import read_class_names
from carsearch.datasets.records import SLASH_CLASS_NAMES, Record, nfc, record_for, restore_slash_name
from carsearch.datasets.scan import class_folders, image_files
from carsearch.errors import CarsearchError

# VMMRdb folder names: make_model_year, where make and model may hold spaces or more underscores.
VMMRDB_FOLDER = re.compile(r"^[^_]+(_[^_]+)*_(18|19|20)\d\d$")


def _known_names(root: Path) -> tuple[str, ...]:
    """Class names with a "/" that folder names may have replaced: built in, plus classes.csv if present."""
    extra: tuple[str, ...] = ()
    if (root / "classes.csv").is_file():
        extra = tuple(n for n in read_class_names(root / "classes.csv").values() if "/" in n)
    return SLASH_CLASS_NAMES + extra


def read_folders(root: Path) -> list[Record]:
    """One sub-folder per class; the folder name is the class name."""
    folders = class_folders(root)
    if not folders:
        raise CarsearchError(
            f"{root} has no sub-folders with images; use --format unlabeled for a flat folder."
        )
    known = _known_names(root)
    ids = {}
    if (root / "classes.csv").is_file():
        ids = {
            nfc(name): int(cid)
            for cid, name in read_class_names(root / "classes.csv").items()
            if cid.isdigit()
        }
    records = []
    for folder in folders:
        label = nfc(restore_slash_name(folder.name, known))
        records.extend(record_for(p, label, class_id=ids.get(label, -1)) for p in image_files(folder, root))
    return sorted(records, key=lambda r: r.path)


def read_vmmrdb(root: Path) -> list[Record]:
    """VMMRdb: one folder per class named make_model_year (e.g. honda_civic_2005)."""
    folders = class_folders(root)
    if not folders:
        raise CarsearchError(f"{root} has no make_model_year sub-folders with images.")
    bad = [f.name for f in folders if not VMMRDB_FOLDER.match(f.name)]
    if bad:
        raise CarsearchError(
            f"{len(bad)} folder(s) of {root} are not named make_model_year (first: {bad[0]!r}); "
            "use --format folders for free-form class names."
        )
    records = []
    for folder in folders:
        records.extend(record_for(p, folder.name) for p in image_files(folder, root))
    return sorted(records, key=lambda r: r.path)


def read_unlabeled(root: Path) -> list[Record]:
    """Every image under `root`, without labels: a collection to search, not to classify."""
    paths = image_files(root, root)
    if not paths:
        raise CarsearchError(f"no images (.jpg, .png, .webp, ...) found under {root}.")
    return [Record(p) for p in paths]
