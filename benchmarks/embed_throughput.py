"""Embedding throughput: `carsearch embed` versus a typical Stanford Cars notebook loop, in one run.

The baseline is written the way such notebooks do it: PIL open + torchvision transforms per image, a
DataLoader without workers, fp32, NCHW, torch.no_grad(). Both embed the same first N images of the dev
set with the same network (weights do not change speed: ResNet-50 runs with random weights here, as
the ImageNet file cannot be downloaded offline). The FLOP limit is measured in the same run as the
throughput of a large fp32 / bf16 matrix product, and each run's achieved GFLOP/s is put against it.

    python benchmarks/embed_throughput.py [--images 256] [--backbones resnet50,efficientnet_lite0] [--json]

`--save-overhead` measures instead what saving the shard in progress costs (`embed --save-every`, parts
written durably so that an interrupted run resumes inside its shard): the same `embed` job over the same
images with saving off (the baseline), at the default interval, and after every batch (the worst case),
interleaved round by round; each round's rate over that round's baseline, the median of --repeats rounds:

    python benchmarks/embed_throughput.py --save-overhead --images 5491 --backbones efficientnet_lite0
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

import carsearch.embed.shard_work as shard_work
from carsearch import defaults
from carsearch.datasets import read_dataset
from carsearch.embed import embed_dataset
from carsearch.embed.encoder import cpu_has_native_bf16
from carsearch.embed.settings import EmbedJob
from carsearch.models import load_backbone

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "stanford-cars-dev"


class NotebookDataset(Dataset):
    """The usual notebook dataset: open with PIL, convert, apply a torchvision Compose."""

    def __init__(self, paths: list[Path], transform: T.Compose) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(Image.open(self.paths[i]).convert("RGB"))


def baseline(backbone: str, weights: str, paths: list[Path], batch_size: int) -> float:
    """images/s of the notebook loop (model construction excluded, as for carsearch)."""
    loaded = load_backbone(backbone, weights)
    p = loaded.preprocessing
    interp = T.InterpolationMode.BICUBIC if p.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    tf = T.Compose(
        [
            T.Resize(p.resize, interpolation=interp),
            T.CenterCrop(p.size),
            T.ToTensor(),
            T.Normalize(p.mean, p.std),
        ]
    )
    model = loaded.model.eval()
    loader = DataLoader(NotebookDataset(paths, tf), batch_size=batch_size, num_workers=0)
    t0 = time.perf_counter()
    with torch.no_grad():
        for x in loader:
            model(x)
    return len(paths) / (time.perf_counter() - t0)


def gflops_per_image(backbone: str, weights: str) -> float:
    loaded = load_backbone(backbone, weights)
    size = loaded.preprocessing.size
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        loaded.model.eval()(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def matmul_peak(dtype: torch.dtype, n: int = 4096, reps: int = 4) -> float:
    """Achievable GFLOP/s of this machine's CPU for a large matrix product (the practical FLOP limit)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def carsearch_rate(
    backbone: str,
    weights: str,
    n: int,
    batch_size: int,
    precision: str = defaults.PRECISION,
    save_every: float = defaults.SAVE_EVERY,
) -> float:
    with tempfile.TemporaryDirectory() as out:
        r = embed_dataset(
            EmbedJob(
                DEV,
                out,
                backbone=backbone,
                weights=weights,
                limit=n,
                batch_size=batch_size,
                precision=precision,
                save_every=save_every,
            ),
            progress=False,
        )
        return r.images_per_second


