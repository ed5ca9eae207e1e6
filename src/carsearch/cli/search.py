"""`carsearch search` and `classify`: similar cars, and a make / model / year or "unknown model"."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from carsearch import defaults
from carsearch.cli.common import FloatRange, device_options, emit, json_option, log, runtime_option
from carsearch.datasets import attributes

if TYPE_CHECKING:
    from carsearch.search.filters import Filter


def filter_options(f: Callable) -> Callable:
    """One --NAME option per filterable field (datasets/attributes.FILTER_FIELDS): search and vote among
    matching indexed cars only. The command receives them as one `where` (a Filter, or None)."""

    fields = attributes.FILTER_FIELDS

    @functools.wraps(f)
    def command(*args: object, **kwargs: object) -> object:
        typed = {field.name: kwargs.pop(field.name) for field in fields}
        return f(*args, where=_where(typed), **kwargs)

    for field in reversed(fields):
        command = click.option(f"--{field.name}", field.name, help=field.help)(command)
    return command


def index_and_queries(f: Callable) -> Callable:
    """--index INDEX and the QUERIES (photos or folders of photos) of `search` and `classify`."""
    f = click.argument("queries", nargs=-1, required=True, type=click.Path())(f)
    return click.option(
        "--index", "index_dir", required=True, type=click.Path(file_okay=False), help="Index folder."
    )(f)


def _where(typed: dict[str, str | None]) -> Filter | None:
    from carsearch.search.filters import Filter

    return Filter.parse(**typed) or None


def _exit_if_any_failed(results: list) -> None:
    """Exit 1 when any query could not be answered (the output still carries every answer)."""
    if any(r.error for r in results):
        sys.exit(1)


def _human_search(results: list[dict]) -> str:
    out = []
    for r in results:
        out.append(r["query"])
        if r["error"]:
            out.append(f"   error: {r['error']}")
        if r.get("note"):
            out.append(f"   note: {r['note']}")
        for i, n in enumerate(r["neighbors"], 1):
            name = n.get("display") or n["label"] or "(unlabeled)"
            out.append(f"  {i:>3}. {n['score']:.3f}  {name:<40} {n['path']}  (id {n['id']})")
    return "\n".join(out)


@click.command()
@index_and_queries
@click.option(
    "-k",
    default=defaults.K_SEARCH,
    show_default=True,
    type=click.IntRange(1, defaults.MAX_K),
    help="Neighbours per query.",
)
@filter_options
@device_options
@runtime_option
@json_option
def search(
    index_dir: str,
    queries: tuple[str, ...],
    k: int,
    where: Filter | None,
    as_json: bool,
    **run_options: str,
) -> None:
    """Find the cars most similar to each query image (files or folders of images)."""
    from carsearch.search import Searcher, expand_queries

    searcher = Searcher.open(index_dir, **run_options)  # device, precision, runtime
    results = searcher.search(expand_queries(queries), k, where)
    emit([r.to_json() for r in results], as_json, _human_search)
    _say_runtime(searcher, as_json)
    _exit_if_any_failed(results)


def _say_runtime(searcher, as_json: bool) -> None:
    """Which runtime embedded the queries (on stderr, after the answers; -q or --json leave it out)."""
    if not as_json:
        enc = searcher.encoder
        version = enc.provenance()["runtime_version"]
        log.info("queries embedded by %s %s (%s, %s)", enc.runtime, version, enc.precision, enc.device)


def _human_classify(results: list[dict]) -> str:
    out = []
    for r in results:
        if r["error"]:
            out.append(f"{r['query']}: error: {r['error']}")
            continue
        name = r.get("display") or r["label"]
        if r["label"] is None and not r["neighbors"]:
            verdict = "no answer: no indexed car to vote"  # the note says why (a filter nothing passes)
        elif r["label"] is None:
            n, kind = len(r["neighbors"]), "" if r["level"] == "class" else f"{r['level']} "
            verdict = (
                f"no vote: none of its {n} nearest cars has a {kind}label (`carsearch search` lists them)"
            )
        elif r["unknown"]:
            # An unknown class is a car model never indexed.
            what = {"class": "model", "make": "make", "year": "year"}.get(r["level"], "model")
            verdict = f"unknown {what} (closest: {name}, {r['confidence']:.0%} of the vote; {r['reason']})"
        elif r.get("uncertain"):
            verdict = f"uncertain: {name} ({r['confidence']:.0%} of the vote; {r['reason']})"
        else:
            verdict = f"{name} ({r['confidence']:.0%} of the vote)"
        out.append(f"{r['query']}: {verdict}")
        if r["top5"]:
            votes = (f"{v.get('display') or v['label']} {v['share']:.0%}" for v in r["top5"])
            out.append("   votes: " + " | ".join(votes))
        if r.get("note"):  # "N neighbours voted" only when some did
            voted = f"{len(r['neighbors'])} neighbours voted; " if r["label"] is not None else ""
            out.append(f"   note: {voted}{r['note']}")
    return "\n".join(out)


@click.command()
@index_and_queries
@click.option(
    "-k",
    default=defaults.K_VOTE,
    show_default=True,
    type=click.IntRange(1, defaults.MAX_K),
    help="Neighbours that vote.",
)
@click.option(
    "--level",
    default=defaults.LEVEL,
    show_default=True,
    type=click.Choice((*defaults.LEVELS, *defaults.LEVEL_ALIASES)),
    help="Vote over whole class names (make model year), makes, or model years ('model' is class's old "
    "name).",
)
@click.option(
    "--temperature",
    default=defaults.TEMPERATURE,
    show_default=True,
    type=FloatRange(0, min_open=True),
    help="Vote weight exp(cosine / T) (DINO's kNN protocol).",
)
@click.option("--no-reject", is_flag=True, help="Never answer unknown, even below the threshold.")
@filter_options
@device_options
@runtime_option
@json_option
def classify(
    index_dir: str,
    queries: tuple[str, ...],
    k: int,
    level: str,
    temperature: float,
    no_reject: bool,
    where: Filter | None,
    as_json: bool,
    **run_options: str,
) -> None:
    """Label each query image by the weighted vote of its nearest indexed cars, or say "unknown model"."""
    from carsearch.search import Searcher, expand_queries

    searcher = Searcher.open(index_dir, **run_options)  # device, precision, runtime
    results = searcher.classify(
        expand_queries(queries), k, level, temperature, reject=not no_reject, where=where
    )
    emit([r.to_json() for r in results], as_json, _human_classify)
    _say_runtime(searcher, as_json)
    _exit_if_any_failed(results)
