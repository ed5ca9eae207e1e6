"""Safe image loading: any file in, an RGB image or a `BadImage` with a reason out.

Pillow's global flags (MAX_IMAGE_PIXELS, LOAD_TRUNCATED_IMAGES) are left alone: the pixel limit is
checked here, per call, from the header, before any pixel is decoded.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from carsearch import defaults
from carsearch.formats import register_plugins

# Pillow's own default limit (about 89.5 megapixels); images above it are decompression-bomb suspects.
DEFAULT_MAX_PIXELS = defaults.MAX_PIXELS

# Reasons a file is skipped, as counted in manifests and failures.jsonl.
REASONS = (
    "missing",
    "unreadable",
    "outside_root",
    "empty",
    "not_an_image",
    "truncated",
    "too_many_pixels",
    "decode_error",
    "name_not_utf8",
)
# Reasons that may go away without changing the dataset's list (a file restored, a permission fixed):
# `embed --retry-failed` embeds such images again.
TRANSIENT_REASONS = ("missing", "unreadable")

_WHITE = (255, 255, 255)
# Formats whose decoder can scale down while decoding: the same reduction rule for all of them, so the
# same pixels embed the same whatever the container (MPO is a JPEG with more pictures after the first).
_DRAFTABLE = frozenset({"JPEG", "MPO"})


class BadImage(Exception):
    """A file that cannot be used as an image; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def safe_join(root: Path, rel: str) -> Path:
    """`root / rel`, refusing dataset paths that climb out of `root` (absolute paths, ".." parts) and
    names that are not UTF-8 text. Symbolic links are followed: DVC and git-annex checkouts and split
    folders made of links are datasets like any other; it is the dataset's own paths that must stay in."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        raise BadImage(
            "name_not_utf8", rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        ) from None
    parts = Path(rel).parts
    if Path(rel).is_absolute() or ".." in parts or not parts:
        raise BadImage("outside_root", rel)
    return root / rel


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise BadImage("missing", str(path)) from e
    except IsADirectoryError as e:
        raise BadImage("not_an_image", f"{path} is a folder") from e
    except OSError as e:
        raise BadImage("unreadable", f"{path}: {e.strerror or e}") from e


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: alpha composited on white, 16-bit and float scaled, CMYK converted."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # convert("L") would clip 16-bit values at 255; scale the real range instead.
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if (mode.startswith("I;16") or a.max(initial=0) > 255) else 255.0
        if mode == "F" and a.max(initial=0) <= 1.0:
            top = 1.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    has_alpha = (
        mode in ("RGBA", "LA", "PA", "RGBa", "La")
        or (mode == "P" and "transparency" in img.info)
        or (mode in ("L", "RGB") and "transparency" in img.info)
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, _WHITE)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def load_image(
    source: bytes | str | os.PathLike[str],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode `source` (bytes or a path) into an upright RGB image.

    `draft_size` lets the JPEG decoder scale down by a power of two while both sides stay >= that size:
    a large photo then decodes several times faster, for the same final resize.
    Raises BadImage with a reason from REASONS.
    """
    register_plugins()  # HEIC / HEIF (pillow-heif), once
    data = source if isinstance(source, bytes) else read_file(Path(source))
    if not data:
        raise BadImage("empty", "zero-byte file")
    with warnings.catch_warnings():
        # The limit is checked below, from the header; Pillow's warning about it would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise BadImage("too_many_pixels", str(e)) from e
        except UnidentifiedImageError as e:
            raise BadImage("not_an_image", "not a format Pillow can read") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise BadImage("decode_error", str(e)) from e
    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadImage("decode_error", f"image has size {w}x{h}")
    if w * h > max_pixels:
        raise BadImage("too_many_pixels", f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)  # animated GIF / multi-page TIFF: the first frame
        if draft_size and img.format in _DRAFTABLE:
            img.draft(None, (draft_size, draft_size))
        img.load()
        # In place: a copy would double the memory of every decode (a 243 MB upload held twice).
        ImageOps.exif_transpose(img, in_place=True)
        return _to_rgb(img)
    except OSError as e:
        reason = "truncated" if "truncated" in str(e).lower() else "decode_error"
        raise BadImage(reason, str(e)) from e
    except (SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise BadImage("decode_error", str(e)) from e
