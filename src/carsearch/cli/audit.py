"""`carsearch audit`: duplicates, leakage, label conflicts, likely mislabelled photos, outliers."""

from __future__ import annotations

from typing import Any

import click

from carsearch import defaults
from carsearch.cli.common import FloatRange, emit, json_option, settings_from


def _human(r: dict) -> str:
    s = r["summary"]
    text = (
        f"{s['images']} photos audited in {r['seconds']} s (threshold {r['settings']['threshold']}, "
        f"{r['settings']['search']}):\n"
        f"  exact duplicates: {s['exact_duplicate_groups']} groups ({s['exact_duplicate_images']} photos), "
        f"{s.get('exact_duplicate_conflicts', 0)} with different labels\n"
        f"  near-duplicates:  {s['near_duplicate_groups']} groups ({s['near_duplicate_images']} photos), "
        f"{s['label_conflicts']} with different labels\n"
        f"  likely mislabelled: {s['likely_mislabelled']}; outliers: {s['outliers']}; too few examples to "
        f"judge: {s.get('too_few_examples_to_judge', 0)}\n"
    )
    if "leaked_queries" in s:
        text += f"  leakage: {s['leaked_queries']} photos of the second folder ({s['leakage_rate']:.1%})\n"
    lists = ", ".join(r["id_lists"].values())
    return text + (
        f"report: {r['out']}/report.md, page: {r['out']}/index.html\n"
        f"id lists (id<TAB>path, for index build --exclude): {lists}"
    )


@click.command()
@click.argument("emb_dir", type=click.Path(file_okay=False))
@click.argument("queries_dir", required=False, type=click.Path(file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Folder for the report.")
@click.option(
    "--threshold",
    type=FloatRange(0, 1, min_open=True),
    help="Cosine similarity from which two photos are near-duplicates without a look at them; below it "
    "pairs are confirmed by their photos' local features and pixels (measured: docs/benchmarks.md). "
    f"[default: {defaults.NEAR_DUPLICATE_THRESHOLD_CONFIRMED} with local features, "
    f"{defaults.NEAR_DUPLICATE_THRESHOLD} with --no-local-features]",
)
@click.option(
    "--k",
    "k",
    default=defaults.AUDIT_VOTE_K,
    show_default=True,
    type=click.IntRange(1),
    help="Neighbours that vote on each photo's label (the mislabel score).",
)
@click.option(
    "--outlier-k",
    default=defaults.AUDIT_OUTLIER_K,
    show_default=True,
    type=click.IntRange(1),
    help="Outlier score: similarity to this neighbour.",
)
@click.option(
    "--exact/--approximate",
    default=None,
    help=f"Exact search (default up to {defaults.AUDIT_EXACT_LIMIT:,} photos) or IVF above.",
)
@click.option(
    "--top",
    default=defaults.AUDIT_LIST,
    show_default=True,
    type=click.IntRange(1),
    help="Photos listed per ranked section, and groups shown per section of the page.",
)
@click.option("--no-page", is_flag=True, help="Skip index.html and its thumbnails.")
@click.option(
    "--no-local-features",
    is_flag=True,
    help="Find near-duplicates by cosine alone: skip reading the photos to confirm edited copies "
    "(re-posted, cropped, recompressed, colour-shifted) below --threshold by their local features.",
)
@json_option
def audit(
    emb_dir: str,
    queries_dir: str | None,
    out: str,
    no_page: bool,
    no_local_features: bool,
    as_json: bool,
    **options: Any,
) -> None:
    """Audit EMB_DIR: exact and near-duplicate photos, near-duplicates with different labels, photos whose
    neighbours vote against their label, outliers; with QUERIES_DIR, its photos that leak into EMB_DIR.

    Writes report.json, report.md, index.html and id lists for `index build --exclude` into --out.
    """
    from pathlib import Path

    from carsearch.audit.run import audit as run_audit
    from carsearch.audit.settings import AuditSettings

    settings = settings_from(AuditSettings, options, page=not no_page, local_features=not no_local_features)
    report = run_audit(emb_dir, out, queries_dir, settings)
    summary = {
        "out": str(Path(out).resolve()),
        "seconds": report["seconds"],
        "settings": report["settings"],
        "summary": report["summary"],
        "id_lists": report["id_lists"],
    }
    emit(summary, as_json, _human)
