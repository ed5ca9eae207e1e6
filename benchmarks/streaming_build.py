"""Peak memory of `carsearch index build` (streaming shards) against an in-memory build, same vectors.

Synthesises N vectors with the scale benchmark's generator (resampled around the class means and
covariances of real embeddings), writes them as embedding shards, then builds the same factory twice, each
in its own process, and reports each process's peak RSS (getrusage) next to the final index size:

  in-memory   every vector loaded, then Index.build (what `index build` did before it streamed);
  streaming   `carsearch index build --memory-budget B` (the training sample follows the budget).

    carsearch embed ../shared/data/stanford-cars-dev --out emb/r50 --backbone resnet50 --weights none
    python benchmarks/streaming_build.py emb/r50 --work /tmp/stream --vectors 300000 \
        --factory OPQ64,IVF1024,PQ64 --memory-budget 256M
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from carsearch.embed.shards import ShardRows, shard_name, write_shard
from carsearch.embed.store import MANIFEST, load_embeddings
from carsearch.fsutil import write_json_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_index import synthesise

IN_MEMORY = """
import json, resource, sys, time
import numpy as np
from carsearch.embed import load_embeddings
from carsearch.index.core import Index
emb = load_embeddings(sys.argv[1])
t0 = time.perf_counter()
index = Index.build(sys.argv[2], emb.vectors, emb.ids, seed=0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": time.perf_counter() - t0, "index_bytes": index.memory_bytes,
                  "recall": index.tuned.recall, "peak_rss_bytes": peak}))
"""


def write_synthetic(real_dir: Path, out: Path, n: int, per_class: int, shard_rows: int) -> None:
    """N synthetic vectors as an embedding folder (one shard per `shard_rows`), written chunk by chunk."""
    real = load_embeddings(real_dir)
    emb = synthesise(real, n // per_class, per_class, seed=0)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    prov = {k: v for k, v in real.provenance.items() if k != "weights_source"}
    for i, start in enumerate(range(0, len(emb), shard_rows)):
        stop = min(len(emb), start + shard_rows)
        part = emb.subset(np.arange(start, stop))
        rows = ShardRows(
            vectors=part.vectors,
            ids=part.ids,
            class_ids=part.class_ids,
            paths=[f"synthetic/{j}.jpg" for j in part.ids],
            labels=list(part.labels),
            make=list(part.make),
            model=list(part.model),
            year=list(part.year),
            sha256=[""] * len(part),
        )
        digest = write_shard(out / shard_name(i), rows, {**prov, "shard": i})
        shards.append(
            {
                "file": shard_name(i),
                "index": i,
                "start": start,
                "stop": stop,
                "rows": len(part),
                "sha256": digest,
                "failures": {},
            }
        )
    manifest = {
        **real.manifest,
        "shards": shards,
        "rows": len(emb),
        "failures": {},
        "complete": True,
        "note": f"{len(emb)} synthetic vectors resampled from {real_dir}",
    }
    write_json_atomic(out / MANIFEST, manifest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("real", type=Path, help="real embeddings to resample")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--vectors", type=int, default=300_000)
    ap.add_argument("--per-class", type=int, default=32)
    ap.add_argument("--factory", default="OPQ64,IVF1024,PQ64")
    ap.add_argument("--memory-budget", default="256M")
    ap.add_argument("--skip-in-memory", action="store_true")
    a = ap.parse_args()
    emb = a.work / "synthetic"
    if not (emb / MANIFEST).is_file():
        t0 = time.perf_counter()
        write_synthetic(a.real, emb, a.vectors, a.per_class, 16_384)
        print(f"synthesised {a.vectors} vectors in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    rows = {}
    t0 = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "carsearch",
        "-q",
        "index",
        "build",
        str(emb),
        "--out",
        str(a.work / "index"),
        "--factory",
        a.factory,
        "--memory-budget",
        a.memory_budget,
        "--no-calibrate",
        "--json",
    ]
    info = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    rows["streaming"] = {
        "seconds": time.perf_counter() - t0,
        "index_bytes": info["memory_bytes"],
        "recall": info["recall"]["measured"],
        "peak_rss_bytes": info["build"]["peak_rss_bytes"],
        "training_vectors": info["build"]["training_vectors"],
    }
    if not a.skip_in_memory:
        out = subprocess.run(
            [sys.executable, "-c", IN_MEMORY, str(emb), a.factory], check=True, capture_output=True, text=True
        ).stdout
        rows["in-memory"] = {**json.loads(out), "training_vectors": min(a.vectors, 200_000)}
    raw = a.vectors * int(info["dim"]) * 4
    print(f"{a.vectors} x {info['dim']} vectors ({raw / 2**30:.2f} GiB raw), {a.factory}")
    print("| build | training vectors | peak RSS | final index | peak / index | recall@10 | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['training_vectors']:,} | {r['peak_rss_bytes'] / 2**20:,.0f} MiB | "
            f"{r['index_bytes'] / 2**20:,.1f} MiB | {r['peak_rss_bytes'] / r['index_bytes']:.1f}x | "
            f"{r['recall']:.3f} | {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
