"""Walking folders for image files, in a deterministic order."""

from __future__ import annotations

import os
from pathlib import Path

from carsearch.datasets.records import IMAGE_EXTENSIONS


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not name.startswith(".")


def image_files(folder: Path, root: Path) -> list[str]:
    """Image files under `folder` (recursively), as sorted posix paths relative to `root`.

    Hidden files and folders are skipped: they are editor and OS droppings, not photos.
    """
    out: list[str] = []
    seen: set[str] = set()
    # Linked folders are followed (split folders made of links); each real folder is walked once, so a
    # link to a parent cannot loop.
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        seen.add(os.path.realpath(dirpath))
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".") and os.path.realpath(os.path.join(dirpath, d)) not in seen
        )
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
