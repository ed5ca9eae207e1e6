"""What every command shares: error handling, logging, --config, output, and the common options."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, TypeVar

import click

from carsearch import defaults
from carsearch.errors import CarsearchError, os_error_sentence

SettingsT = TypeVar("SettingsT")


def settings_from(cls: type[SettingsT], options: dict[str, Any], **fields_given: Any) -> SettingsT:
    """The settings dataclass `cls` made from the click options named like its fields (taken out of
    `options`, so what is left belongs to the command), plus `fields_given` for fields no option gives as
    it is. A command's options then travel as one object instead of one parameter each."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: options.pop(k) for k in list(options) if k in names}, **fields_given)


log = logging.getLogger("carsearch")

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110, "auto_envvar_prefix": "CARSEARCH"}


class Group(click.Group):
    """Turns errors a user can cause into one sentence and an exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        # A script that asked for --json gets one JSON document on stdout also when the command fails.
        wants_json = "--json" in [*getattr(ctx, "_protected_args", []), *ctx.args]
        try:
            try:
                return super().invoke(ctx)
            except CarsearchError as e:
                raise click.ClickException(str(e)) from None
            except OSError as e:  # a full disk, a read-only folder, an unreadable file: said, not traced
                raise click.ClickException(os_error_sentence(e)) from None
        except click.ClickException as e:
            if wants_json:
                click.echo(json.dumps({"error": e.format_message(), "exit_code": e.exit_code}))
            raise
        except KeyboardInterrupt:
            if wants_json:
                click.echo(json.dumps({"error": "interrupted", "exit_code": 130}))
            click.echo("interrupted; run the same command again to resume where it stopped.", err=True)
            sys.exit(130)


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    # faiss's loader reports which SIMD build it picked at INFO level: noise for users.
    logging.getLogger("faiss").setLevel(max(level, logging.WARNING))


def load_config_option(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value:
        from carsearch.config import load_config, to_default_map

        try:
            ctx.default_map = to_default_map(load_config(value), ctx.command)
        except CarsearchError as e:
            raise click.BadParameter(str(e)) from None
    return value


def emit(result: Any, as_json: bool, human: Callable[[Any], str]) -> None:
    """Print a result: one JSON document on stdout with --json, else a human summary."""
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        click.echo(human(result))


def device_options(f: Callable) -> Callable:
    """--device and --precision, as every command that runs the network takes them."""
    f = click.option(
        "--precision",
        default=defaults.PRECISION,
        show_default=True,
        type=click.Choice(defaults.PRECISIONS),
        help="auto: bf16 autocast where the hardware runs it natively (CUDA, AVX-512-BF16/AMX CPUs).",
    )(f)
    return click.option("--device", default=defaults.DEVICE, show_default=True, help="auto, cpu or cuda.")(f)


def runtime_option(f: Callable) -> Callable:
    """--runtime: what runs the network (embed/runtimes.py)."""
    return click.option(
        "--runtime",
        default=defaults.RUNTIME,
        show_default=True,
        type=click.Choice(defaults.RUNTIMES),
        help="auto: OpenVINO on the CPU when installed (the openvino extra; fastest there), else PyTorch; "
        "onnxruntime: ONNX Runtime on the CPU, fp32 (the onnxruntime extra). CARSEARCH_RUNTIME sets what "
        "auto means. Embeddings of every runtime agree.",
    )(f)


@contextmanager
def prefix_runtime(runtime: str, device: str) -> Iterator[None]:
    """train's and index build's --runtime: it reaches the cached-prefix step (train/activations.Prefix,
    whose runtime is `auto`) as CARSEARCH_RUNTIME, what `auto` means, for the command's duration. A
    runtime the machine cannot run is refused now, before any training."""
    if runtime == "auto":
        yield
        return
    from carsearch.embed.encoder import resolve_device
    from carsearch.embed.runtimes import ENV_RUNTIME, resolve_runtime

    resolve_runtime(runtime, resolve_device(device))
    before = os.environ.get(ENV_RUNTIME)
    os.environ[ENV_RUNTIME] = runtime
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV_RUNTIME, None)
        else:
            os.environ[ENV_RUNTIME] = before


def dataset_options(f: Callable) -> Callable:
    """--format, --labels and --split: how a dataset folder is read."""
    f = click.option(
        "--split",
        default="all",
        show_default=True,
        type=click.Choice(defaults.SPLITS),
        help="stanford layout: which split.",
    )(f)
    f = click.option(
        "--labels",
        type=click.Path(dir_okay=False),
        help="csv layout: labels file (default DATA_DIR/labels.csv).",
    )(f)
    return click.option(
        "--format",
        "format",
        default="auto",
        show_default=True,
        type=click.Choice(defaults.FORMATS),
        help="Dataset layout.",
    )(f)


def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")(f)


class FloatRange(click.FloatRange):
    """click's FloatRange that also refuses NaN (it passes every comparison, so `--temperature nan` ran
    and answered "nan% of the vote") and infinities where a bound is open-ended."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        import math

        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class Workers(click.ParamType):
    name = "auto|N"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | None:
        if value in (None, "auto"):
            return None
        try:
            n = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not 'auto' or a whole number", param, ctx)
        if n < 0:
            self.fail("must be 0 or more", param, ctx)
        return n


class Bytes(click.ParamType):
    """'4G', '512M', '1.5GiB', '1000000' -> bytes."""

    name = "SIZE"
    _units: ClassVar[dict[str, int]] = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        s = str(value).strip().upper().removesuffix("IB").removesuffix("B")
        try:
            n = float(s[:-1]) * self._units[s[-1]] if s and s[-1] in self._units else float(s)
        except (ValueError, KeyError):
            self.fail(f"{value!r} is not a size such as 512M or 4G", param, ctx)
        if n <= 0:
            self.fail("must be positive", param, ctx)
        return int(n)


WORKERS = Workers()
BYTES = Bytes()
