"""Which files are images: every extension the installed Pillow, with its plugins, can open.

Pillow's own formats (JPEG with .jfif / .jpe, PNG, WebP, AVIF where Pillow was built with libavif, TIFF,
...) plus HEIC / HEIF through pillow-heif, registered here once. Formats Pillow only names without being
able to read them (stub plugins: BUFR, GRIB, HDF5, MPEG, WMF off Windows; EPS without Ghostscript) are
left out (so are MPEG clips, which Pillow identifies but does not decode): a dataset folder's .h5
shards or .mpg clips are never taken for photos.
"""

from __future__ import annotations

import functools
import os

# Pillow plugins that recognise a file but decode no pixels (MPEG video streams).
_IDENTIFY_ONLY = frozenset({"MPEG"})


@functools.cache
def register_plugins() -> tuple[str, ...]:
    """Register the optional Pillow plugins that are installed (pillow-heif); returns their names."""
    names = []
    try:
        from pillow_heif import register_heif_opener

        register_heif_opener()
        names.append("pillow-heif")
    except ImportError:
        pass
    return tuple(names)


@functools.cache
def image_extensions() -> frozenset[str]:
    """Lower-case extensions (".jpg", ".heic", ...) of the formats this Pillow can open."""
    from PIL import EpsImagePlugin, Image, ImageFile

    register_plugins()
    Image.init()
    out = set()
    for ext, fmt in Image.registered_extensions().items():
        opener = Image.OPEN.get(fmt)
        if opener is None:
            continue
        factory = opener[0]
        if isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile):
            continue  # a format Pillow names but cannot decode without an outside handler
        if fmt == "EPS" and not EpsImagePlugin.has_ghostscript():
            continue
        if fmt in _IDENTIFY_ONLY:
            continue
        out.add(ext.lower())
    return frozenset(out)


def is_image_name(name: str) -> bool:
    """A file name carsearch reads as an image (hidden files never are)."""
    return os.path.splitext(name)[1].lower() in image_extensions() and not name.startswith(".")
