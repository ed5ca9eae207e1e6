"""Make / model / year parsing of class names."""

import pytest

from carsearch.datasets.records import restore_slash_name, split_make_model_year
from tests.conftest import dev_class_names

# The 49 makes of Stanford Cars, written out independently of the parser's own list.
STANFORD_MAKES = {
    "AM General",
    "Acura",
    "Aston Martin",
    "Audi",
    "BMW",
    "Bentley",
    "Bugatti",
    "Buick",
    "Cadillac",
    "Chevrolet",
    "Chrysler",
    "Daewoo",
    "Dodge",
    "Eagle",
    "FIAT",
    "Ferrari",
    "Fisker",
    "Ford",
    "GMC",
    "Geo",
    "HUMMER",
    "Honda",
    "Hyundai",
    "Infiniti",
    "Isuzu",
    "Jaguar",
    "Jeep",
    "Lamborghini",
    "Land Rover",
    "Lincoln",
    "MINI",
    "Maybach",
    "Mazda",
    "McLaren",
    "Mercedes-Benz",
    "Mitsubishi",
    "Nissan",
    "Plymouth",
    "Porsche",
    "Ram",
    "Rolls-Royce",
    "Scion",
    "Spyker",
    "Suzuki",
    "Tesla",
    "Toyota",
    "Volkswagen",
    "Volvo",
    "smart",
}


def test_all_196_stanford_names_parse() -> None:
    names = dev_class_names()
    assert len(names) == 196
    makes = set()
    for name in names:
        make, model, year = split_make_model_year(name)
        assert make in STANFORD_MAKES, name
        assert year == name.split()[-1] and year.isdigit() and 1990 <= int(year) <= 2013, name
        assert model, name
        assert f"{make} {model} {year}" == name
        makes.add(make)
    assert makes == STANFORD_MAKES


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("AM General Hummer SUV 2000", ("AM General", "Hummer SUV", "2000")),
        ("Aston Martin V8 Vantage Convertible 2012", ("Aston Martin", "V8 Vantage Convertible", "2012")),
        ("Land Rover Range Rover SUV 2012", ("Land Rover", "Range Rover SUV", "2012")),
        ("Rolls-Royce Phantom Sedan 2012", ("Rolls-Royce", "Phantom Sedan", "2012")),
        ("Ram C/V Cargo Van Minivan 2012", ("Ram", "C/V Cargo Van Minivan", "2012")),
        # VMMRdb folder names: underscores, and makes / models with spaces or underscores.
        ("honda_civic_2005", ("honda", "civic", "2005")),
        ("mercedes benz_c230_2003", ("mercedes benz", "c230", "2003")),
        ("mercedes_benz_c_class_2010", ("mercedes benz", "c class", "2010")),
        ("land rover_range rover sport_2008", ("land rover", "range rover sport", "2008")),
        ("alfa_romeo_spider_1991", ("alfa romeo", "spider", "1991")),
        ("ford_f150_1979", ("ford", "f150", "1979")),
        # No year, one word.
        ("Tesla Model S", ("Tesla", "Model S", "")),
        ("Audi", ("Audi", "", "")),
        ("", ("", "", "")),
    ],
)
def test_split(name: str, expected: tuple[str, str, str]) -> None:
    assert split_make_model_year(name) == expected


@pytest.mark.parametrize(
    "folder",
    [
        "Ram C-V Cargo Van Minivan 2012",
        "Ram C_V Cargo Van Minivan 2012",
        "Ram CV Cargo Van Minivan 2012",
        "Ram C V Cargo Van Minivan 2012",
    ],
)
def test_restore_slash(folder: str) -> None:
    assert restore_slash_name(folder) == "Ram C/V Cargo Van Minivan 2012"


def test_restore_leaves_other_names() -> None:
    assert restore_slash_name("Audi TTS Coupe 2012") == "Audi TTS Coupe 2012"


def test_every_record_holder_carries_the_declared_attributes() -> None:
    """datasets/attributes.ATTRIBUTES is the one list of per-image attributes: every dataclass that holds
    records gets one field each from it, where the attributes always stood (after the label); the shards
    store them, an upload may give them, and a filter can only name one of them."""
    from dataclasses import dataclass, fields

    from carsearch.datasets import Record
    from carsearch.datasets.attributes import ATTRIBUTES, FILTER_FIELDS, attribute_fields
    from carsearch.embed.shards import STRING_FIELDS, ShardRows
    from carsearch.embed.store import EmbeddingSet
    from carsearch.index.store import Gallery
    from carsearch.search.searcher import Classification, Neighbor
    from carsearch.serve.writes import FIELDS

    for holder, after in (
        (Record, "label"),
        (ShardRows, "labels"),
        (EmbeddingSet, "labels"),
        (Gallery, "labels"),
        (Neighbor, "label"),
        (Classification, "note"),
    ):
        names = [f.name for f in fields(holder)]
        at = names.index(after) + 1
        assert names[at : at + len(ATTRIBUTES)] == list(ATTRIBUTES), (holder.__name__, names)
    assert set(ATTRIBUTES) <= set(STRING_FIELDS) and set(ATTRIBUTES) <= set(FIELDS)
    assert {f.name for f in FILTER_FIELDS} <= set(ATTRIBUTES)
    # The vectors are `vectors` wherever rows are held in memory (the shards' HDF5 dataset keeps its name).
    for holder in (ShardRows, EmbeddingSet):
        assert "vectors" in {f.name for f in fields(holder)}, holder.__name__
    # The decorator refuses a field to follow that the class does not have.
    with pytest.raises(TypeError, match="no field 'lable'"):

        @dataclass
        @attribute_fields("str", after="lable")
        class Typo:
            label: str
