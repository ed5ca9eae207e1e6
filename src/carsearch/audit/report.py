"""report.md of an audit: the summary and the first groups and photos of each section."""

from __future__ import annotations

from carsearch.index.auto import human_bytes

SHOWN = 10


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
        *(f"| {k.replace('_', ' ')} | {v} |" for k, v in s.items()),
        "",
        "Id lists (for `carsearch index build --exclude FILE` or `index remove --ids-file FILE`): "
        + ", ".join(f"`{f}`" for f in r["id_lists"].values())
        + ". The page `index.html` shows the photos.",
    ]
    lines += ["", "## Exact duplicates", ""]
    lines += [
        f"- {len(g['members'])} files: " + ", ".join(_who(m) for m in g["members"])
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
        f"| {_who(m)} | {m['score']} | {m['voted']} ({m['voted_share']:.0%}) |"
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
            "near-duplicate in the collection; their ids are in `leaked.txt`.",
            "",
        ]
        lines += [
            f"- {_who(p['query'])} ~ {_who(p['match'])}: {p['similarity']}" for p in lk["pairs"][:SHOWN]
        ]
    return "\n".join(lines) + "\n"
