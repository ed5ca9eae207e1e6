"""Answers name classes as a person reads them: the prediction, each vote and each neighbour, in the JSON
and in the CLI's words, with the raw class kept in `label` (issue 20 item 4)."""

from __future__ import annotations

from pathlib import Path

from carsearch.datasets.records import display_name
from carsearch.embed.settings import EmbedJob
from carsearch.index.build import build_index
from carsearch.index.settings import IndexSettings
from carsearch.search import Searcher
from tests.conftest import write_class_folders

CLASSES = {"am general_hummer_2000": 1, "bmw_m3_2012": 34, "land rover_range rover_2012": 154}
SHOWN = {
    "am general_hummer_2000": "AM General Hummer 2000",
    "bmw_m3_2012": "BMW M3 2012",
    "land rover_range rover_2012": "Land Rover Range Rover 2012",
}


def test_lower_case_names_spell_known_makes_as_their_makers_do() -> None:
    assert display_name("am general", "hummer", "2000") == "AM General Hummer 2000"
    assert display_name("bmw", "m3", "2012") == "BMW M3 2012"
    assert display_name("gmc", "sierra", "2010") == "GMC Sierra 2010"
    assert display_name("mercedes-benz", "c230", "2003") == "Mercedes-Benz C230 2003"
    assert display_name("land rover", "range rover", "2012") == "Land Rover Range Rover 2012"
    # Model words: codes and abbreviations in capitals, words title-cased, "328i" kept.
    assert display_name("audi", "tts", "2012") == "Audi TTS 2012"
    assert display_name("volvo", "xc90", "2008") == "Volvo XC90 2008"
    assert display_name("ford", "f-150", "2005") == "Ford F-150 2005"
    assert display_name("cadillac", "srx", "2010") == "Cadillac SRX 2010"
    assert display_name("bmw", "328i", "2009") == "BMW 328i 2009"
    assert display_name("saturn", "sky", "2007") == "Saturn Sky 2007"
    assert display_name("ford", "crown victoria", "2003") == "Ford Crown Victoria 2003"
    assert display_name("am general", "", "") == "AM General"
    assert display_name("", "", "2012") == "2012"
    assert display_name("", "", "") == ""
    # Names with capitals of their own stay as written.
    assert display_name("AM General", "Hummer SUV", "2000") == "AM General Hummer SUV 2000"
    assert display_name("smart", "fortwo Convertible", "2012") == "smart fortwo Convertible 2012"


def test_votes_and_neighbours_carry_display_names(tmp_path: Path) -> None:
    from carsearch.cli.search import _human_classify, _human_search
    from carsearch.embed import embed_dataset

    root = write_class_folders(tmp_path / "vmmrdb", CLASSES, 3)
    embed_dataset(EmbedJob(root, tmp_path / "emb", backbone="efficientnet_lite0", workers=0), progress=False)
    build_index([tmp_path / "emb"], tmp_path / "idx", IndexSettings(factory="Flat", calibrate=False))
    s = Searcher.open(tmp_path / "idx")
    photo = sorted((root / "am general_hummer_2000").iterdir())[0]

    r = s.classify([photo], k=9)[0]  # every indexed photo votes: all three classes are in the vote
    assert r.label == "am general_hummer_2000" and r.display == "AM General Hummer 2000"
    assert {v.label for v in r.top5} == set(CLASSES)
    assert all(v.display == SHOWN[v.label] for v in r.top5)
    assert all(n.display == SHOWN[n.label] for n in r.neighbors)
    answer = r.to_json()
    assert answer["top5"][0]["display"] == "AM General Hummer 2000"
    assert answer["neighbors"][0]["display"] == SHOWN[answer["neighbors"][0]["label"]]

    makes = s.classify([photo], k=9, level="make")[0]
    assert {v.display for v in makes.top5} == {"AM General", "BMW", "Land Rover"}

    # The CLI says the names a person reads; a raw class shows only inside a path ("bmw_m3_2012/...").
    for text in (_human_classify([answer]), _human_search([x.to_json() for x in s.search([photo], k=9)])):
        assert "AM General Hummer 2000" in text and "BMW M3 2012" in text, text
        assert not any(f"{raw} " in text for raw in CLASSES), text
