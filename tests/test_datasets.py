"""Dataset readers on each layout, built in tmp folders from the real dev images and class names."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from carsearch.datasets import Record, detect_format, read_dataset
from carsearch.errors import CarsearchError
from tests.conftest import DEV, dev_class_names, pick, write_csv_dataset


def test_dev_folder_reads_as_csv() -> None:
    ds = read_dataset(DEV)
    assert ds.format == "csv"
    assert len(ds.records) == 5491
    assert len({r.label for r in ds.records}) == 196
    assert [r.path for r in ds.records] == sorted(r.path for r in ds.records)
    first = ds.records[0]
    assert first == Record("images/00001.jpg", "Audi TTS Coupe 2012", "Audi", "TTS Coupe", "2012", 14)


def test_csv_with_class_ids_and_classes_csv(tmp_path: Path) -> None:
    rows = pick([1, 2], 2)
    root = write_csv_dataset(tmp_path, rows, with_names=False)
    ds = read_dataset(root)
    assert ds.format == "csv"
    assert [r.label for r in ds.records] == [
        row["class_name"] for row in sorted(rows, key=lambda r: r["image"])
    ]
    assert ds.records[0].make in ("AM General", "Acura")


def test_csv_paths_relative_to_an_image_subfolder(tmp_path: Path) -> None:
    rows = pick([3], 2)
    write_csv_dataset(tmp_path, rows)
    with open(tmp_path / "labels.csv", "w", newline="") as f:  # Kaggle style: bare file names
        w = csv.writer(f)
        w.writerow(["fname", "class"])
        for r in rows:
            w.writerow([Path(r["image"]).name, r["class_name"]])
    ds = read_dataset(tmp_path, "csv")
    assert all(r.path.startswith("images/") for r in ds.records)
    assert all((tmp_path / r.path).is_file() for r in ds.records)


def test_csv_errors(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(CarsearchError, match="no image column"):
        read_dataset(tmp_path, "csv")
    with pytest.raises(CarsearchError, match="no labels file"):
        read_dataset(tmp_path, "csv", labels_file=tmp_path / "nope.csv")


def _folders(root: Path, names: dict[str, list[dict[str, str]]]) -> Path:
    for folder, rows in names.items():
        (root / folder).mkdir(parents=True)
        for row in rows:
            shutil.copyfile(DEV / row["image"], root / folder / Path(row["image"]).name)
    return root


def test_folders_layout_restores_slash_names(tmp_path: Path) -> None:
    ram = next(r for r in pick(list(range(1, 197)), 1) if "/" in r["class_name"])
    audi = pick([14], 2)
    root = _folders(tmp_path, {"Ram C-V Cargo Van Minivan 2012": [ram], "Audi TTS Coupe 2012": audi})
    (root / ".DS_Store").write_text("x")  # droppings are ignored
    ds = read_dataset(root)
    assert ds.format == "folders"
    labels = {r.label for r in ds.records}
    assert labels == {"Ram C/V Cargo Van Minivan 2012", "Audi TTS Coupe 2012"}
    ram_rec = next(r for r in ds.records if r.make == "Ram")
    assert (ram_rec.model, ram_rec.year) == ("C/V Cargo Van Minivan", "2012")


def test_vmmrdb_layout(tmp_path: Path) -> None:
    rows = pick([1, 2, 3], 2)
    root = _folders(
        tmp_path,
        {
            "honda_civic_2005": rows[:2],
            "mercedes benz_c230_2003": rows[2:4],
            "land_rover_range_rover_2010": rows[4:],
        },
    )
    assert detect_format(root) == "vmmrdb"
    ds = read_dataset(root)
    parts = {(r.make, r.model, r.year) for r in ds.records}
    assert parts == {
        ("honda", "civic", "2005"),
        ("mercedes benz", "c230", "2003"),
        ("land rover", "range rover", "2010"),
    }
    assert {r.label for r in ds.records} == {
        "honda_civic_2005",
        "mercedes benz_c230_2003",
        "land_rover_range_rover_2010",
    }


def test_vmmrdb_refuses_free_form_folders(tmp_path: Path) -> None:
    root = _folders(tmp_path, {"honda_civic_2005": pick([1], 1), "Audi TTS Coupe 2012": pick([14], 1)})
    assert detect_format(root) == "folders"
    with pytest.raises(CarsearchError, match="not named make_model_year"):
        read_dataset(root, "vmmrdb")


def test_unlabeled_layout_recurses(tmp_path: Path) -> None:
    rows = pick([5], 3)
    for i, row in enumerate(rows):
        shutil.copyfile(DEV / row["image"], tmp_path / f"car{i}.jpg")
    (tmp_path / "more").mkdir()
    (tmp_path / "notes.txt").write_text("not an image")
    assert detect_format(tmp_path) == "unlabeled"
    shutil.copyfile(DEV / rows[0]["image"], tmp_path / "more" / "x.JPG")
    ds = read_dataset(tmp_path, "unlabeled")
    assert [r.path for r in ds.records] == ["car0.jpg", "car1.jpg", "car2.jpg", "more/x.JPG"]
    assert not ds.labeled and all(r.label == "" for r in ds.records)


def _stanford_devkit(root: Path) -> list[dict[str, str]]:
    names = dev_class_names()
    rows = pick([1, 14, 151], 2)
    (root / "devkit").mkdir(parents=True)
    scipy.io.savemat(
        root / "devkit" / "cars_meta.mat", {"class_names": np.array(names, dtype=object).reshape(1, -1)}
    )
    fields = [
        ("bbox_x1", "O"),
        ("bbox_y1", "O"),
        ("bbox_x2", "O"),
        ("bbox_y2", "O"),
        ("class", "O"),
        ("fname", "O"),
    ]
    for split, part in (("train", rows[:4]), ("test", rows[4:])):
        (root / f"cars_{split}").mkdir()
        ann = np.zeros((len(part),), dtype=fields)
        for i, row in enumerate(part):
            fname = Path(row["image"]).name
            shutil.copyfile(DEV / row["image"], root / f"cars_{split}" / fname)
            ann[i] = (
                np.array([[5]]),
                np.array([[6]]),
                np.array([[60]]),
                np.array([[40]]),
                np.array([[int(row["class_id"])]]),
                np.array([fname]),
            )
        mat = (
            root / "devkit" / "cars_train_annos.mat"
            if split == "train"
            else root / "cars_test_annos_withlabels.mat"
        )
        scipy.io.savemat(mat, {"annotations": ann.reshape(1, -1)})
    return rows


def test_stanford_devkit(tmp_path: Path) -> None:
    rows = _stanford_devkit(tmp_path)
    assert detect_format(tmp_path) == "stanford"
    ds = read_dataset(tmp_path)
    assert len(ds.records) == 6
    assert {r.label for r in ds.records} == {r["class_name"] for r in rows}
    train = read_dataset(tmp_path, "stanford", split="train")
    assert len(train.records) == 4 and all(r.path.startswith("cars_train/") for r in train.records)
    test = read_dataset(tmp_path, "stanford", split="test", bbox_crop=True)
    assert len(test.records) == 2 and all(r.bbox == (5, 6, 60, 40) for r in test.records)
    assert all(r.bbox is None for r in ds.records)


def test_unknown_format_and_missing_root(tmp_path: Path) -> None:
    with pytest.raises(CarsearchError, match="unknown dataset format"):
        read_dataset(tmp_path, "coco")
    with pytest.raises(CarsearchError, match="does not exist"):
        read_dataset(tmp_path / "missing")
    with pytest.raises(CarsearchError, match="found no images"):
        read_dataset(tmp_path)


def test_records_fingerprint_changes_with_labels(tmp_path: Path) -> None:
    rows = pick([1], 2)
    root = write_csv_dataset(tmp_path, rows)
    before = read_dataset(root).records_sha256()
    assert read_dataset(root).records_sha256() == before
    text = (root / "labels.csv").read_text().replace("AM General Hummer SUV 2000", "Renamed 2000")
    (root / "labels.csv").write_text(text)
    assert read_dataset(root).records_sha256() != before


def test_labels_are_unicode_normalised(tmp_path: Path) -> None:
    """One class written composed and decomposed (as macOS writes folder names) is one class, and a
    filter typed either way, in any case, finds it."""
    import unicodedata

    from carsearch.search.filters import Filter

    composed = "Citroën C4 Picasso 2012"
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    rows = pick([14], 4)
    root = tmp_path / "data"
    for i, name in enumerate((composed, decomposed)):
        (root / name).mkdir(parents=True)
        for row in rows[2 * i : 2 * i + 2]:
            shutil.copyfile(DEV / row["image"], root / name / Path(row["image"]).name)
    ds = read_dataset(root, "folders")
    assert {r.label for r in ds.records} == {composed} and {r.class_id for r in ds.records} == {1}
    assert {r.make for r in ds.records} == {"Citroën"} and len(ds.records) == 4
    # The file paths keep the file system's spelling, so they still open.
    assert all((root / r.path).is_file() for r in ds.records)
    # Filters compare NFC + casefold, also against stored labels written before normalisation.
    make = np.array([unicodedata.normalize("NFD", "Citroën"), "Citroën", "Audi"])
    model = np.array(["C4 Picasso"] * 3)
    year = np.array(["2012"] * 3)
    for typed in ("Citroën", decomposed.split()[0], "CITROËN", "citroën"):
        keep = Filter.parse(make=typed).mask({"make": make, "model": model, "year": year})
        assert keep.tolist() == [True, True, False], typed
    assert Record("a.jpg", label=decomposed).label == composed


def test_splits_given_as_classes_are_refused_when_guessed(tmp_path: Path) -> None:
    """A parent of train/ and test/ (each with class folders) is not two classes named "train" and "test"
    with an empty model and year: the guess is refused, naming a folder to give; --format folders keeps
    the reading on purpose."""
    rows = pick([1, 14], 2)
    for split, part in (("train", rows[0::2]), ("test", rows[1::2])):
        _folders(tmp_path / "cars" / split, {r["class_name"]: [r] for r in part})
    with pytest.raises(CarsearchError) as e:
        read_dataset(tmp_path / "cars")
    msg = str(e.value)
    assert "2 classes named after its sub-folders ('test', 'train')" in msg and "make / model / year" in msg
    assert str(tmp_path / "cars" / "test") in msg and "--format folders" in msg
    assert {r.label for r in read_dataset(tmp_path / "cars", "folders").records} == {"test", "train"}
    assert read_dataset(tmp_path / "cars" / "train").format == "folders"  # the folder it pointed to


def test_class_names_without_make_model_year_are_said(tmp_path: Path, caplog) -> None:
    """Free-form class folders with photos of their own are a collection (read), but the note says that
    their names give no make / model / year; with --format folders nothing is said."""
    import logging

    rows = pick([1, 14], 2)
    root = _folders(tmp_path / "lot", {"sedans": rows[:2], "suvs": rows[2:]})
    with caplog.at_level(logging.WARNING, logger="carsearch"):
        ds = read_dataset(root)
    assert ds.format == "folders" and {r.label for r in ds.records} == {"sedans", "suvs"}
    assert "give no make / model / year" in caplog.text and "'sedans', 'suvs'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="carsearch"):
        read_dataset(root, "folders")
    assert not caplog.text


def test_dataset_command_lists_class_ids(tmp_path: Path) -> None:
    """Issue 20, item 9: `carsearch dataset` lists each class's id (what bench --known-classes and
    --test-classes take), with its name and image count; a VMMRdb folder's ids number its folder names."""
    import json

    from click.testing import CliRunner

    from carsearch.cli import cli

    rows = pick([14, 1, 50], 3)
    root = _folders(
        tmp_path / "vmmrdb",
        {"honda_civic_2005": rows[:3], "audi_tts coupe_2012": rows[3:5], "mercedes benz_c230_2003": rows[5:]},
    )
    info = json.loads(CliRunner().invoke(cli, ["dataset", str(root), "--json"]).stdout)
    assert info["class_ids"] == [
        {"id": 1, "label": "audi_tts coupe_2012", "images": 2},
        {"id": 2, "label": "honda_civic_2005", "images": 3},
        {"id": 3, "label": "mercedes benz_c230_2003", "images": 4},
    ]
    assert {(c["id"], c["label"]) for c in info["class_ids"]} == {
        (r.class_id, r.label) for r in read_dataset(root).records
    }
    human = CliRunner().invoke(cli, ["dataset", str(root)]).stdout
    assert "class ids (bench --known-classes / --test-classes take them):" in human
    assert "      2  honda_civic_2005 (3 images)" in human
    stanford = json.loads(CliRunner().invoke(cli, ["dataset", str(DEV), "--json"]).stdout)["class_ids"]
    assert len(stanford) == 196 and stanford[13] == {"id": 14, "label": "Audi TTS Coupe 2012", "images": 29}
