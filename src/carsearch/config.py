"""Settings files (configs/*.toml): one table per command, keys named after the command's options.

Precedence is click's own: a command-line flag beats a CARSEARCH_* environment variable, which beats
the file, which beats the built-in default. Keys are checked against the commands' options, so a typo in
a config file is an error that names it, not a silently ignored setting.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import click

from carsearch.errors import CarsearchError


def load_config(path: str | Path) -> dict[str, Any]:
    """Parse a TOML settings file."""
    path = Path(path).expanduser()
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise CarsearchError(f"config file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as e:
        raise CarsearchError(f"config file {path} is not valid TOML: {e}.") from e
    except UnicodeDecodeError as e:
        raise CarsearchError(f"config file {path} is not UTF-8 text ({e.reason}); save it as UTF-8.") from e
    except OSError as e:
        raise CarsearchError(f"cannot read config file {path} ({e.strerror or e}).") from e


def option_names(command: click.Command) -> dict[str, click.Parameter]:
    """A command's options by the name a user sees (`--batch-size` -> batch_size, `--format` -> format)."""
    names: dict[str, click.Parameter] = {}
    for p in command.params:
        if not isinstance(p, click.Option) or p.name in ("help", "as_json"):
            continue
        longs = [o for o in p.opts if o.startswith("--")]
        names[(longs[0][2:] if longs else p.name or "").replace("-", "_")] = p
    return names


def to_default_map(config: dict[str, Any], command: click.Command, where: str = "") -> dict[str, Any]:
    """Check `config` against the options of `command` (and its sub-commands); return click's default_map."""
    out: dict[str, Any] = {}
    params = option_names(command)
    subcommands = getattr(command, "commands", {})
    # A group with a default sub-command (`train` is `train images`) takes that command's options too.
    default = subcommands.get(getattr(command, "default_cmd_name", None) or "")
    for key, value in config.items():
        name = key.replace("-", "_")
        sub = subcommands.get(key) or subcommands.get(name)
        here = f"{where}.{key}" if where else key
        if sub is not None and isinstance(value, dict):
            out.setdefault(sub.name, {}).update(to_default_map(value, sub, here))
        elif default is not None and name in option_names(default) and not isinstance(value, dict):
            out.setdefault(default.name, {}).update(to_default_map({key: value}, default, here))
        elif name in params and not isinstance(value, dict):
            param = params[name]
            if getattr(param, "multiple", False) and not isinstance(value, list):
                value = [value]
            out[param.name] = value
        else:
            known = sorted([*params, *subcommands])
            raise CarsearchError(
                f"unknown setting {here!r} in the config file; known here: {', '.join(known)}."
            )
    return out
