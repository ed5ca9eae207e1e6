"""Settings files: the shipped defaults match the code, unknown keys are refused, precedence holds."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from carsearch.cli import cli
from carsearch.config import load_config, option_names, to_default_map
from carsearch.errors import CarsearchError
from tests.conftest import REPO


def _command(path: str) -> click.Command:
    cmd: click.Command = cli
    for part in path.split("."):
        cmd = cmd.commands[part]  # type: ignore[attr-defined]
    return cmd


def _flatten(table: dict, prefix: str = "") -> dict[str, dict]:
    out = {}
    for key, value in table.items():
        if isinstance(value, dict) and all(not isinstance(v, dict) for v in value.values()):
            out[prefix + key] = value
        elif isinstance(value, dict):
            out.update(_flatten(value, prefix + key + "."))
    return out


def test_default_toml_matches_the_cli_defaults() -> None:
    with open(REPO / "configs" / "default.toml", "rb") as f:
        config = tomllib.load(f)
    for path, table in _flatten(config).items():
        params = option_names(_command(path))
        for key, value in table.items():
            assert params[key].default == value, f"{path}.{key}: file {value!r}, code {params[key].default!r}"


@pytest.mark.parametrize("name", ["default.toml", "stanford-cars.toml", "vmmrdb.toml"])
def test_shipped_configs_are_valid(name: str) -> None:
    to_default_map(load_config(REPO / "configs" / name), cli)


def test_unknown_setting_is_named(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("[embed]\nbackbone = 'resnet50'\nbatchsize = 8\n")
    with pytest.raises(CarsearchError, match=r"unknown setting 'embed\.batchsize'.*batch_size"):
        to_default_map(load_config(tmp_path / "c.toml"), cli)
    (tmp_path / "bad.toml").write_text("[embed\n")
    with pytest.raises(CarsearchError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
    result = CliRunner().invoke(cli, ["--config", str(tmp_path / "c.toml"), "embed", "--help"])
    assert result.exit_code == 2 and "batchsize" in result.output


def test_train_settings_of_the_one_train_command_still_apply() -> None:
    """`train` became `train images | train head`: a [train] table and CARSEARCH_TRAIN_* variables still
    set `train images` (the command it was), [train.head] sets the head."""
    config = {"train": {"epochs": 3, "head": {"epochs": 9}, "images": {"views": 2}}}
    expected = {"train": {"images": {"epochs": 3, "views": 2}, "head": {"epochs": 9}}}
    assert to_default_map(config, cli) == expected
    # The run says its settings before it reads the (missing) folder.
    for words in (["train"], ["train", "images"]):
        env = {"CARSEARCH_TRAIN_EPOCHS": "7"}
        r = CliRunner().invoke(cli, [*words, "/nonexistent", "--out", "/nonexistent/o"], env=env)
        assert r.exit_code == 1 and "epochs 7," in r.stderr, r.output


def _crop_used(small_dataset: Path, out: Path, args: list[str], env: dict[str, str]) -> str:
    result = CliRunner().invoke(
        cli,
        [
            *args[:2],
            "embed",
            str(small_dataset),
            "--out",
            str(out),
            "--backbone",
            "efficientnet_lite0",
            "--weights",
            "none",
            "--limit",
            "1",
            "--json",
            *args[2:],
        ],
        env=env,
    )
    assert result.exit_code == 0, result.output
    return json.loads((out / "manifest.json").read_text())["provenance"]["preprocessing"]["crop"]


def test_precedence_flag_env_file_default(small_dataset: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[embed]\ncrop = 'center'\n")
    base = ["--config", str(cfg)]
    assert _crop_used(small_dataset, tmp_path / "a", ["-q", "-q"], {}) == "squash"  # built-in
    assert _crop_used(small_dataset, tmp_path / "b", [*base], {}) == "center"  # file
    assert _crop_used(small_dataset, tmp_path / "c", [*base], {"CARSEARCH_EMBED_CROP": "pad"}) == "pad"  # env
    flag = [*base, "--crop", "squash"]
    assert (
        _crop_used(small_dataset, tmp_path / "d", flag, {"CARSEARCH_EMBED_CROP": "pad"}) == "squash"
    )  # flag
