"""`carsearch search` and `classify`: similar cars, and a make / model / year or "unknown model"."""

from __future__ import annotations

import sys

import click

from carsearch import defaults
from carsearch.cli.common import device_options, emit, json_option


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
        for i, n in enumerate(r["neighbors"], 1):
            out.append(
                f"  {i:>3}. {n['score']:.3f}  {n['label'] or '(unlabeled)':<40} {n['path']}  (id {n['id']})"
            )
    return "\n".join(out)


@click.command()
@click.option("--index", "index_dir", required=True, type=click.Path(file_okay=False), help="Index folder.")
@click.argument("queries", nargs=-1, required=True, type=click.Path())
@click.option(
    "-k",
    default=defaults.K_SEARCH,
    show_default=True,
    type=click.IntRange(1, defaults.MAX_K),
    help="Neighbours per query.",
)
@device_options
@json_option
def search(
    index_dir: str, queries: tuple[str, ...], k: int, device: str, precision: str, as_json: bool
) -> None:
    """Find the cars most similar to each query image (files or folders of images)."""
    from carsearch.search import Searcher, expand_queries

    searcher = Searcher.open(index_dir, device, precision)
    results = searcher.search(expand_queries(queries), k)
    emit([r.to_json() for r in results], as_json, _human_search)
    _exit_if_any_failed(results)


def _human_classify(results: list[dict]) -> str:
    out = []
    for r in results:
        if r["error"]:
            out.append(f"{r['query']}: error: {r['error']}")
            continue
        if r["label"] is None:
            verdict = "no labelled neighbours"
        elif r["unknown"]:
            verdict = f"unknown model (closest: {r['label']}, {r['confidence']:.0%} of the vote)"
        else:
            verdict = f"{r['label']} ({r['confidence']:.0%} of the vote)"
        out.append(f"{r['query']}: {verdict}")
        if r["top5"]:
            out.append("   votes: " + " | ".join(f"{v['label']} {v['share']:.0%}" for v in r["top5"]))
    return "\n".join(out)


@click.command()
@click.option("--index", "index_dir", required=True, type=click.Path(file_okay=False), help="Index folder.")
@click.argument("queries", nargs=-1, required=True, type=click.Path())
@click.option(
    "-k",
    default=defaults.K_VOTE,
    show_default=True,
    type=click.IntRange(1, defaults.MAX_K),
    help="Neighbours that vote.",
)
@click.option(
    "--level",
    default="model",
    show_default=True,
    type=click.Choice(defaults.LEVELS),
    help="Vote over full class names (make model year), makes, or model years.",
)
@click.option(
    "--temperature",
    default=defaults.TEMPERATURE,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Vote weight exp(cosine / T) (DINO's kNN protocol).",
)
@click.option("--no-reject", is_flag=True, help="Never answer unknown, even below the threshold.")
@device_options
@json_option
def classify(
    index_dir: str,
    queries: tuple[str, ...],
    k: int,
    level: str,
    temperature: float,
    no_reject: bool,
    device: str,
    precision: str,
    as_json: bool,
) -> None:
    """Label each query image by the weighted vote of its nearest indexed cars, or say "unknown model"."""
    from carsearch.search import Searcher, expand_queries

    searcher = Searcher.open(index_dir, device, precision)
    results = searcher.classify(expand_queries(queries), k, level, temperature, reject=not no_reject)
    emit([r.to_json() for r in results], as_json, _human_classify)
    _exit_if_any_failed(results)
