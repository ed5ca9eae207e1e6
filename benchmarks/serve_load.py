"""Bounded load on `carsearch serve`, on loopback only: requests/s, p50/p99 latency, errors.

Starts `carsearch serve` as a separate process on a free 127.0.0.1 port, sends N POST /api/search
requests (real dev photos) from C concurrent clients, then stops it. Baseline in the same run: the same
classifications through the Python API (Searcher.classify, one photo at a time, no HTTP), so the ratio
shows what the HTTP layer costs.

    python benchmarks/serve_load.py INDEX_DIR [--requests 300] [--concurrency 8] [--json]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("index_dir")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    n = min(args.requests, MAX_REQUESTS)
    photos = sorted((DEV / "images").glob("*.jpg"))[:50]
    payloads = [(p.name, p.read_bytes()) for p in photos]

    # Baseline: the Python API, no HTTP, one photo at a time.
    from carsearch.embed.images import load_image
    from carsearch.search import Searcher

    searcher = Searcher.open(args.index_dir)
    searcher.classify([load_image(payloads[0][1])], k=args.k)  # warm-up
    t0 = time.perf_counter()
    for i in range(min(n, 100)):
        searcher.classify([load_image(payloads[i % len(payloads)][1])], k=args.k)
    api_rps = min(n, 100) / (time.perf_counter() - t0)
    del searcher

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "carsearch", "-q", "serve", "--index", args.index_dir, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit(f"the server did not start: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
        with httpx.Client(timeout=60) as warm:
            warm.post(f"{url}/api/search", files={"image": payloads[0]})

        def one(i: int) -> tuple[float, int]:
            name, data = payloads[i % len(payloads)]
            t = time.perf_counter()
            try:
                r = client.post(f"{url}/api/search?k={args.k}", files={"image": (name, data, "image/jpeg")})
                code = r.status_code
            except httpx.HTTPError:
                code = -1
            return time.perf_counter() - t, code

        with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=args.concurrency)) as client:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                results = list(pool.map(one, range(n)))
            wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=30)
    lat = np.array([r[0] for r in results]) * 1e3
    errors = sum(1 for r in results if r[1] != 200)
    out = {
        "requests": n,
        "concurrency": args.concurrency,
        "k": args.k,
        "requests_per_second": round(n / wall, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "errors": errors,
        "baseline_python_api_rps": round(api_rps, 2),
        "http_vs_api_ratio": round(n / wall / api_rps, 2),
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(
            f"{n} requests, {args.concurrency} concurrent, k={args.k}: {out['requests_per_second']} req/s, "
            f"p50 {out['p50_ms']} ms, p99 {out['p99_ms']} ms, errors {errors}"
        )
        print(
            f"baseline (Python API, no HTTP, one at a time): {out['baseline_python_api_rps']} "
            f"classifications/s; HTTP / API = {out['http_vs_api_ratio']}"
        )
    if errors:
        raise SystemExit(f"{errors} requests failed")


if __name__ == "__main__":
    main()
