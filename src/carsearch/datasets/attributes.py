"""The photo attributes a search can be restricted to, declared once.

Each entry names an attribute every record, shard and gallery carries (datasets/records.py parses make,
model and year from the class name) and says how users type it. The filter (search/filters.py), the
CLI's `--NAME` options of `search` and `classify`, the API's query parameters of POST /api/search and the
page's "only cars with" controls are all made from FILTER_FIELDS: a new filterable attribute is one entry
here (and the reader that fills it). Import-light: the CLI builds its options from it. Readers take
`attributes.FILTER_FIELDS` when they run, not at import.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from typing import Any

NAMES, YEARS = "names", "years"

# What every image's record carries besides its path, label and class id (parsed from the class name by
# datasets/records.py): the fields `attribute_fields` gives each dataclass that holds records (Record,
# ShardRows, EmbeddingSet, Gallery, Neighbor, Classification), the shards' HDF5 datasets and the index
# metadata (embed/shards.STRING_FIELDS), and the fields an upload may give (serve/writes.py).
ATTRIBUTES = ("make", "model", "year")


def attribute_fields(
    kind: str, *, after: str, default: Any = MISSING, default_factory: Any = MISSING
) -> Callable[[type], type]:
    """Class decorator, written below @dataclass: one field per ATTRIBUTES name, annotated `kind` (a type
    written as a string, e.g. "np.ndarray"), placed right after the field `after` (so the order, and any
    positional construction, stays path/label, make, model, year, ...), with `default` or
    `default_factory` when given. The record holders are then made from the one list."""

    def add(cls: type) -> type:
        annotations = dict(inspect.get_annotations(cls))
        if after not in annotations:
            raise TypeError(f"{cls.__name__} has no field {after!r} to put the attributes after")
        ordered: dict[str, Any] = {}
        for name, annotation in annotations.items():
            ordered[name] = annotation
            if name == after:
                ordered.update({a: kind for a in ATTRIBUTES})
        cls.__annotations__ = ordered
        for a in ATTRIBUTES:
            if default is not MISSING:
                setattr(cls, a, default)
            elif default_factory is not MISSING:
                setattr(cls, a, field(default_factory=default_factory))
        return cls

    return add


@dataclass(frozen=True)
class FilterField:
    """One attribute a search can be restricted to."""

    name: str  # the record's attribute, the CLI option --NAME and the API's query parameter
    # NAMES: any of comma-separated names (case- and Unicode-form-insensitive); YEARS: years and ranges.
    kind: str
    help: str  # what to type, for --help, the API's docs and the page
    placeholder: str  # the page's hint in the empty field
    suggest: bool = False  # the page offers the index's own values (up to 500) as suggestions
    json_key: str = ""  # its key in an answer's "filter" object (default: the name)

    @property
    def key(self) -> str:
        return self.json_key or self.name


FILTER_FIELDS: tuple[FilterField, ...] = (
    FilterField(
        "make",
        NAMES,
        "Only these makes (comma-separated, any case), e.g. BMW,Audi.",
        "any, e.g. BMW,Audi",
        suggest=True,
    ),
    FilterField("model", NAMES, "Only these models (comma-separated, any case).", "any"),
    FilterField(
        "year",
        YEARS,
        "Years: 2012, 2008-2012, 2010-, -2005, or a comma list of them.",
        "any, e.g. 2010-",
        json_key="years",
    ),
)
