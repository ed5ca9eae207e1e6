"""Walking folders for image files, in a deterministic order."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from carsearch.formats import is_image_name

__all__ = ["class_folders", "image_files", "is_image_name", "left_out_files", "top_level_images"]
# A dataset's own description files: read, not left out.
_DATASET_FILES = frozenset({"labels.csv", "classes.csv"})


def _walk(folder: Path) -> Iterator[tuple[str, list[str]]]:
    """(folder path, file names) of `folder` and every folder below it, sorted, hidden ones skipped.
    Linked folders are followed (split folders made of links); each real folder is walked once, so a link
    to a parent cannot loop."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        seen.add(os.path.realpath(dirpath))
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".") and os.path.realpath(os.path.join(dirpath, d)) not in seen
        )
        yield dirpath, filenames


def left_out_files(root: Path) -> dict[str, int]:
    """Files under `root` that are not read as images, counted by extension ("(none)" without one);
    hidden files and a dataset's labels.csv / classes.csv / devkit .mat files are not counted."""
    counts: Counter[str] = Counter()
    for _, filenames in _walk(root):
        for f in filenames:
            if f.startswith(".") or is_image_name(f) or f in _DATASET_FILES or f.endswith(".mat"):
                continue
            counts[os.path.splitext(f)[1].lower() or "(none)"] += 1
    return dict(counts.most_common())


def image_files(folder: Path, root: Path) -> list[str]:
    """Image files under `folder` (recursively), as sorted posix paths relative to `root`.

    Hidden files and folders are skipped: they are editor and OS droppings, not photos.
    """
    out: list[str] = []
    for dirpath, filenames in _walk(folder):
        rel = Path(dirpath).relative_to(root)
        out.extend((rel / f).as_posix() for f in filenames if is_image_name(f))
    out.sort()
    return out


def class_folders(root: Path) -> list[Path]:
    """Sub-folders of `root` that hold at least one image (at any depth), sorted by name."""
    folders = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("."):
            p = Path(entry.path)
            if any(is_image_name(f) for _, _, files in os.walk(p, followlinks=True) for f in files):
                folders.append(p)
    return folders


def top_level_images(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_file() and is_image_name(e.name))
