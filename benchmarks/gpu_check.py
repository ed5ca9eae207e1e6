"""The Python parts of benchmarks/gpu_check.sh (one subcommand a step; each appends one JSON line to
--results and prints a Markdown line).

    python benchmarks/gpu_check.py jpegs .gpu/data --out /tmp/jpegs --count 8000
    python benchmarks/gpu_check.py embed /tmp/jpegs --device cuda --batch 256 --workers 14 --work /tmp/emb
    python benchmarks/gpu_check.py faiss --vectors 300000 --dim 2048 --queries 1000 --device cuda

`jpegs`: a csv-layout folder of COUNT JPEG files (quality 90) from the images of a csv-layout folder (the
WebP gallery that fits the device tool's transfer limit; each image again mirrored when COUNT asks for
more), so that the GPU machine embeds JPEG files as users have them.
`embed`: files -> embeddings, images/s, end to end, the same files: (1) a plain DataLoader baseline (PIL
decoding in worker processes, torchvision transforms, the torchvision network in fp32, as a tutorial
writes it); (2) `carsearch embed` (embed_dataset: files to shards, its own decoding workers, bf16
autocast and channels-last on CUDA); (3) with --gpu-decode, torchvision.io.decode_jpeg(device=...) in
batches, resized on the device, the network in bf16: what decoding on the GPU gives, which carsearch does
not do yet.
`faiss`: exact inner-product search of QUERIES over VECTORS x DIM random unit vectors: faiss on the CPU
(all cores), faiss on the GPU when the installed faiss has GPU support (else said, and skipped), and a
torch matrix product + top-k on the device for comparison (not faiss).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def record(results: Path | None, step: str, figures: dict) -> None:
    line = {"step": step, **figures}
    print(json.dumps(line), flush=True)
    if results is not None:
        with open(results, "a") as f:
            f.write(json.dumps(line) + "\n")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- jpegs ----------------------------------------------------------------------------------------------


def _to_jpeg(job: tuple[str, str, bool]) -> None:
    from PIL import Image, ImageOps

    src, dst, mirror = job
    with Image.open(src) as im:
        im = im.convert("RGB")
        (ImageOps.mirror(im) if mirror else im).save(dst, "JPEG", quality=90)


def make_jpegs(src: Path, out: Path, count: int) -> int:
    with open(src / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    (out / "images").mkdir(parents=True, exist_ok=True)
    jobs, labels = [], []
    for i in range(count):
        row = rows[i % len(rows)]
        rel = f"images/{i:06d}.jpg"
        jobs.append((str(src / row["image"]), str(out / rel), (i // len(rows)) % 2 == 1))
        labels.append({**row, "image": rel})
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_to_jpeg, jobs, chunksize=64))
    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(labels[0]))
        w.writeheader()
        w.writerows(labels)
    if (src / "classes.csv").is_file():
        (out / "classes.csv").write_bytes((src / "classes.csv").read_bytes())
    return count


# --- embed ----------------------------------------------------------------------------------------------


def _paths(data: Path) -> list[Path]:
    with open(data / "labels.csv", newline="") as f:
        return [data / r["image"] for r in csv.DictReader(f)]


class _Plain(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], size: int) -> None:
        from torchvision import transforms

        self.paths = paths
        self.tf = transforms.Compose(
            [
                transforms.Resize(int(size * 256 / 224)),
                transforms.CenterCrop(size),
                transforms.ToTensor(),
                transforms.Normalize(MEAN, STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return self.tf(im.convert("RGB"))


def _network(backbone: str) -> torch.nn.Module:
    """The backbone as a tutorial builds it: torchvision's model (else timm's), random weights, no head."""
    import torchvision

    if hasattr(torchvision.models, backbone):
        model = getattr(torchvision.models, backbone)(weights=None)
        model.fc = torch.nn.Identity()
        return model
    import timm

    return timm.create_model(backbone, pretrained=False, num_classes=0)


@torch.inference_mode()
def baseline(paths: list[Path], device: torch.device, backbone: str, batch: int, workers: int) -> float:
    model = _network(backbone).eval().to(device)
    loader = torch.utils.data.DataLoader(
        _Plain(paths, 224), batch_size=batch, num_workers=workers, pin_memory=device.type == "cuda"
    )
    t = time.perf_counter()
    n = 0
    for x in loader:
        model(x.to(device, non_blocking=True)).float().cpu()
        n += len(x)
    _sync(device)
    return n / (time.perf_counter() - t)


def _resized(image: torch.Tensor) -> torch.Tensor:
    """(3, h, w) uint8 -> (1, 3, 224, 224) float, squashed (antialiased bilinear, as Pillow's)."""
    x = image[None].float()
    return torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)


@torch.inference_mode()
def gpu_decode(paths: list[Path], device: torch.device, backbone: str, batch: int) -> float:
    """decode_jpeg on the device in batches, resized there, the network in bf16 channels-last."""
    from torchvision.io import ImageReadMode, decode_jpeg

    model = _network(backbone).eval().to(device, memory_format=torch.channels_last)
    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]  # page cache
    mean = torch.tensor([m * 255 for m in MEAN], device=device).view(1, 3, 1, 1)
    inv = torch.tensor([1 / (s * 255) for s in STD], device=device).view(1, 3, 1, 1)
    t = time.perf_counter()
    for i in range(0, len(data), batch):
        images = decode_jpeg(data[i : i + batch], mode=ImageReadMode.RGB, device=device)
        x = torch.cat([_resized(im) for im in images])
        x = ((x - mean) * inv).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            model(x).float().cpu()
    _sync(device)
    return len(data) / (time.perf_counter() - t)


