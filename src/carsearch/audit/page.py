"""The audit's offline HTML page: thumbnails per duplicate group, conflict, suspect and leaked pair.

One self-contained file (inline CSS, no script, no CDN) beside a thumbs/ folder of small JPEGs made from
the dataset's images; text from the data is escaped. An image that cannot be read shows its path instead.
"""

from __future__ import annotations

import hashlib
import html
from pathlib import Path

import numpy as np

from carsearch.embed.images import BadImage, load_image, safe_join
from carsearch.embed.store import EmbeddingSet
from carsearch.fsutil import write_text_atomic

THUMB = 160

CSS = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ccc}
.group{display:flex;flex-wrap:wrap;gap:.5em;padding:.6em;margin:.5em 0;border:1px solid #ddd;
border-radius:6px}
.group.conflict{border-color:#c33;background:#fff5f5}
.card{width:170px;font-size:12px;overflow-wrap:anywhere}
.card img{width:160px;height:120px;object-fit:contain;background:#f3f3f3;display:block}
.missing{width:160px;height:120px;background:#eee;display:flex;align-items:center;justify-content:center}
.note{color:#555;width:100%}
table{border-collapse:collapse}td,th{padding:.2em .6em;border-bottom:1px solid #eee;text-align:left}
"""


class Thumbs:
    """Makes each photo's thumbnail once, under out/thumbs/, named by folder and id."""

    def __init__(self, out: Path) -> None:
        self.dir = out / "thumbs"
        self.dir.mkdir(parents=True, exist_ok=True)

    def card(self, emb: EmbeddingSet, tag: str, m: dict, note: str = "") -> str:
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
                path = None
        pic = (
            f'<img src="thumbs/{name}" alt="{html.escape(m["path"])}" loading="lazy">'
            if path
            else f'<div class="missing">{html.escape(m["path"])}</div>'
        )
        return (
            f'<div class="card">{pic}<b>{m["id"]}</b> {html.escape(m["label"] or "(no label)")}'
            f"<br>{html.escape(m['path'])}{'<br>' + html.escape(note) if note else ''}</div>"
        )


def write_page(report: dict, emb: EmbeddingSet, other: EmbeddingSet | None, out: Path, top: int) -> None:
    """index.html: the summary, then up to `top` groups or photos per section."""
    th = Thumbs(out)
    s = report["summary"]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>carsearch audit: {html.escape(report['folder'])}</title><style>{CSS}</style></head><body>",
        f"<h1>Audit of {html.escape(report['folder'])}</h1>",
        "<table id='summary'>"
        + "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in s.items())
        + "</table>",
    ]

    def section(key: str, title: str, groups: list[str], total: int) -> None:
        shown = f" (first {len(groups)} of {total})" if total > len(groups) else ""
        parts.append(f"<section id='{key}'><h2>{html.escape(title)}{shown}</h2>")
        parts.extend(groups or ["<p>None found.</p>"])
        parts.append("</section>")

    def group(members: list[dict], note: str, conflict: bool = False) -> str:
        cls = "group conflict" if conflict else "group"
        cards = "".join(th.card(emb, "a", m) for m in members)
        return f"<div class='{cls}'><div class='note'>{html.escape(note)}</div>{cards}</div>"

    exact = report["exact_duplicates"]
    section(
        "exact",
        "Exact duplicates (same file bytes)",
        [group(g["members"], f"sha256 {g['sha256'][:16]}…") for g in exact[:top]],
        len(exact),
    )
    near = report["near_duplicates"]
    section(
        "near",
        f"Near-duplicates (cosine ≥ {report['settings']['threshold']})",
        [
            group(
                g["members"],
                f"similarity {g['min_similarity']}–{g['max_similarity']}; labels: {', '.join(g['labels'])}",
                g["conflict"],
            )
            for g in near[:top]
        ],
        len(near),
    )
    conflicts = [near[i] for i in report["label_conflicts"]]
    section(
        "conflicts",
        "Label conflicts (near-duplicates with different labels)",
        [group(g["members"], "labels: " + " / ".join(g["labels"]), True) for g in conflicts[:top]],
        len(conflicts),
    )
    section(
        "mislabelled",
        "Most likely mislabelled (neighbours vote against the label)",
        [
            group(
                [m], f"score {m['score']}; neighbours say {m['voted']} ({m['voted_share']:.0%})", m["flagged"]
            )
            for m in report["mislabelled"]
        ],
        s["labelled"],
    )
    section(
        "outliers",
        "Outliers (least like any other photo)",
        [
            group([m], f"k-th neighbour similarity {m['kth_similarity']}", m["flagged"])
            for m in report["outliers"]
        ],
        s["images"],
    )
    if report["leakage"] is not None and other is not None:
        pairs = report["leakage"]["pairs"]
        cards = [
            "<div class='group'><div class='note'>"
            f"similarity {p['similarity']}</div>{th.card(other, 'b', p['query'], 'query')}"
            f"{th.card(emb, 'a', p['match'], 'in the collection')}</div>"
            for p in pairs[:top]
        ]
        section("leakage", "Leakage: queries with a near-duplicate in the collection", cards, len(pairs))
    parts.append("</body></html>")
    write_text_atomic(out / "index.html", "\n".join(parts))
