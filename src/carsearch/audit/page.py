"""The audit's offline HTML page: a summary in words, a table of contents with each section's count, and
compact grids of thumbnails: duplicate groups, label conflicts, suspects (each beside a few photos of
the class its neighbours vote for), photos with too few examples to judge, outliers, leaked pairs.

One self-contained file (inline CSS, no script, no CDN) beside a thumbs/ folder of small JPEGs made from
the dataset's images; text from the data is escaped. An image that cannot be read shows its path instead.
No group or photo is shown in two sections: a near-duplicate group whose labels differ is shown under
label conflicts only, and byte-identical files under exact duplicates only.
"""

from __future__ import annotations

import hashlib
import html
from pathlib import Path

import numpy as np

from carsearch.audit.report import summary_rows
from carsearch.embed.images import BadImage, load_image, safe_join
from carsearch.embed.store import EmbeddingSet
from carsearch.fsutil import write_text_atomic

THUMB = 160

CSS = """
*{box-sizing:border-box}
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;overflow-wrap:anywhere}
header{padding:1em 1.2em .4em}h1{font-size:1.35em;margin:0 0 .3em}
.lede{color:#444;margin:.2em 0}
.layout{display:block;padding:0 1.2em 2em}
nav#toc{background:#f6f7f9;border:1px solid #e1e4e8;border-radius:6px;padding:.5em .8em;margin:.6em 0}
nav#toc h2{font-size:1em;margin:.2em 0 .4em;border:0}
nav#toc ol{margin:0;padding-left:1.2em}nav#toc li{margin:.15em 0}
nav#toc .count{color:#555;white-space:nowrap}
nav#toc .count.found{color:#a11;font-weight:600}
@media (min-width:960px){
 .layout{display:grid;grid-template-columns:230px minmax(0,1fr);gap:1.5em;align-items:start}
 nav#toc{position:sticky;top:.8em;max-height:calc(100vh - 1.6em);overflow:auto}
}
main{min-width:0}
h2{font-size:1.15em;margin:1.4em 0 .4em;border-bottom:1px solid #ddd;padding-bottom:.2em}
section>p{margin:.3em 0}
table{border-collapse:collapse;max-width:100%}td,th{padding:.15em .6em;border-bottom:1px solid #eee;
text-align:left;vertical-align:top;font-weight:normal}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap;font-weight:600}
.grid{display:grid;gap:.6em;grid-template-columns:repeat(auto-fill,minmax(min(100%,340px),1fr))}
.groups{display:flex;flex-wrap:wrap;gap:.6em;align-items:flex-start}
.item{border:1px solid #ddd;border-radius:6px;padding:.4em;background:#fff;max-width:100%}
.item.conflict,.item.flagged{border-color:#c33;background:#fff5f5}
.group{display:flex;flex-wrap:wrap;gap:.4em}
.note{color:#555;font-size:12px;flex:0 0 100%;contain:inline-size;margin-bottom:.2em}
.card{width:132px;font-size:12px}
.card img,.card .missing{width:132px;height:99px;object-fit:contain;background:#f0f0f0;display:block}
.missing{display:flex;align-items:center;justify-content:center;font-size:11px;overflow:hidden}
.path{color:#666;font-size:11px}
.suspect{display:flex;flex-wrap:wrap;gap:.5em}
.vote{flex:1 1 150px;min-width:0;font-size:12px}
.examples{display:flex;flex-wrap:wrap;gap:4px;margin-top:.3em}.examples figure{margin:0}
.examples img,.examples .missing{width:58px;height:44px;object-fit:contain;background:#f0f0f0;display:block}
.small .card{width:104px}.small .card img,.small .card .missing{width:104px;height:78px}
details{margin:.6em 0}summary{cursor:pointer;color:#345}
a.back{font-size:12px;display:inline-block;margin-top:.4em}
"""


