"""Bounded load on `carsearch serve`, on loopback only: two settings side by side (batching, runtime).

For each setting (`--batch 1`, then the default batching), starts `carsearch serve` as a separate process
on a free 127.0.0.1 port, sends N POST /api/search requests (real dev photos) from C concurrent clients
(requests/s, p50/p99 latency, errors), then S requests from one client, one after another (single-client
latency), and reads the server's batch sizes from /metrics. Then it stops the server.

    python benchmarks/serve_load.py INDEX_DIR [--requests 300] [--concurrency 8] [--single 60] [--json]
    python benchmarks/serve_load.py INDEX_DIR --compare runtime   # PyTorch against OpenVINO, both batched
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "stanford-cars-dev"
MAX_REQUESTS = 5000  # bounded whatever the arguments say


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(index_dir: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "carsearch", "-q", "serve", "--index", index_dir, "--port", str(port), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        if time.time() > deadline or server.poll() is not None:
            raise SystemExit(f"the server did not start: {server.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)


def measure(
    index_dir: str, extra: list[str], payloads: list, n: int, concurrency: int, single: int, k: int
) -> dict:
    server, url = start(index_dir, extra)
    try:

        def one(client: httpx.Client, i: int) -> tuple[float, int]:
            name, data = payloads[i % len(payloads)]
            t = time.perf_counter()
            try:
                r = client.post(f"{url}/api/search?k={k}", files={"image": (name, data, "image/jpeg")})
                code = r.status_code
            except httpx.HTTPError:
                code = -1
            return time.perf_counter() - t, code

        with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
            for i in range(4):  # warm-up: the network's first passes, the allocator
                one(client, i)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                results = list(pool.map(lambda i: one(client, i), range(n)))
            wall = time.perf_counter() - t0
            alone = [one(client, i) for i in range(single)]
            metrics = client.get(f"{url}/metrics").text
    finally:
        server.terminate()
        server.wait(timeout=30)
    lat = np.array([r[0] for r in results]) * 1e3
    solo = np.array([r[0] for r in alone]) * 1e3
    from prometheus_client.parser import text_string_to_metric_families

    samples = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples}
    passes = samples.get("carsearch_batch_size_count", 0)
    return {
        "requests_per_second": round(n / wall, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "errors": sum(1 for r in results + alone if r[1] != 200),
        "single_client_p50_ms": round(float(np.percentile(solo, 50)), 1),
        "single_client_mean_ms": round(float(solo.mean()), 1),
        "mean_batch": round(samples.get("carsearch_batch_size_sum", 0) / passes, 2) if passes else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("index_dir")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--single", type=int, default=60, help="requests from one client, one at a time")
    ap.add_argument(
        "--compare",
        choices=("batching", "runtime"),
        default="batching",
        help="batching: --batch 1 against the default; runtime: --runtime torch against openvino",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    n = min(args.requests, MAX_REQUESTS)
    photos = sorted((DEV / "images").glob("*.jpg"))[:50]
    payloads = [(p.name, p.read_bytes()) for p in photos]

    # Two settings side by side: the baseline first, the ratios are second / first.
    if args.compare == "runtime":
        names = ("torch (--runtime torch)", "openvino (--runtime openvino)")
        extras = (["--runtime", "torch"], ["--runtime", "openvino"])
    else:
        names = ("off (--batch 1)", "on (default)")
        extras = (["--batch", "1"], [])
    off, on = (measure(args.index_dir, x, payloads, n, args.concurrency, args.single, args.k) for x in extras)
    out = {
        "requests": n,
        "concurrency": args.concurrency,
        "k": args.k,
        "compare": args.compare,
        "first": {"setting": names[0], **off},
        "second": {"setting": names[1], **on},
        "throughput_ratio": round(on["requests_per_second"] / off["requests_per_second"], 2),
        "p99_ratio": round(on["p99_ms"] / off["p99_ms"], 2),
        "single_client_ratio": round(on["single_client_p50_ms"] / off["single_client_p50_ms"], 2),
    }
    errors = off["errors"] + on["errors"]
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(
            f"{n} requests at concurrency {args.concurrency}, then {args.single} from one client; k={args.k}"
        )
        print(f"| {args.compare} | req/s | p50 ms | p99 ms | single-client p50 ms | mean batch | errors |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, r in zip(names, (off, on), strict=True):
            print(
                f"| {name} | {r['requests_per_second']} | {r['p50_ms']} | {r['p99_ms']} | "
                f"{r['single_client_p50_ms']} | {r['mean_batch']} | {r['errors']} |"
            )
        print(
            f"second / first: throughput {out['throughput_ratio']}x, p99 {out['p99_ratio']}x, "
            f"single-client latency {out['single_client_ratio']}x"
        )
    if errors:
        raise SystemExit(f"{errors} requests failed")


if __name__ == "__main__":
    main()
