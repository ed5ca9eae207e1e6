"""report.md: the bench report as tables a person reads."""

from __future__ import annotations

from carsearch.eval.splits import class_range
from carsearch.index.auto import human_bytes

LONGEST_CLASS_LIST = 60  # characters of class ids shown in a heading; longer lists stay in report.json


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _classes(spec: str) -> str:
    if len(spec) <= LONGEST_CLASS_LIST:
        return spec
    return f"{len(class_range(spec))} classes, listed in report.json"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


SPEED_COLUMNS = [
    "tuned",
    "1-recall@1",
    "10-recall@10",
    "QPS batched",
    "QPS single",
    "p50 ms",
    "p99 ms",
    "build s",
    "memory",
    "build +RSS",
]


def _speed_cells(x: dict) -> list[str]:
    """The cells of SPEED_COLUMNS for one index type or peer."""
    return [
        x["params"] or "exact",
        f"{x['1-recall@1']:.3f}",
        f"{x['10-recall@10']:.3f}",
        f"{x['qps_batched']:,.0f}",
        f"{x['qps_single']:,.0f}",
        f"{x['p50_ms']:.2f}",
        f"{x['p99_ms']:.2f}",
        f"{x['build_seconds']:.1f}",
        human_bytes(x["memory_bytes"]),
        human_bytes(x["build_rss_growth_bytes"]) if "build_rss_growth_bytes" in x else "-",
    ]


def markdown(r: dict) -> str:
    e, sp = r["embeddings"], r["split"]
    load = r["machine"].get("load_average")
    lines = [
        "# carsearch bench report",
        "",
        f"Embeddings: `{e['folder']}`: {e['vectors']} vectors, {e['dim']}-d, backbone {e['backbone']} "
        f"({e['weights']}), crop {e['crop']}" + (f", {e['classes']} classes" if e["classes"] else "") + ".",
        f"Split: {sp['gallery']} gallery / {sp['queries']} query images, stratified per class, "
        f"seed {sp['seed']}.",
        f"Machine: {r['machine']['cpus']} CPUs"
        + (f" (load average {load} as it began)" if load is not None else "")
        + f", faiss {r['machine']['versions'].get('faiss-cpu', '?')}; "
        f"bench took {r['seconds']} s"
        + (f", peak memory {human_bytes(r['peak_rss_bytes'])}." if r.get("peak_rss_bytes") else "."),
    ]
    if r.get("note"):
        lines += ["", f"**Note:** {r['note']}"]
    if r.get("class_split", {}).get("note"):
        lines += ["", f"**Classes:** {r['class_split']['note']}"]
    if r.get("leakage"):
        lk = r["leakage"]
        without = lk.get("top1_without_leaked")
        lines += [
            "",
            f"**Leakage:** {lk['leaked_queries']} of {sp['queries']} queries ({lk['rate']:.1%}) have a "
            f"near-duplicate in the gallery (cosine >= {lk['threshold']}; {lk['exact_copies']} of them exact "
            "copies)"
            + (
                f"; exact-search top-1 is {lk['top1_all']:.3f} with them and {without:.3f} without them."
                if without is not None
                else "."
            )
            + " `carsearch audit` lists them.",
        ]
    if r.get("closed"):
        k = r["settings"]["k"]
        lines += [
            "",
            f"## Closed-set kNN classification (k = {k}, T = {r['settings']['temperature']})",
            "",
            "top-1 / top-5: the ranked weighted vote; hit@1 / hit@5: any of the first 1 / 5 neighbours has "
            "the right label (what the VMMRdb reverse-image-search post calls top-1 / top-5).",
            "",
        ]
        rows = []
        for f, c in r["closed"].items():
            m, mk = c["class"], c["make"]
            rows.append(
                [
                    f"`{f}`",
                    c["params"] or "exact",
                    _pct(m["top1"]),
                    _pct(m["top5"]),
                    _pct(m["hit1"]),
                    _pct(m["hit5"]),
                    _pct(mk["top1"]),
                    _pct(mk["top5"]),
                ]
            )
        lines += _table(
            ["index", "params", "top-1", "top-5", "hit@1", "hit@5", "make top-1", "make top-5"], rows
        )
    if r.get("zeroshot"):
        z = r["zeroshot"]
        lines += [
            "",
            f"## Zero-shot retrieval (Cars196 protocol, test classes {_classes(z['test_classes'])}, "
            "exact search)",
            "",
            *_table(
                ["queries", "R@1", "R@2", "R@4", "R@8"],
                [[str(z["queries"]), *(_pct(z[f"recall@{k}"]) for k in (1, 2, 4, 8))]],
            ),
        ]
    if r.get("openset"):
        o = r["openset"]
        fpr_key = next(key for key in o if key.startswith("fpr@") and key.endswith("tpr"))
        lines += [
            "",
            f"## Open set (known classes {_classes(o['known_classes'])}; score = similarity to neighbour "
            f"{o['openset_k']})",
            "",
            *_table(
                [
                    "known / unknown queries",
                    "AUROC",
                    fpr_key.upper(),
                    "threshold (gallery leave-one-out)",
                    "TPR / FPR at it",
                    "open-set accuracy",
                    "closed top-1 on known",
                ],
                [
                    [
                        f"{o['known_queries']} / {o['unknown_queries']}",
                        f"{o['auroc']:.3f}",
                        _pct(o[fpr_key]),
                        f"{o['threshold']:.4f}",
                        f"{_pct(o['tpr_at_threshold'])} / {_pct(o['fpr_at_threshold'])}",
                        _pct(o["open_set_accuracy"]),
                        _pct(o["closed_set_top1_known"]),
                    ]
                ],
            ),
        ]
    if r.get("index"):
        lines += ["", "## Index types (database: gallery; queries: held-out images; truth: exact search)", ""]
        rows = [
            [
                f"`{f}`",
                *_speed_cells(x),
                _pct(x["top1"]) if "top1" in x else "-",
                _pct(x["top5"]) if "top5" in x else "-",
            ]
            for f, x in r["index"].items()
        ]
        lines += _table(["index", *SPEED_COLUMNS, "kNN top-1", "kNN top-5"], rows)
    if r.get("index_left_out"):
        lines += ["", "Left out of the default index types, too few gallery vectors to train:", ""]
        lines += [f"- `{f}`: {why}." for f, why in r["index_left_out"].items()]
    if r.get("peers"):
        lines += ["", "## Peers, same run, same queries", ""]
        lines += _table(["peer", *SPEED_COLUMNS], [[p["name"], *_speed_cells(p)] for p in r["peers"]])
        lines += [f"- skipped: {s}" for s in r.get("peers_skipped", [])]
    if r.get("plots"):
        lines += ["", "## Plots", "", *(f"![{name}]({file})" for name, file in r["plots"].items())]
    if r.get("recommendation"):
        rec = r["recommendation"]
        lines += ["", "## Recommendation", "", f"Use `{rec['factory']}` for this collection: {rec['why']}"]
    return "\n".join(lines) + "\n"
