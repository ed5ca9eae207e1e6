"""`csv` layout: a labels.csv with an image column and a class name, or a class id plus classes.csv."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from carsearch.datasets.records import Record, split_make_model_year
from carsearch.errors import CarsearchError

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "path", "image_path", "filepath", "file", "filename", "fname", "relative_im_path")
NAME_COLUMNS = ("class_name", "label", "name", "class")
ID_COLUMNS = ("class_id", "label_id", "class", "target")
IMAGE_SUBFOLDERS = ("images", "cars_train", "cars_test", "train", "test")


def _pick(fields: list[str], candidates: tuple[str, ...]) -> str | None:
    lowered = {f.strip().lower(): f for f in fields}
    for c in candidates:
        if c in lowered:
            return lowered[c]
    return None


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    except UnicodeDecodeError as e:
        raise CarsearchError(f"{path} is not UTF-8 text ({e.reason}); save it as UTF-8 CSV.") from e
    except csv.Error as e:
        raise CarsearchError(f"{path} is not a readable CSV file ({e}).") from e
    except OSError as e:
        raise CarsearchError(
            f"cannot read {path} ({e.strerror or e}); check that it is a readable file."
        ) from e


def read_class_names(path: Path) -> dict[str, str]:
    """classes.csv: class_id -> class_name."""
    fields, rows = _read_rows(path)
    id_col, name_col = _pick(fields, ID_COLUMNS), _pick(fields, NAME_COLUMNS[:3])
    if id_col is None or name_col is None:
        raise CarsearchError(f"{path} needs columns class_id and class_name; it has {', '.join(fields)}.")
    return {r[id_col].strip(): r[name_col].strip() for r in rows}


def _image_prefix(root: Path, first: str) -> str:
    """Where the CSV's paths are relative to: the root itself, or a usual image sub-folder."""
    if (root / first).exists():
        return ""
    for sub in IMAGE_SUBFOLDERS:
        if (root / sub / first).exists():
            return sub + "/"
    return ""


def read_csv(root: Path, labels_file: Path | None = None) -> list[Record]:
    """Read `labels.csv` (or `labels_file`) under `root`."""
    path = labels_file or root / "labels.csv"
    if not path.is_file():
        raise CarsearchError(f"no labels file at {path}; pass --labels FILE or choose another --format.")
    fields, rows = _read_rows(path)
    img_col = _pick(fields, IMAGE_COLUMNS)
    if img_col is None:
        raise CarsearchError(
            f"{path} has no image column (one of {', '.join(IMAGE_COLUMNS)}); its columns are "
            f"{', '.join(fields)}."
        )
    name_col = _pick([f for f in fields if f != img_col], NAME_COLUMNS)
    id_col = _pick([f for f in fields if f not in (img_col, name_col)], ID_COLUMNS)
    names: dict[str, str] = {}
    # "class" may hold an id rather than a name: numbers mean ids when classes.csv exists.
    classes_csv = path.parent / "classes.csv"
    if name_col is not None and classes_csv.is_file() and rows and rows[0][name_col].strip().isdigit():
        id_col, name_col = name_col, None
    if name_col is None and id_col is not None:
        if not classes_csv.is_file():
            raise CarsearchError(f"{path} has class ids but no class names, and {classes_csv} is missing.")
        names = read_class_names(classes_csv)
    has = {c: _pick(fields, (c,)) for c in ("make", "model", "year")}
    # Class numbers: the CSV's own id column, else classes.csv looked up by name (else numbered later).
    ids_by_name = {}
    if id_col is None and classes_csv.is_file():
        ids_by_name = {name: cid for cid, name in read_class_names(classes_csv).items()}

    prefix = _image_prefix(root, rows[0][img_col].strip()) if rows else ""
    records: dict[str, Record] = {}
    conflicts = 0
    for i, row in enumerate(rows, start=2):
        if None in row.values() or None in row:
            raise CarsearchError(
                f"{path} line {i} has {len([v for v in row.values() if v is not None])} cells where the "
                f"header has {len(fields)}; fix or remove that row."
            )
        rel = prefix + row[img_col].strip().replace("\\", "/")
        if not rel:
            raise CarsearchError(f"{path} line {i} has an empty {img_col!r} cell; fix or remove that row.")
        if name_col is not None:
            label = row[name_col].strip()
        elif id_col is not None:
            cid = row[id_col].strip()
            if cid not in names:
                raise CarsearchError(f"{path} line {i}: class id {cid!r} is not in {classes_csv}.")
            label = names[cid]
        else:
            label = ""
        make, model, year = split_make_model_year(label) if label else ("", "", "")
        make = row[has["make"]].strip() if has["make"] else make
        model = row[has["model"]].strip() if has["model"] else model
        year = row[has["year"]].strip() if has["year"] else year
        cid = row[id_col].strip() if id_col is not None else ids_by_name.get(label, "")
        record = Record(rel, label, make, model, year, int(cid) if cid.isdigit() else -1)
        first = records.setdefault(rel, record)
        conflicts += first.label != record.label
    if conflicts:
        log.warning(
            "%s lists %d image(s) again with a different label; the first label of each is used.",
            path,
            conflicts,
        )
    return sorted(records.values(), key=lambda r: r.path)
