"""Server memory under a burst of uploads that are small on disk and huge in pixels.

A 9000 x 9000 PNG of one colour is ~240 KB on disk and 243 MB decoded. N of them are posted at once to a
real `carsearch serve` (uvicorn, 127.0.0.1), and the server's resident memory (VmRSS, polled every 10 ms)
is reported: idle, peak, and after the burst. Side by side in one run:

  unbounded   every upload decoded at once (--max-decodes N, the upload pixel limit raised to 90 MP),
              the server as it was before the bound;
  bounded     the same uploads decoded, at most 2 at a time (--max-decodes 2, pixel limit 90 MP);
  default     the shipped settings: the 81-megapixel uploads are refused from their header (50 MP limit).

    python benchmarks/serve_memory.py INDEX_DIR [--uploads 16]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def huge_png(side: int = 9000) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (40, 90, 160)).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def measure(index: str, extra: list[str], png: bytes, uploads: int) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "carsearch", "-q", "serve", "--index", index, "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        # Warm up with one small real query so the network is loaded before "idle" is read.
        photo = next(
            (Path(__file__).resolve().parents[2] / "shared/data/stanford-cars-dev/images").glob("*.jpg")
        )
        httpx.post(f"{url}/api/search", files={"image": photo.read_bytes()}, timeout=60)
        time.sleep(1)
        idle = rss_mb(proc.pid)
        peak, stop = [idle], threading.Event()

        def poll() -> None:
            while not stop.is_set():
                peak.append(rss_mb(proc.pid))
                time.sleep(0.01)

        poller = threading.Thread(target=poll)
        poller.start()

        def post(_: int) -> int:
            r = httpx.post(f"{url}/api/search", files={"image": ("big.png", png)}, timeout=300)
            return r.status_code

        t0 = time.perf_counter()
        with ThreadPoolExecutor(uploads) as pool:
            codes = list(pool.map(post, range(uploads)))
        seconds = time.perf_counter() - t0
        time.sleep(3)
        stop.set()
        poller.join()
        after = rss_mb(proc.pid)
        return {
            "idle_mb": round(idle),
            "peak_mb": round(max(peak)),
            "peak_above_idle_mb": round(max(peak) - idle),
            "after_mb": round(after),
            "after_above_idle_mb": round(after - idle),
            "statuses": {str(c): codes.count(c) for c in sorted(set(codes))},
            "seconds": round(seconds, 1),
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("index")
    ap.add_argument("--uploads", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    png = huge_png()
    configs = {
        "unbounded": ["--max-decodes", str(a.uploads), "--max-pixels", "90000000"],
        "bounded": ["--max-decodes", "2", "--max-pixels", "90000000"],
        "default": [],
    }
    rows = {name: measure(a.index, extra, png, a.uploads) for name, extra in configs.items()}
    if a.json:
        print(json.dumps({"png_bytes": len(png), "uploads": a.uploads, "results": rows}, indent=2))
        return
    print(
        f"{a.uploads} concurrent uploads of a 9000x9000 PNG ({len(png) / 1e3:.0f} KB on disk, 243 MB decoded)"
    )
    print(
        f"{'server':<10} {'idle MB':>8} {'peak MB':>8} {'peak-idle':>10} {'after-idle':>11} "
        f"{'seconds':>8}  answers"
    )
    for name, r in rows.items():
        print(
            f"{name:<10} {r['idle_mb']:>8} {r['peak_mb']:>8} {r['peak_above_idle_mb']:>10} "
            f"{r['after_above_idle_mb']:>11} {r['seconds']:>8}  {r['statuses']}"
        )


if __name__ == "__main__":
    main()
