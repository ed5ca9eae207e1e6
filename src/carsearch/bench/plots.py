"""PNG plots of a bench report (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from carsearch.fsutil import atomic_path


def _save(fig, path: Path) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def write_plots(report: dict, out: Path) -> dict[str, str]:
    """Write the plots the report has data for; returns {plot: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, str] = {}
    title = f"{report['embeddings']['backbone']} ({report['embeddings']['vectors']} vectors)"
    if report.get("index"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for factory, r in report["index"].items():
            pts = r.get("sweep") or [{"10-recall@10": r["10-recall@10"], "qps_batched": r["qps_batched"]}]
            ax.plot(
                [p["10-recall@10"] for p in pts], [p["qps_batched"] for p in pts], marker="o", label=factory
            )
        for peer in report.get("peers", []):
            if peer.get("sweep"):
                pts = peer["sweep"]
                ax.plot(
                    [p["10-recall@10"] for p in pts],
                    [p["qps_batched"] for p in pts],
                    marker="x",
                    ls="--",
                    label=peer["name"],
                )
            else:
                ax.scatter(
                    [peer["10-recall@10"]], [peer["qps_batched"]], marker="x", s=70, label=peer["name"]
                )
        ax.set(
            xlabel="10-recall@10 (neighbours shared with exact search)",
            ylabel="queries per second (batched)",
            yscale="log",
            title=f"recall vs speed: {title}",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        files["recall_vs_qps"] = _save(fig, out / "recall_vs_qps.png")
    if report.get("closed"):
        factories = list(report["closed"])
        metrics = ("top1", "top5", "hit1", "hit5")
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(metrics)
        x = np.arange(len(factories))
        for i, m in enumerate(metrics):
            ax.bar(x + i * width, [report["closed"][f]["class"][m] for f in factories], width, label=m)
        ax.set_xticks(x + width * (len(metrics) - 1) / 2, factories, rotation=20, fontsize=8)
        ax.set(ylabel="share of queries", ylim=(0, 1), title=f"kNN classification by index type: {title}")
        ax.legend(fontsize=8)
        files["top1_by_index"] = _save(fig, out / "top1_by_index.png")
    if report.get("openset") or report.get("closed_confidence_curve"):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        if report.get("openset"):
            c = report["openset"]["curve"]
            ax.plot(
                [p["coverage"] for p in c],
                [p["accuracy"] for p in c],
                marker=".",
                label="open set: known + unknown queries, threshold on neighbour similarity",
            )
        if report.get("closed_confidence_curve"):
            c = report["closed_confidence_curve"]
            ax.plot(
                [p["coverage"] for p in c],
                [p["accuracy"] for p in c],
                marker=".",
                label="closed set: threshold on vote confidence",
            )
        ax.set(
            xlabel="coverage (share of queries answered)",
            ylabel="accuracy of the answers",
            xlim=(0, 1.02),
            ylim=(0, 1.02),
            title="accuracy / coverage as the threshold moves",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        files["accuracy_coverage"] = _save(fig, out / "accuracy_coverage.png")
    conf = report.get("confusion")
    if conf and conf["classes"]:
        m = np.array(conf["matrix"])
        fig, ax = plt.subplots(figsize=(8.5, 7.5))
        ax.imshow(m, cmap="Blues")
        names = [c if len(c) <= 32 else c[:30] + "…" for c in conf["classes"]]
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        for (i, j), v in np.ndenumerate(m):
            if v:
                ax.text(
                    j,
                    i,
                    str(v),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if v > m.max() / 2 else "black",
                )
        ax.set(xlabel="predicted", ylabel="true", title="most confused classes (closed set, exact search)")
        files["confusion"] = _save(fig, out / "confusion.png")
    return files
