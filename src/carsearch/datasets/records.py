"""The record every dataset reader produces, and make / model / year parsing of class names."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from carsearch.datasets.attributes import ATTRIBUTES, attribute_fields

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
@attribute_fields("str", after="label", default="")  # make, model, year (datasets/attributes.ATTRIBUTES)
class Record:
    """One image of a collection. `path` is relative to the dataset root, with "/" separators."""

    path: str
    label: str = ""
    class_id: int = -1  # the dataset's class number (Stanford: 1..196); -1 when unlabeled
    bbox: tuple[int, int, int, int] | None = None  # x1, y1, x2, y2 in pixels, inclusive

    def __post_init__(self) -> None:
        # Labels enter in NFC (macOS writes file and folder names decomposed: "Citroe\u0308n"), so one
        # class written both ways is one class. The path stays as the file system spells it.
        for name in ("label", *ATTRIBUTES):
            object.__setattr__(self, name, nfc(getattr(self, name)))


def nfc(text: str) -> str:
    """`text` in Unicode normal form C (composed), the form labels and filter values are compared in."""
    return unicodedata.normalize("NFC", text) if text and not text.isascii() else text


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
    """A record whose attributes (make / model / year) are parsed from its label: the reader of every
    attribute in datasets/attributes.ATTRIBUTES, which a new attribute extends."""
    parts = split_make_model_year(label) if label else ("",) * len(ATTRIBUTES)
    attrs = dict(zip(ATTRIBUTES, parts, strict=True))
    return Record(path=path, label=label, **attrs, class_id=class_id, bbox=bbox)


# Makes that title-casing spells wrong, as Stanford Cars writes them ("am general" -> "AM General", not
# "Am General"); the other makes of a lower-case name are title-cased ("mercedes-benz" -> "Mercedes-Benz").
MAKE_SPELLINGS: dict[str, str] = {m.lower(): m for m in ("AM General", "BMW", "GMC", "McLaren")}


def _title(words: str, sep: str = " ") -> str:
    return sep.join(w[:1].upper() + w[1:] for w in words.split(sep))


def _model_word(word: str) -> str:
    """One word of a lower-case model name as makers write it: letters then digits are a code ("xc90" ->
    "XC90", "f-150" -> "F-150"), a short word with no vowel an abbreviation ("tts" -> "TTS", "srx" -> "SRX");
    other words are title-cased ("range" -> "Range"); words starting with a digit are kept ("328i")."""
    parts = word.split("-")
    out = []
    for w in parts:
        code = w[:1].isalpha() and any(c.isdigit() for c in w)
        abbreviation = w.isalpha() and len(w) <= 4 and not set(w) & set("aeiouy")
        out.append(w.upper() if code or abbreviation else w[:1].upper() + w[1:])
    return "-".join(out)


def display_name(make: str, model: str, year: str) -> str:
    """A class as a person reads it: "land rover", "range rover", "2012" -> "Land Rover Range Rover 2012".
    Names written all in lower case (VMMRdb's folders) are title-cased word by word, known makes spelled as
    the makers do ("am general" -> "AM General", "bmw" -> "BMW"); names that carry any capitals of their
    own (Stanford Cars: "BMW M3", "smart fortwo Convertible") are kept as written. Model words are guessed
    (`_model_word`): "audi", "tts", "2012" -> "Audi TTS 2012", "volvo", "xc90" -> "Volvo XC90"."""

    words = " ".join(part for part in (make, model, year) if part)
    if words != words.lower():  # the dataset wrote its own capitals somewhere: keep every word as written
        return words
    make = " ".join(make.split())
    make = MAKE_SPELLINGS.get(make) or " ".join(_title(w, "-") for w in make.split())
    rest = " ".join(_model_word(w) for w in f"{model} {year}".split())
    return " ".join(part for part in (make, rest) if part)
