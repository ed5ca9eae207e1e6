"""`embed --engine ray` against the local engine on the same photos, in one run.

Both embed the first N dev photos with the same network and settings into fresh folders. The local engine
runs as `carsearch embed` does (DataLoader decoding processes + the network in this process); the Ray
engine runs 2 workers (actors, one network each) on a local Ray cluster. The cluster's start is timed
apart from the run: on a real cluster it is started once (`ray start --head`), not per job; the Ray run's
time includes starting its workers and loading their networks. The shards of both are compared byte for
byte.

    python benchmarks/ray_engine.py [--images 2000] [--backbone resnet50 --weights none] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import ray

from carsearch.embed import Engine, embed_dataset
from carsearch.embed.settings import EmbedJob

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "stanford-cars-dev"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--weights", default="none", help="none: random weights (speed does not depend on them)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    cores = os.cpu_count() or 1
    common = dict(backbone=a.backbone, weights=a.weights, shard_size=a.shard_size, limit=a.images)
    with tempfile.TemporaryDirectory() as tmp:
        local = embed_dataset(EmbedJob(DEV, Path(tmp) / "local", **common), progress=False)
        t0 = time.perf_counter()
        ray.init(num_cpus=cores, include_dashboard=False, logging_level="WARNING")
        start_s = time.perf_counter() - t0
        try:
            on_ray = embed_dataset(
                EmbedJob(DEV, Path(tmp) / "ray", workers=a.workers, **common),
                engine=Engine("ray"),
                progress=False,
            )
        finally:
            ray.shutdown()
        names = sorted(p.name for p in (Path(tmp) / "local").glob("shard-*.h5"))
        identical = all(
            (Path(tmp) / "local" / n).read_bytes() == (Path(tmp) / "ray" / n).read_bytes() for n in names
        )
    ratio = on_ray.images_per_second / local.images_per_second
    out = {
        "images": local.images,
        "backbone": a.backbone,
        "precision": local.precision,
        "cores": cores,
        "local": {
            "images_per_second": local.images_per_second,
            "seconds": local.seconds,
            "decode_workers": local.workers,
        },
        "ray": {
            "images_per_second": on_ray.images_per_second,
            "seconds": on_ray.seconds,
            "workers": on_ray.workers,
            "cluster_start_seconds": round(start_s, 2),
        },
        "ratio": round(ratio, 3),
        "shards_identical": identical,
        "shards": len(names),
    }
    if a.json:
        print(json.dumps(out, indent=2))
        return
    print(
        f"{out['images']} dev photos, {a.backbone} ({out['precision']}), {cores} cores, {len(names)} shards"
    )
    print("| engine | images/s | seconds | workers |")
    print("|---|---:|---:|---|")
    print(
        f"| local | {local.images_per_second:.1f} | {local.seconds:.1f} | "
        f"{local.workers} decoding processes |"
    )
    print(
        f"| ray | {on_ray.images_per_second:.1f} | {on_ray.seconds:.1f} | {on_ray.workers} actors "
        f"(+{start_s:.1f} s cluster start) |"
    )
    print(f"ray / local = {ratio:.2f}x; shards byte-identical: {identical}")


if __name__ == "__main__":
    main()