def embed_bench(a: argparse.Namespace) -> None:
    from carsearch.embed import embed_dataset
    from carsearch.embed.settings import EmbedJob

    device = torch.device(a.device)
    paths = _paths(a.data)
    if device.type == "cuda":  # CUDA's and cuDNN's start-up belong to neither contender
        warm = _network(a.backbone).to(device)
        with torch.inference_mode():
            warm(torch.zeros(8, 3, 224, 224, device=device))
        del warm
    figures: dict = {"images": len(paths), "backbone": a.backbone, "device": a.device, "batch": a.batch}
    figures["baseline_images_per_s"] = round(baseline(paths, device, a.backbone, a.batch, a.workers), 1)
    t = time.perf_counter()
    r = embed_dataset(
        EmbedJob(
            a.data,
            a.work / "emb",
            backbone=a.backbone,
            weights="none",
            device=a.device,
            batch_size=a.batch,
            workers=a.workers,
            overwrite=True,
        ),
        progress=False,
    )
    wall = time.perf_counter() - t
    figures.update(
        carsearch_images_per_s=round(r.images_per_second, 1),
        carsearch_wall_images_per_s=round(r.images / wall, 1),  # the network's loading included
        carsearch_runtime=r.runtime,
        carsearch_precision=r.precision,
        carsearch_rows=r.rows,
        carsearch_vs_baseline=round(r.images_per_second / figures["baseline_images_per_s"], 2),
    )
    if a.gpu_decode:
        figures["gpu_decode_images_per_s"] = round(gpu_decode(paths, device, a.backbone, a.batch), 1)
    record(a.results, "embed", figures)


# --- faiss ----------------------------------------------------------------------------------------------


def _timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up (and the GPU's copy of the index)
    t = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - t) / repeats, out


def faiss_bench(a: argparse.Namespace) -> None:
    import faiss

    rng = np.random.default_rng(0)
    xb = rng.standard_normal((a.vectors, a.dim), dtype=np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb[rng.choice(a.vectors, a.queries, replace=False)] + 0.01
    figures: dict = {"vectors": a.vectors, "dim": a.dim, "queries": a.queries, "k": a.k}
    figures["faiss"] = faiss.__version__
    cpu = faiss.IndexFlatIP(a.dim)
    cpu.add(xb)
    s_cpu, (_, ids_cpu) = _timed(lambda: cpu.search(xq, a.k), a.repeats)
    figures["cpu_threads"] = faiss.omp_get_max_threads()
    figures["cpu_queries_per_s"] = round(a.queries / s_cpu, 1)
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if a.device == "cuda" and gpus:
        gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
        s_gpu, (_, ids_gpu) = _timed(lambda: gpu.search(xq, a.k), a.repeats)
        figures["faiss_gpu_queries_per_s"] = round(a.queries / s_gpu, 1)
        figures["faiss_gpu_vs_cpu"] = round(s_cpu / s_gpu, 1)
        figures["faiss_gpu_same_top1"] = float((ids_gpu[:, 0] == ids_cpu[:, 0]).mean())
    else:
        figures["faiss_gpu"] = (
            f"skipped: this faiss ({faiss.__version__}) has no GPU support"
            if not gpus
            else "skipped: --device is not cuda"
        )
    device = torch.device(a.device)
    tb, tq = torch.from_numpy(xb).to(device), torch.from_numpy(xq).to(device)

    def torch_search():
        out = torch.topk(tq @ tb.T, a.k, dim=1).indices
        _sync(device)
        return out

    s_t, ids_t = _timed(torch_search, a.repeats)
    figures["torch_matmul_queries_per_s"] = round(a.queries / s_t, 1)
    figures["torch_matmul_vs_faiss_cpu"] = round(s_cpu / s_t, 1)
    figures["torch_matmul_same_top1"] = float((ids_t[:, 0].cpu().numpy() == ids_cpu[:, 0]).mean())
    record(a.results, "faiss", figures)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, help="append the figures here as one JSON line")
    sub = ap.add_subparsers(dest="step", required=True)
    j = sub.add_parser("jpegs")
    j.add_argument("src", type=Path)
    j.add_argument("--out", type=Path, required=True)
    j.add_argument("--count", type=int, required=True)
    e = sub.add_parser("embed")
    e.add_argument("data", type=Path)
    e.add_argument("--work", type=Path, required=True)
    e.add_argument("--device", default="cuda")
    e.add_argument("--backbone", default="resnet50")
    e.add_argument("--batch", type=int, default=256)
    e.add_argument("--workers", type=int, default=14)
    e.add_argument("--gpu-decode", action="store_true")
    f = sub.add_parser("faiss")
    f.add_argument("--vectors", type=int, default=300_000)
    f.add_argument("--dim", type=int, default=2048)
    f.add_argument("--queries", type=int, default=1000)
    f.add_argument("--k", type=int, default=10)
    f.add_argument("--repeats", type=int, default=3)
    f.add_argument("--device", default="cuda")
    a = ap.parse_args()
    if a.step == "jpegs":
        t = time.perf_counter()
        n = make_jpegs(a.src, a.out, a.count)
        record(a.results, "jpegs", {"images": n, "seconds": round(time.perf_counter() - t, 1)})
    elif a.step == "embed":
        embed_bench(a)
    else:
        faiss_bench(a)


if __name__ == "__main__":
    main()
