"""Inference runtimes side by side: PyTorch (eager, the baseline), ONNX Runtime (fp32) and OpenVINO (fp32
and bf16), on the same batch of real dev photos in one run; then whether decoding keeps up, and the embed
job end to end.

1. network: images/s of `Encoder.encode` on one batch (decoding excluded), each runtime and precision,
   with the ratio to PyTorch at the same precision and the cosine to PyTorch fp32 (the runtimes' agreement);
2. decoding: images/s of one core reading, hashing, decoding and framing photos as the embed job's workers
   do, for the dev photos (384 px) and for the same photos as 12-megapixel phone-size JPEGs, with and
   without Pillow's reduced-size JPEG decode (draft);
3. end to end: `embed_dataset` over the first --images dev photos with each runtime (default workers).

    python benchmarks/runtime_throughput.py [--backbones efficientnet_lite0,resnet50] [--batch 32]
        [--repeats 5] [--images 256] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from carsearch.datasets import read_dataset
from carsearch.embed.encoder import Encoder, cpu_has_native_bf16
from carsearch.embed.images import load_image
from carsearch.embed.reader import RecordImages
from carsearch.models import load_backbone

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "stanford-cars-dev"
# ONNX Runtime runs fp32 only on the CPU (ONNX's Conv has no bf16 at opset 17: runtimes.py).
RUNS = (
    ("torch", "fp32"),
    ("torch", "bf16"),
    ("onnxruntime", "fp32"),
    ("openvino", "fp32"),
    ("openvino", "bf16"),
)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def network(backbone: str, paths: list[Path], batch: int, repeats: int) -> list[dict]:
    weights = "imagenet" if backbone.startswith("efficientnet") else "none"
    loaded = load_backbone(backbone, weights)
    prep = loaded.preprocessing
    pixels = torch.from_numpy(np.stack([prep.apply(load_image(p)) for p in paths[:batch]]))
    rows, ref = [], None
    for runtime, precision in RUNS:
        enc = Encoder(loaded, backbone, None, "cpu", precision, runtime=runtime)
        y = enc.encode(pixels)  # warm-up (and, for OpenVINO, the conversion: cached, not timed)
        t0 = time.perf_counter()
        for _ in range(repeats):
            enc.encode(pixels)
        ips = repeats * len(pixels) / (time.perf_counter() - t0)
        ref = y if ref is None else ref
        base = next((r["images_per_s"] for r in rows if r["precision"] == precision), ips)
        rows.append(
            {
                "backbone": backbone,
                "runtime": runtime,
                "precision": precision,
                "images_per_s": round(ips, 1),
                "vs_torch_same_precision": round(ips / base, 2),
                "min_cosine_to_torch_fp32": round(float((ref * y).sum(1).min()), 5),
            }
        )
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def decoding(paths: list[Path], work: Path) -> list[dict]:
    """One core's images/s through the workers' path (read, sha256, decode, frame)."""
    small, big = work / "small", work / "big"
    small.mkdir()
    big.mkdir()
    for p in paths:  # the dev photos as they are, and at phone size (4000 x 3000 px)
        (small / p.name).symlink_to(p)
        Image.open(p).convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC).save(
            big / p.name, quality=90
        )
    prep = load_backbone("efficientnet_lite0", "none").preprocessing
    rows = []
    for what, root in (("dev photos (<= 384 px)", small), ("12 MP JPEGs", big)):
        ds = read_dataset(root, "unlabeled")
        for draft in (True, False):
            p = dataclasses.replace(prep, jpeg_draft=draft)
            images = RecordImages(ds.root, ds.records, p, 89_478_485)
            t0 = time.perf_counter()
            for i in range(len(ds.records)):
                images[i]
            ips = len(ds.records) / (time.perf_counter() - t0)
            rows.append({"photos": what, "jpeg_draft": draft, "images_per_s_one_core": round(ips, 1)})
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def end_to_end(images: int, work: Path) -> list[dict]:
    from carsearch.embed import embed_dataset
    from carsearch.embed.settings import EmbedJob

    rows = []
    for runtime, precision in (("torch", "bf16"), ("onnxruntime", "fp32"), ("openvino", "bf16")):
        r = embed_dataset(
            EmbedJob(
                DEV,
                work / f"emb-{runtime}",
                backbone="efficientnet_lite0",
                precision=precision,
                runtime=runtime,
                limit=images,
            ),
            progress=False,
        )
        rows.append(
            {
                "runtime": runtime,
                "precision": precision,
                "images": r.images,
                "workers": r.workers,
                "images_per_s": r.images_per_second,
            }
        )
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="efficientnet_lite0,resnet50")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--images", type=int, default=256, help="end to end; 0 skips it")
    ap.add_argument("--decode-photos", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    paths = sorted((DEV / "images").glob("*.jpg"))
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("CARSEARCH_CACHE", str(Path(tmp) / "cache"))
        out = {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "native_bf16": cpu_has_native_bf16(),
            "network": [
                r for b in args.backbones.split(",") for r in network(b, paths, args.batch, args.repeats)
            ],
            "decoding": decoding(paths[: args.decode_photos], Path(tmp)),
            "end_to_end": end_to_end(args.images, Path(tmp)) if args.images else [],
        }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{out['cpu']}, {out['cores']} cores, native bf16: {out['native_bf16']}\n")
    print(
        "| backbone | runtime | precision | images/s | vs PyTorch, same precision "
        "| min cosine to PyTorch fp32 |"
    )
    print("|---|---|---|---:|---:|---:|")
    for r in out["network"]:
        print(
            f"| {r['backbone']} | {r['runtime']} | {r['precision']} | {r['images_per_s']} | "
            f"{r['vs_torch_same_precision']}x | {r['min_cosine_to_torch_fp32']} |"
        )
    print("\n| photos | Pillow draft decode | images/s, one core |\n|---|---|---:|")
    for r in out["decoding"]:
        print(f"| {r['photos']} | {'on' if r['jpeg_draft'] else 'off'} | {r['images_per_s_one_core']} |")
    if out["end_to_end"]:
        print("\n| embed, efficientnet_lite0 | precision | images | decoding workers | images/s |")
        print("|---|---|---:|---:|---:|")
        for r in out["end_to_end"]:
            cells = (r["runtime"], r["precision"], r["images"], r["workers"], r["images_per_s"])
            print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