class Thumbs:
    """Makes each photo's thumbnail once, under out/thumbs/, named by content."""

    def __init__(self, out: Path) -> None:
        self.dir = out / "thumbs"
        self.dir.mkdir(parents=True, exist_ok=True)

    def src(self, emb: EmbeddingSet, tag: str, m: dict) -> str | None:
        """The thumbnail's file name under thumbs/, or None when the photo cannot be read."""
        # Named by content: ids are positions every collection reuses, so a name by id would show the
        # photo of an earlier audit written into the same folder.
        row = np.flatnonzero(emb.ids == m["id"])
        digest = str(emb.sha256[row[0]]) if len(row) else ""
        name = (
            f"{digest[:32]}.jpg"
            if digest
            else f"{tag}-{m['id']}-{hashlib.sha256(m['path'].encode()).hexdigest()[:16]}.jpg"
        )
        path = self.dir / name
        if not path.exists():
            try:
                img = load_image(safe_join(emb.root, m["path"]), draft_size=THUMB)
                img.thumbnail((THUMB, THUMB))
                img.save(path, quality=80)
            except (BadImage, OSError):
                return None
        return name

    def picture(self, emb: EmbeddingSet, tag: str, m: dict) -> str:
        name = self.src(emb, tag, m)
        path = html.escape(m["path"])
        if name is None:
            return f'<div class="missing" title="{path}">{path}</div>'
        return f'<img src="thumbs/{name}" alt="{path}" title="{path}" loading="lazy">'

    def card(self, emb: EmbeddingSet, tag: str, m: dict, note: str = "") -> str:
        extra = f"<br>{html.escape(note)}" if note else ""
        return (
            f'<div class="card" data-id="{m["id"]}">{self.picture(emb, tag, m)}<b>{m["id"]}</b> '
            f"{html.escape(m['label'] or '(no label)')}<br><span class='path'>{html.escape(m['path'])}"
            f"</span>{extra}</div>"
        )


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


