"""`carsearch bench`: the evaluation protocols and index types on one embedding folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from carsearch import defaults
from carsearch.cli.common import FloatRange, emit, json_option, settings_from


def _human_bench(r: dict) -> str:
    lines = [f"report: {r['out']}/report.md ({r['seconds']} s)"]
    if r.get("class_split", {}).get("note"):
        lines.append(f"  classes: {r['class_split']['note']}")
    for f, c in (r.get("closed") or {}).items():
        m = c["class"]
        lines.append(
            f"  {f:<28} top-1 {m['top1']:.1%}  top-5 {m['top5']:.1%}  hit@1 {m['hit1']:.1%}  "
            f"hit@5 {m['hit5']:.1%}"
        )
    if r.get("zeroshot"):
        z = r["zeroshot"]
        lines.append("  zero-shot " + "  ".join(f"R@{k} {z[f'recall@{k}']:.1%}" for k in (1, 2, 4, 8)))
    if r.get("openset"):
        o = r["openset"]
        lines.append(
            f"  open set AUROC {o['auroc']:.3f}  FPR@95%TPR {o['fpr@95tpr']:.1%}  "
            f"open-set accuracy {o['open_set_accuracy']:.1%}"
        )
    for f, x in (r.get("index") or {}).items():
        lines.append(
            f"  {f:<28} 10-recall@10 {x['10-recall@10']:.3f}  {x['qps_batched']:,.0f} QPS batched  "
            f"p99 {x['p99_ms']:.2f} ms  {x['memory_bytes'] / 2**20:.1f} MiB"
        )
    for f, why in (r.get("index_left_out") or {}).items():
        lines.append(f"  {f:<28} left out: {why}")
    if r.get("recommendation"):
        rec = r["recommendation"]
        lines.append(f"recommended: {rec['factory']}: {rec['why']}")
    return "\n".join(lines)


@click.command()
@click.argument("emb_dir", type=click.Path(file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Report folder.")
@click.option(
    "--factory",
    "factories",
    multiple=True,
    help="Index type to compare (repeat); default: Flat, HNSW32, IVF-Flat, IVF-PQ, OPQ+IVF-PQ, less those "
    "the gallery has too few vectors to train (named in the report).",
)
@click.option(
    "--protocol",
    default="closed,zeroshot,openset,index",
    show_default=True,
    help="Comma-separated: closed, zeroshot, openset, index.",
)
@click.option(
    "--k",
    "k",
    default=defaults.K_VOTE,
    show_default=True,
    type=click.IntRange(1, defaults.MAX_K),
    help="Voting neighbours.",
)
@click.option(
    "--temperature", default=defaults.TEMPERATURE, show_default=True, type=FloatRange(0, min_open=True)
)
@click.option(
    "--seed",
    default=defaults.SEED,
    show_default=True,
    type=int,
    help="Seed of the gallery / query split, and of the class halves where Cars196's do not fit.",
)
@click.option(
    "--gallery-fraction",
    default=defaults.GALLERY_FRACTION,
    show_default=f"{defaults.GALLERY_FRACTION:.3g}",
    type=FloatRange(0, 1, min_open=True, max_open=True),
    help="Share of each class in the gallery.",
)
@click.option("--classes", help="Only these class ids take part, e.g. 1-98 (default: all).")
@click.option(
    "--known-classes",
    help="openset: class ids in the gallery (`carsearch dataset` lists them); default: "
    f"{defaults.KNOWN_CLASSES} (Cars196) where the collection's classes fit it, else a seeded half of them; "
    "with --test-classes alone, the other classes.",
)
@click.option(
    "--test-classes",
    help=f"zeroshot: class ids queried; default: {defaults.TEST_CLASSES} (Cars196) where they fit, else the "
    "half of the classes that --known-classes leaves.",
)
@click.option("--openset-k", default=defaults.OPENSET_K, show_default=True, type=click.IntRange(1))
@click.option(
    "--target-recall",
    default=defaults.TARGET_RECALL,
    show_default=True,
    type=FloatRange(0, 1, min_open=True),
)
@click.option(
    "--max-queries", type=click.IntRange(1), help="Time and score at most this many held-out queries."
)
@click.option(
    "--peers/--no-peers",
    default=True,
    show_default=True,
    help="Also measure hnswlib and numpy / torch brute force.",
)
@click.option("--sweep/--no-sweep", default=True, show_default=True, help="Recall-vs-QPS curves.")
@click.option(
    "--timing-seconds",
    default=defaults.BENCH_TIMING_SECONDS,
    show_default=True,
    type=FloatRange(defaults.BENCH_MIN_TIMING_SECONDS, defaults.BENCH_MAX_TIMING_SECONDS),
    help="Time each batched speed figure for at least this long, best of 3 (curves' points 0.4 of it): "
    "shorter benches are noisier.",
)
@click.option("--plots/--no-plots", default=True, show_default=True)
@json_option
def bench(
    emb_dir: str, out: str, factories: tuple[str, ...], protocol: str, as_json: bool, **options: Any
) -> None:
    """Benchmark index types and the closed-set, zero-shot and open-set protocols on EMB_DIR.

    Writes report.json, report.md and PNG plots to --out; --json prints report.json.
    """
    from carsearch.bench.runner import BenchSettings, run_bench

    settings = settings_from(
        BenchSettings,
        options,
        factories=list(factories),
        protocols=tuple(p.strip() for p in protocol.split(",") if p.strip()),
    )
    report = run_bench(emb_dir, out, settings)
    emit({**report, "out": str(Path(out).resolve())}, as_json, _human_bench)
