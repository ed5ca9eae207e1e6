"""report.md of an audit: the summary and the first groups and photos of each section."""

from __future__ import annotations

from carsearch.index.auto import human_bytes

SHOWN = 10

# The summary's keys in words, in the order the report gives them (report.json keeps the keys).
SUMMARY_WORDS = {
    "images": "photos audited",
    "labelled": "of them labelled",
    "exact_duplicate_groups": "groups of exact duplicates (same file bytes)",
    "exact_duplicate_images": "photos in those groups",
    "exact_duplicate_conflicts": "of those groups, with different labels",
    "near_duplicate_pairs": "near-duplicate pairs (byte-identical files counted once)",
    "edited_copy_pairs": "of them edited copies, found by local features",
    "edited_copies_not_checked": "edited copies not checked",
    "near_duplicate_groups": "near-duplicate groups",
    "near_duplicate_images": "photos in those groups",
    "label_conflicts": "near-duplicate groups with different labels",
    "likely_mislabelled": "likely mislabelled photos",
    "too_few_examples_to_judge": "labelled photos with too few examples to judge",
    "outliers": "outliers",
    "leaked_queries": "photos of the second folder with a near-duplicate in the first",
    "leakage_rate": "share of the second folder that leaks",
}


def summary_rows(summary: dict) -> list[tuple[str, str]]:
    """(words, value) for each entry of an audit's summary."""
    return [
        (
            SUMMARY_WORDS.get(key, key.replace("_", " ")),
            f"{value:.1%}"
            if key == "leakage_rate"
            else f"{value:,}"
            if isinstance(value, int)
            else str(value),
        )
        for key, value in summary.items()
    ]


def _who(m: dict) -> str:
    return f"`{m['path']}` (id {m['id']}, {m['label'] or 'no label'})"


def markdown(r: dict) -> str:
    s, st = r["summary"], r["settings"]
    lines = [
        "# carsearch audit",
        "",
        f"Folder `{r['folder']}`: {s['images']} photos ({s['labelled']} labelled), backbone {r['backbone']}.",
        f"Near-duplicate threshold: cosine >= {st['threshold']}; {st['k']} neighbours vote, outliers by the "
        f"{st['outlier_k']}th; search "
        f"{st['search']}; outlier fence {st['outlier_fence']}. Took {r['seconds']} s, peak memory "
        f"{human_bytes(r['peak_rss_bytes'])}.",
        "",
        "| finding | count |",
        "|---|---:|",
        *(f"| {words} | {value} |" for words, value in summary_rows(s)),
        "",
        "Id lists, one photo a line as `id<TAB>path` (for `carsearch index build --exclude FILE` or "
        "`index remove --ids-file FILE`): "
        + ", ".join(f"`{f}`" for f in r["id_lists"].values())
        + ". The page `index.html` shows the photos.",
    ]
    lines += ["", "## Exact duplicates", ""]
    lines += [
        f"- {len(g['members'])} files"
        + (" **label conflict**" if g.get("conflict") else "")
        + ": "
        + ", ".join(_who(m) for m in g["members"])
        for g in r["exact_duplicates"][:SHOWN]
    ] or ["None."]
    lines += ["", "## Near-duplicate groups", ""]
    lines += [
        f"- {len(g['members'])} photos, similarity {g['min_similarity']}-{g['max_similarity']}"
        + (" **label conflict**" if g["conflict"] else "")
        + ": "
        + ", ".join(_who(m) for m in g["members"])
        for g in r["near_duplicates"][:SHOWN]
    ] or ["None."]
    lines += [
        "",
        "## Most likely mislabelled",
        "",
        "| photo | score | neighbours vote for |",
        "|---|---:|---|",
    ]
    lines += [
        f"| {_who(m)} | {m['score']} | {m['voted']} ({m['voted_share']:.0%}), like "
        + (", ".join(f"`{e['path']}`" for e in m.get("voted_examples", [])) or "-")
        + " |"
        for m in r["mislabelled"][:SHOWN]
        if not m.get("too_few_examples")
    ]
    few = r["summary"].get("too_few_examples_to_judge", 0)
    if few:
        lines += [
            "",
            f"Too few examples to judge: {few} labelled photos whose class has fewer than 3 photos or that "
            "have no labelled neighbour (not suspects; see `too_few_examples` in report.json): "
            + ", ".join(_who(m) for m in r.get("too_few_examples", [])[:SHOWN]),
        ]
    lines += ["", "## Outliers", "", "| photo | k-th neighbour similarity |", "|---|---:|"]
    lines += [f"| {_who(m)} | {m['kth_similarity']} |" for m in r["outliers"][:SHOWN]]
    if r["leakage"] is not None:
        lk = r["leakage"]
        lines += [
            "",
            "## Leakage",
            "",
            f"{lk['leaked']} of {lk['queries']} photos of `{r['queries_folder']}` ({lk['rate']:.1%}) have a "
            "near-duplicate in the collection; `leaked.txt` lists them (id and path).",
            "",
        ]
        lines += [
            f"- {_who(p['query'])} ~ {_who(p['match'])}: {p['similarity']}" for p in lk["pairs"][:SHOWN]
        ]
    return "\n".join(lines) + "\n"