def write_page(report: dict, emb: EmbeddingSet, other: EmbeddingSet | None, out: Path, top: int) -> None:
    """index.html: the summary in words, a table of contents with counts, then up to `top` groups or
    photos per section."""
    th = Thumbs(out)
    s, st = report["summary"], report["settings"]
    near = report["near_duplicates"]
    conflicts = [near[i] for i in report["label_conflicts"]]
    agreeing = [g for g in near if not g["conflict"]]
    sections: list[tuple[str, str, int, str, str]] = []  # id, title, count, count in words, body

    def items(cls: str, parts: list[str]) -> str:
        return f"<div class='{cls}'>{''.join(parts)}</div>" if parts else "<p>None found.</p>"

    def shown(n_shown: int, total: int) -> str:
        return f"<p class='note'>The first {n_shown:,} of {total:,}.</p>" if total > n_shown else ""

    def group(members: list[dict], note: str, conflict: bool = False) -> str:
        cards = "".join(
            th.card(emb, "a", m, f"+ {_plural(m.get('exact_copies', 0), 'exact copy', 'exact copies')}")
            if m.get("exact_copies")
            else th.card(emb, "a", m)
            for m in members
        )
        cls = "item group conflict" if conflict else "item group"
        return f"<div class='{cls}'><div class='note'>{html.escape(note)}</div>{cards}</div>"

    exact = report["exact_duplicates"]
    sections.append(
        (
            "exact",
            "Exact duplicates",
            s["exact_duplicate_groups"],
            _plural(s["exact_duplicate_groups"], "group"),
            f"<p>Files with the same bytes (sha256): {_plural(s['exact_duplicate_images'], 'photo')} in "
            f"{_plural(len(exact), 'group')}, {s.get('exact_duplicate_conflicts', 0):,} with different "
            "labels (in red). The near-duplicate groups below hold only the first file of each.</p>"
            + items(
                "groups",
                [
                    group(
                        g["members"],
                        f"{len(g['members'])} identical files · "
                        + ("labels differ: " if g.get("conflict") else "")
                        + " / ".join(g.get("labels") or ["no label"]),
                        g.get("conflict", False),
                    )
                    for g in exact[:top]
                ],
            )
            + shown(min(top, len(exact)), len(exact)),
        )
    )

    def near_note(g: dict) -> str:
        sim = (
            f"similarity {g['min_similarity']}"
            if g["min_similarity"] == g["max_similarity"]
            else f"similarity {g['min_similarity']}–{g['max_similarity']}"
        )
        return f"{len(g['members'])} photos · {sim} · " + " / ".join(g["labels"] or ["no label"])

    sections.append(
        (
            "near",
            "Near-duplicates",
            s["near_duplicate_groups"],
            _plural(s["near_duplicate_groups"], "group"),
            f"<p>Photos of one shot: cosine ≥ {st['threshold']}, or edited copies confirmed by their "
            f"local features. {_plural(len(agreeing), 'group')} with one label here; "
            f"{_plural(len(conflicts), 'group')} whose labels differ under "
            "<a href='#conflicts'>label conflicts</a>.</p>"
            + items("groups", [group(g["members"], near_note(g)) for g in agreeing[:top]])
            + shown(min(top, len(agreeing)), len(agreeing)),
        )
    )
    sections.append(
        (
            "conflicts",
            "Label conflicts",
            s["label_conflicts"],
            _plural(s["label_conflicts"], "group"),
            "<p>Near-duplicates whose labels differ: at least one label is wrong.</p>"
            + items("groups", [group(g["members"], near_note(g), True) for g in conflicts[:top]])
            + shown(min(top, len(conflicts)), len(conflicts)),
        )
    )

    def suspect(m: dict) -> str:
        examples = "".join(
            f"<figure data-id='{e['id']}'>{th.picture(emb, 'a', e)}</figure>"
            for e in m.get("voted_examples", [])
        )
        voted = html.escape(m["voted"] or "(no vote)")
        cls = "item suspect flagged" if m["flagged"] else "item suspect"
        return (
            f"<div class='{cls}' data-voted='{html.escape(m['voted'])}'>{th.card(emb, 'a', m)}"
            "<div class='vote'>"
            f"Labelled <b>{html.escape(m['label'])}</b>; its neighbours vote <b>{voted}</b> "
            f"({m['voted_share']:.0%}). Score {m['score']}."
            + (f"<div class='examples' title='photos of {voted}'>{examples}</div>" if examples else "")
            + "</div></div>"
        )

    mislabelled = [m for m in report["mislabelled"] if not m.get("too_few_examples")]
    flagged = [m for m in mislabelled if m["flagged"]]
    rest = [m for m in mislabelled if not m["flagged"]]
    sections.append(
        (
            "mislabelled",
            "Likely mislabelled",
            s["likely_mislabelled"],
            _plural(s["likely_mislabelled"], "photo"),
            "<p>Photos whose nearest neighbours vote (almost) unanimously for another class: beside each, "
            "photos of the class they vote for. <code>suspects.txt</code> lists them.</p>"
            + items("grid", [suspect(m) for m in flagged])
            + shown(len(flagged), s["likely_mislabelled"])
            + (
                f"<details><summary>The next {_plural(len(rest), 'highest score')}, not flagged</summary>"
                + items("grid", [suspect(m) for m in rest])
                + "</details>"
                if rest
                else ""
            ),
        )
    )
    few = report.get("too_few_examples", [])
    n_few = s.get("too_few_examples_to_judge", 0)
    sections.append(
        (
            "too-few",
            "Too few examples to judge",
            n_few,
            _plural(n_few, "photo"),
            "<p>Labelled photos whose class has fewer than 3 photos, or that have no labelled neighbour: "
            "their neighbours cannot vote on their label, so they are not suspects.</p>"
            + items("groups small", [f"<div class='item'>{th.card(emb, 'a', m)}</div>" for m in few])
            + shown(len(few), n_few),
        )
    )
    outliers = [m for m in report["outliers"] if m["flagged"]]
    near_fence = [m for m in report["outliers"] if not m["flagged"]]

    def outlier(m: dict) -> str:
        cls = "item flagged" if m["flagged"] else "item"
        card = th.card(emb, "a", m, f"similarity {m['kth_similarity']}")
        return f"<div class='{cls}'>{card}</div>"

    sections.append(
        (
            "outliers",
            "Outliers",
            s["outliers"],
            _plural(s["outliers"], "photo"),
            f"<p>Photos least like any other: similarity to their {st['outlier_k']}th neighbour below "
            f"{st['outlier_fence']} (Tukey's far-out fence). <code>suspects.txt</code> lists them too.</p>"
            + items("groups small", [outlier(m) for m in outliers])
            + shown(len(outliers), s["outliers"])
            + (
                f"<details><summary>The next {_plural(len(near_fence), 'photo')}, above the fence"
                "</summary>" + items("groups small", [outlier(m) for m in near_fence]) + "</details>"
                if near_fence
                else ""
            ),
        )
    )
    if report["leakage"] is not None and other is not None:
        lk = report["leakage"]
        pairs = lk["pairs"]
        cards = [
            "<div class='item group'><div class='note'>"
            f"similarity {p['similarity']}</div>{th.card(other, 'b', p['query'], 'second folder')}"
            f"{th.card(emb, 'a', p['match'], 'collection')}</div>"
            for p in pairs[:top]
        ]
        sections.append(
            (
                "leakage",
                "Leakage",
                s["leaked_queries"],
                _plural(s["leaked_queries"], "photo"),
                f"<p>{_plural(lk['leaked'], 'photo')} of {html.escape(str(report['queries_folder']))} "
                f"({lk['rate']:.1%} of {lk['queries']:,}) have a near-duplicate in the collection; "
                "<code>leaked.txt</code> lists them.</p>"
                + items("groups", cards)
                + shown(len(cards), len(pairs)),
            )
        )

    lists = ", ".join(
        f"<a href='{html.escape(f)}'><code>{html.escape(f)}</code></a>" for f in report["id_lists"].values()
    )
    summary = (
        "<section id='summary'><h2>Summary</h2><table>"
        + "".join(
            f"<tr><th>{html.escape(w)}</th><td class='n'>{html.escape(v)}</td></tr>"
            for w, v in summary_rows(s)
        )
        + "</table><p>Id lists, one photo a line as <code>id&lt;TAB&gt;path</code>, for "
        f"<code>carsearch index build --exclude FILE</code> or <code>index remove --ids-file FILE</code>: "
        f"{lists}; <code>report.md</code> and <code>report.json</code> hold the findings.</p></section>"
    )
    toc = "".join(
        f"<li><a href='#{key}' data-count='{count}'>{html.escape(title)}</a> "
        f"<span class='count{' found' if count else ''}'>{words}</span></li>"
        for key, title, count, words, _ in sections
    )
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>carsearch audit: {html.escape(report['folder'])}</title><style>{CSS}</style></head><body>",
        f"<header><h1>Audit of {html.escape(report['folder'])}</h1>",
        f"<p class='lede'>{_plural(s['images'], 'photo')} ({s['labelled']:,} labelled), backbone "
        f"{html.escape(report['backbone'])}; near-duplicates from cosine {st['threshold']}, "
        f"{st['k']} neighbours vote on each label; search {html.escape(st['search'])}.</p></header>",
        "<div class='layout'><nav id='toc' aria-label='Contents'><h2>Contents</h2><ol>"
        f"<li><a href='#summary'>Summary</a></li>{toc}</ol></nav><main>",
        summary,
        *(
            f"<section id='{key}'><h2>{html.escape(title)} <span class='count'>({words})</span></h2>{body}"
            "<a class='back' href='#toc'>↑ contents</a></section>"
            for key, title, _, words, body in sections
        ),
        "</main></div></body></html>",
    ]
    write_text_atomic(out / "index.html", "\n".join(parts))