def save_overhead(backbone: str, n: int, batch_size: int, repeats: int) -> list[dict]:
    """images/s of `embed` with the shard in progress saved never, every SAVE_EVERY s, after every batch."""
    weights = "none" if backbone.startswith("resnet") else "imagenet"
    runs = {
        "never saved (baseline)": float("inf"),
        f"--save-every {defaults.SAVE_EVERY:g} (default)": defaults.SAVE_EVERY,
        "--save-every 0 (after every batch)": 0.0,
    }
    written = [0]  # parts this run wrote: shard_work's write_part, counted
    write_part = shard_work.write_part

    def counted(*args: object, **kwargs: object) -> object:
        written[0] += 1
        return write_part(*args, **kwargs)

    shard_work.write_part = counted
    rates: dict[str, list[float]] = {name: [] for name in runs}
    parts = dict.fromkeys(runs, 0)
    for _ in range(repeats):  # round by round, so that a busy minute of the machine hits every setting
        for name, every in runs.items():
            written[0] = 0
            rates[name].append(carsearch_rate(backbone, weights, n, batch_size, save_every=every))
            parts[name] = written[0]
    shard_work.write_part = write_part
    base = rates["never saved (baseline)"]
    return [
        {
            "backbone": backbone,
            "run": name,
            "images_per_second": max(got),
            # Each round's rate over the same round's baseline; the median of the rounds.
            "ratio_vs_baseline": round(statistics.median(r / b for r, b in zip(got, base, strict=True)), 3),
            "round_ratios": [round(r / b, 3) for r, b in zip(got, base, strict=True)],
            "parts_written": parts[name],
        }
        for name, got in rates.items()
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--backbones", default="resnet50,efficientnet_lite0")
    ap.add_argument("--repeats", type=int, default=2, help="best of N for every configuration")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save-overhead", action="store_true", help="measure --save-every instead (see above)")
    args = ap.parse_args()
    if args.save_overhead:
        rows = [
            r
            for b in args.backbones.split(",")
            for r in save_overhead(b, args.images, args.batch_size, args.repeats)
        ]
        if args.json:
            json.dump({"images": args.images, "rows": rows}, sys.stdout, indent=2)
            print()
            return
        print(f"{args.images} images of stanford-cars-dev, batch {args.batch_size}, {args.repeats} rounds")
        print(f"{'backbone':<20}{'run':<40}{'best img/s':>11}{'x base':>8}{'parts':>7}  rounds")
        for r in rows:
            print(
                f"{r['backbone']:<20}{r['run']:<40}{r['images_per_second']:>11.1f}"
                f"{r['ratio_vs_baseline']:>8.3f}{r['parts_written']:>7}  {r['round_ratios']}"
            )
        return

    records = read_dataset(DEV).records[: args.images]
    paths = [DEV / r.path for r in records]
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    rows = []
    for backbone in args.backbones.split(","):
        weights = "none" if backbone.startswith("resnet") else "imagenet"
        gf = gflops_per_image(backbone, weights)
        base = max(baseline(backbone, weights, paths, args.batch_size) for _ in range(args.repeats))
        runs = {"baseline (notebook, fp32 NCHW)": ("fp32", base)}
        for precision in ("fp32", "auto"):
            rate = max(
                carsearch_rate(backbone, weights, args.images, args.batch_size, precision)
                for _ in range(args.repeats)
            )
            used = "bf16" if precision == "auto" and cpu_has_native_bf16() else "fp32"
            runs[f"carsearch embed --precision {precision} ({used})"] = (used, rate)
        for name, (dtype, rate) in runs.items():
            achieved = rate * gf
            rows.append(
                {
                    "backbone": backbone,
                    "run": name,
                    "images_per_second": round(rate, 2),
                    "ratio_vs_baseline": round(rate / base, 2),
                    "gflop_per_image": round(gf, 3),
                    "achieved_gflops": round(achieved, 1),
                    "peak_gflops": round(peak[dtype], 1),
                    "share_of_peak": round(achieved / peak[dtype], 3),
                }
            )
    if args.json:
        json.dump({"images": args.images, "peak_gflops": peak, "rows": rows}, sys.stdout, indent=2)
        print()
        return
    print(
        f"{args.images} images of stanford-cars-dev, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads; measured matmul peak: fp32 {peak['fp32']:.0f} GFLOP/s, "
        f"bf16 {peak['bf16']:.0f} GFLOP/s"
    )
    print(f"{'backbone':<20}{'run':<44}{'img/s':>8}{'x base':>8}{'GFLOP/s':>9}{'of peak':>9}")
    for r in rows:
        print(
            f"{r['backbone']:<20}{r['run']:<44}{r['images_per_second']:>8.1f}{r['ratio_vs_baseline']:>8.2f}"
            f"{r['achieved_gflops']:>9.0f}{r['share_of_peak']:>9.0%}"
        )


if __name__ == "__main__":
    main()
