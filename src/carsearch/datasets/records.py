"""The record every dataset reader produces, and make / model / year parsing of class names."""

from __future__ import annotations

import re
from dataclasses import dataclass

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# Makes written as two words. Everything else is one token ("Mercedes-Benz", "Rolls-Royce" are one token
# in Stanford Cars; VMMRdb writes them "mercedes benz" / "mercedes_benz" / "rolls royce").
MULTI_WORD_MAKES: tuple[str, ...] = (
    "AM General",
    "Aston Martin",
    "Land Rover",
    "Alfa Romeo",
    "Mercedes Benz",
    "Rolls Royce",
    "Can Am",
    "Austin Healey",
    "De Tomaso",
)

# Class names that contain a "/" cannot be folder names; readers restore them from these.
SLASH_CLASS_NAMES: tuple[str, ...] = ("Ram C/V Cargo Van Minivan 2012",)

_YEAR = re.compile(r"^(18|19|20)\d\d$")
_SEPARATORS = re.compile(r"[\s_\-]+")


@dataclass(frozen=True, slots=True)
class Record:
    """One image of a collection. `path` is relative to the dataset root, with "/" separators."""

    path: str
    label: str = ""
    make: str = ""
    model: str = ""
    year: str = ""
    class_id: int = -1  # the dataset's class number (Stanford: 1..196); -1 when unlabeled
    bbox: tuple[int, int, int, int] | None = None  # x1, y1, x2, y2 in pixels, inclusive


def _norm(text: str) -> str:
    return _SEPARATORS.sub(" ", text).strip().lower()


_MULTI = sorted(((_norm(m).split(), m) for m in MULTI_WORD_MAKES), key=lambda t: -len(t[0]))


def split_make_model_year(name: str) -> tuple[str, str, str]:
    """Split "Make Model [Body] Year" (Stanford Cars) or "make_model_year" (VMMRdb) into its parts.

    The year is the last token when it looks like a year, else "". The make is one token unless the name
    starts with a known two-word make. The model is what lies between, joined with single spaces.
    """
    tokens = [t for t in re.split(r"[\s_]+", name.strip()) if t]
    if not tokens:
        return "", "", ""
    year = tokens.pop() if len(tokens) > 1 and _YEAR.match(tokens[-1]) else ""
    # Compare on words: a hyphenated token ("Rolls-Royce") normalises to two words ("rolls royce").
    token_words = [_norm(t).split() for t in tokens]
    words = [w for tw in token_words for w in tw]
    n_make = 1
    for make_words, _ in _MULTI:
        if len(tokens) > 1 and words[: len(make_words)] == make_words:
            n_words, n_make = 0, 0
            while n_words < len(make_words):  # how many original tokens those words span
                n_words += len(token_words[n_make])
                n_make += 1
            break
    make = " ".join(tokens[:n_make])
    model = " ".join(tokens[n_make:])
    return make, model, year


def restore_slash_name(folder_name: str, known: tuple[str, ...] = SLASH_CLASS_NAMES) -> str:
    """Undo the "/" replacement a folder name needed ("Ram C-V Cargo Van Minivan 2012" -> "Ram C/V ...")."""
    for name in known:
        for repl in ("-", "_", " ", "", "／"):
            if folder_name == name.replace("/", repl):
                return name
    return folder_name


def record_for(
    path: str, label: str = "", bbox: tuple[int, int, int, int] | None = None, class_id: int = -1
) -> Record:
    """A record whose make / model / year are parsed from its label."""
    make, model, year = split_make_model_year(label) if label else ("", "", "")
    return Record(path=path, label=label, make=make, model=model, year=year, class_id=class_id, bbox=bbox)
