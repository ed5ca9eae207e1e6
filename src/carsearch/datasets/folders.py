"""`folders` (one sub-folder per class), `vmmrdb` (make_model_year folders) and `unlabeled` layouts."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from carsearch.datasets.csv_layout import read_class_names
from carsearch.datasets.records import SLASH_CLASS_NAMES, Record, nfc, record_for, restore_slash_name
from carsearch.datasets.scan import class_folders, image_files, top_level_images
from carsearch.datasets.stanford import devkit_dir
from carsearch.errors import CarsearchError

log = logging.getLogger(__name__)

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


def check_guessed_folders(root: Path, records: list[Record]) -> None:
    """A `folders` layout that --format auto guessed, checked for the signs of a wrong guess (a parent
    folder given instead of the collection): sub-folders that are datasets of their own, or "classes"
    whose names give no make / model / year and whose photos lie in sub-folders of their own (splits,
    sources) are refused; names that give no make / model / year are said. --format folders reads the
    sub-folders as classes without asking."""
    folders = class_folders(root)
    names = ", ".join(repr(f.name) for f in folders[:3]) + (", ..." if len(folders) > 3 else "")
    keep = "pass --format folders to read its sub-folders as classes all the same"
    datasets = [f for f in folders if (f / "labels.csv").is_file() or devkit_dir(f) is not None]
    if datasets:
        own = "labels.csv" if (datasets[0] / "labels.csv").is_file() else "a Stanford devkit"
        raise CarsearchError(
            f"{root} holds datasets, not one sub-folder per class: {datasets[0].name}/ has {own} of its "
            f"own; embed each into its own folder (`carsearch embed {datasets[0]} --out EMB_DIR`), or {keep}."
        )
    if any(r.year for r in records):
        return
    if all(not top_level_images(f) for f in folders):
        raise CarsearchError(
            f"{root} was read as {len(folders)} classes named after its sub-folders ({names}), but no name "
            "gives a make / model / year and every one keeps its photos in sub-folders of its own: if these "
            f"are splits or sources, give the folder that holds one sub-folder per class (such as "
            f"{folders[0]}), or {keep}."
        )
    log.warning(
        "%s: read as %d classes named after its sub-folders (%s), whose names give no make / model / year "
        "(such as 'Audi TTS Coupe 2012'): classify answers these names, make and year filters find nothing. "
        "If the sub-folders are not car classes, give the folder that holds one per class; --format folders "
        "reads them as classes without this note, --format unlabeled without labels.",
        root,
        len(folders),
        names,
    )


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
