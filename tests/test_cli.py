"""The command line, through click's CliRunner: --help everywhere, --json, one-sentence errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from carsearch.cli import cli
from tests.conftest import DEV


def _all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in group.commands.items():
        out.append((*prefix, name))
        if isinstance(cmd, click.Group):
            out.extend(_all_commands(cmd, (*prefix, name)))
    return out


@pytest.mark.parametrize("path", _all_commands(cli), ids=" ".join)
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_help_is_instant_without_heavy_imports() -> None:
    code = (
        "import sys; from carsearch.cli import cli; "
        "print(sorted(m for m in ('torch', 'faiss', 'fastapi') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_embed_json(small_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb"
    result = CliRunner().invoke(
        cli,
        [
            "-q",
            "embed",
            str(small_dataset),
            "--out",
            str(out),
            "--backbone",
            "efficientnet_lite0",
            "--shard-size",
            "10",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rows"] == 24 and summary["shards"] == 3 and summary["failed"] == {}
    assert summary["images_per_second"] > 0 and summary["out"] == str(out.resolve())
    assert summary["complete"] is True
    again = CliRunner().invoke(
        cli,
        [
            "embed",
            str(small_dataset),
            "--out",
            str(out),
            "--backbone",
            "efficientnet_lite0",
            "--shard-size",
            "10",
        ],
    )
    assert again.exit_code == 0 and "3 shards resumed" in again.stdout


def test_embed_refusal_is_one_sentence(small_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb"
    args = [
        "embed",
        str(small_dataset),
        "--out",
        str(out),
        "--backbone",
        "efficientnet_lite0",
        "--limit",
        "2",
    ]
    assert CliRunner().invoke(cli, args).exit_code == 0
    result = CliRunner().invoke(cli, [*args, "--crop", "pad"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and "--crop squash, not --crop pad" in result.stderr
    assert "leave out --crop" in result.stderr and "{" not in result.stderr  # the option, not two dicts
    assert "Traceback" not in result.output
    # Without --backbone the rerun takes the folder's (efficientnet_lite0), never resnet50's download.
    again = CliRunner().invoke(cli, ["embed", str(small_dataset), "--out", str(out), "--limit", "2"])
    assert again.exit_code == 0, again.output
    assert "with the settings it was made with: --backbone efficientnet_lite0" in again.stderr
    assert "(efficientnet_lite0," in again.stdout and "1 shards resumed" in again.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["embed", "/no/such/folder", "--out", "x"], "does not exist"),
        (["embed", str(DEV), "--out", "x", "--backbone", "alexnet"], "unknown backbone 'alexnet'"),
        (["embed", str(DEV), "--out", "x", "--format", "stanford"], "no devkit/cars_meta.mat"),
        (["embed", str(DEV), "--out", "x", "--device", "tpu"], "unknown device"),
        (["embed", str(DEV), "--out", "x", "--weights", "/no/such.pth"], "does not exist"),
    ],
)
def test_errors_are_one_sentence(args: list[str], message: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert result.stderr.count("\n") == 1


def test_a_parent_folder_is_not_read_as_classes(tmp_path: Path) -> None:
    """`embed PARENT_DIR`, whose sub-folders are two collections of their own: said in one sentence
    that names the collection to give instead, nothing written."""
    from tests.conftest import pick, write_csv_dataset

    write_csv_dataset(tmp_path / "parent" / "cars-a", pick([1], 2))
    write_csv_dataset(tmp_path / "parent" / "cars-b", pick([14], 2))
    result = CliRunner().invoke(cli, ["embed", str(tmp_path / "parent"), "--out", str(tmp_path / "emb")])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert "holds datasets, not one sub-folder per class: cars-a/ has labels.csv" in result.stderr
    assert f"carsearch embed {tmp_path / 'parent' / 'cars-a'} --out EMB_DIR" in result.stderr
    assert "--format folders" in result.stderr and not (tmp_path / "emb").exists()


def test_bad_option_values_are_usage_errors() -> None:
    for args in (
        ["embed", str(DEV), "--out", "x", "--workers", "many"],
        ["embed", str(DEV), "--out", "x", "--batch-size", "0"],
    ):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2 and "Invalid value" in result.output


def test_dataset_and_backbones_json() -> None:
    info = json.loads(CliRunner().invoke(cli, ["dataset", str(DEV), "--json"]).stdout)
    assert (info["format"], info["images"], info["classes"], info["makes"]) == ("csv", 5491, 196, 49)
    rows = json.loads(CliRunner().invoke(cli, ["backbones", "--json"]).stdout)
    # Each network's embedding width, as its architecture fixes it (not read back from the registry).
    dims = {r["name"]: r.get("dim") for r in rows}
    widths = {"resnet50": 2048, "efficientnet_lite0": 1280, "dinov2_vits14_reg": 384, "clip_vitb16": 512}
    assert {name: dims.get(name) for name in widths} == widths


def test_json_errors_are_one_json_document(tmp_path: Path) -> None:
    """With --json, a failure still prints one JSON document on stdout (error, exit_code); the sentence
    stays on stderr."""
    r = CliRunner().invoke(
        cli, ["index", "build", str(tmp_path / "none"), "--out", str(tmp_path / "x"), "--json"]
    )
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert doc["exit_code"] == 1 and "manifest.json" in doc["error"] and "manifest.json" in r.stderr
    r = CliRunner().invoke(cli, ["search", "--index", str(tmp_path), "q.jpg", "-k", "0", "--json"])
    assert r.exit_code == 2 and json.loads(r.stdout) == {
        "error": json.loads(r.stdout)["error"],
        "exit_code": 2,
    }
    assert "-k" in json.loads(r.stdout)["error"]
