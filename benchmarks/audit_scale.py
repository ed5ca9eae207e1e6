"""`carsearch audit` at VMMRdb scale: 300k synthetic vectors (the scale benchmark's generator), 2 cores.

    python benchmarks/audit_scale.py EMB_DEV --work DIR [--vectors 300000]

Prints the audit's time, its peak memory next to the size of the vectors and of the search index it
builds, and what it found (the generator makes no duplicates: what it finds are draws that fell close).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from carsearch.audit.run import audit
from carsearch.audit.settings import AuditSettings
from carsearch.index.auto import human_bytes
from carsearch.memwatch import peak_rss_bytes
from streaming_build import write_synthetic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("emb_dev", type=Path)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--vectors", type=int, default=300_000)
    a = ap.parse_args()
    synthetic = a.work / f"synthetic-{a.vectors}"
    if not (synthetic / "manifest.json").exists():
        write_synthetic(a.emb_dev, synthetic, a.vectors, 32, 16_384)
    before = peak_rss_bytes()
    t0 = time.perf_counter()
    r = audit(synthetic, a.work / "report", None, AuditSettings(page=False), progress=True)
    seconds = time.perf_counter() - t0
    n, d = r["summary"]["images"], json.loads((synthetic / "manifest.json").read_text())["provenance"]["dim"]
    out = {
        "vectors": n,
        "dim": d,
        "seconds": round(seconds, 1),
        "search": r["settings"]["search"],
        "vectors_bytes": n * d * 4,
        "index_bytes": r["index_bytes"],
        "timings": r["timings"],
        "peak_rss_bytes": r["peak_rss_bytes"],
        "peak_rss_before_audit": before,
        "summary": r["summary"],
    }
    print(json.dumps(out, indent=2))
    print(
        f"{n} x {d} vectors ({human_bytes(n * d * 4)}): audit in {seconds:.0f} s, peak RSS "
        f"{human_bytes(r['peak_rss_bytes'])} (search index {human_bytes(r['index_bytes'])}, "
        f"{r['settings']['search']}); steps: {r['timings']}"
    )


if __name__ == "__main__":
    main()
