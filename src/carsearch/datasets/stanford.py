"""`stanford` layout: the original Stanford Cars devkit (.mat annotations, read with scipy)."""

from __future__ import annotations

from pathlib import Path

from carsearch import defaults
from carsearch.datasets.records import Record, record_for
from carsearch.errors import CarsearchError

SPLITS = defaults.SPLITS


def devkit_dir(root: Path) -> Path | None:
    for cand in (root / "devkit", root / "car_devkit" / "devkit", root / "stanford_cars" / "devkit"):
        if (cand / "cars_meta.mat").is_file():
            return cand
    return None


def _image_dir(base: Path, name: str) -> Path:
    # Archives unpack as cars_train/ or cars_train/cars_train/ depending on who re-zipped them.
    d = base / name
    return d / name if (d / name).is_dir() else d


def _load(path: Path, key: str):
    import scipy.io  # only this reader needs scipy

    try:
        return scipy.io.loadmat(path, squeeze_me=True)[key]
    except (OSError, ValueError, KeyError) as e:
        raise CarsearchError(
            f"cannot read {key!r} from {path} ({e}); is it the Stanford Cars devkit file?"
        ) from e


def read_stanford(root: Path, split: str = "all", bbox_crop: bool = False) -> list[Record]:
    """Records of the devkit's train and/or test split, with the annotated bounding box when asked."""
    if split not in SPLITS:
        raise CarsearchError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
    devkit = devkit_dir(root)
    if devkit is None:
        raise CarsearchError(
            f"no devkit/cars_meta.mat under {root}; is this the Stanford Cars devkit layout?"
        )
    base = devkit.parent
    names = [str(n) for n in _load(devkit / "cars_meta.mat", "class_names")]
    parts = []
    if split in ("train", "all"):
        parts.append((devkit / "cars_train_annos.mat", "cars_train"))
    if split in ("test", "all"):
        test = next(
            (
                p
                for p in (base / "cars_test_annos_withlabels.mat", devkit / "cars_test_annos_withlabels.mat")
                if p.is_file()
            ),
            None,
        )
        if test is None:
            raise CarsearchError(
                f"cars_test_annos_withlabels.mat is missing under {base}; use --split train."
            )
        parts.append((test, "cars_test"))
    records: list[Record] = []
    for mat, folder in parts:
        img_dir = _image_dir(base, folder)
        for a in _load(mat, "annotations").reshape(-1):
            cls = int(a["class"])
            if not 1 <= cls <= len(names):
                raise CarsearchError(f"{mat}: class {cls} is outside 1..{len(names)} of cars_meta.mat.")
            bbox = None
            if bbox_crop:
                bbox = (int(a["bbox_x1"]), int(a["bbox_y1"]), int(a["bbox_x2"]), int(a["bbox_y2"]))
            rel = (img_dir / str(a["fname"])).relative_to(root).as_posix()
            records.append(record_for(rel, names[cls - 1], bbox, class_id=cls))
    return sorted(records, key=lambda r: r.path)
