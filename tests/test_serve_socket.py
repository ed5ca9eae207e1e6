"""The server's hostile cases through a real socket: `carsearch serve` in a subprocess on 127.0.0.1.
Every loop here is bounded in count and time, and only talks to this machine's loopback."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from carsearch.index.build import build_index
from tests.conftest import DEV

PHOTO = DEV / "images" / "00001.jpg"
TIMEOUT = 60  # seconds for a client to wait on this server: a loaded 2-core CI machine is slow, not broken


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def index_dir(dev_embeddings: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("socket") / "idx"
    build_index([dev_embeddings], out)
    return out


@contextlib.contextmanager
def _server(index_dir: Path, log: Path, *extra: str) -> Iterator[str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "carsearch", "serve", "--index", str(index_dir), "--port", str(port), *extra]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def wait_for(condition, what: str, seconds: float = TIMEOUT, every: float = 0.05):
    """Poll `condition()` until it returns something true (returned), failing after `seconds`: a generous
    deadline for a slow machine, never a fixed sleep that a slow machine can outrun."""
    deadline = time.monotonic() + seconds
    while not (got := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        time.sleep(every)
    return got


def started_upload(port: int, length: int) -> socket.socket:
    """A connection whose POST /api/search headers (Content-Length `length`) the server has read and whose
    body the app has begun to read: it answers `Expect: 100-continue` when the app first asks for the body."""
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    s.sendall(
        b"POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % length
    )
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(1024)
        assert chunk, got
        got += chunk
    assert got.startswith(b"HTTP/1.1 100 "), got
    return s


@pytest.fixture(scope="module")
def server(index_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    log = tmp_path_factory.mktemp("serverlog") / "stderr.log"
    with _server(index_dir, log, "--header-timeout", "1", "--body-timeout", "2") as url:
        yield url, log


def test_a_port_in_use_is_said_before_serving(index_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "carsearch", "serve", "--index", str(index_dir), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "serving" not in r.stderr


def test_head_and_huge_ids(server: tuple[str, Path]) -> None:
    url, _ = server
    for path in ("/", "/healthz", "/api/info", "/images/0", "/images/0?size=64"):
        assert httpx.head(url + path, timeout=TIMEOUT).status_code == 200, path
    assert httpx.get(f"{url}/images/99999999999999999999999", timeout=TIMEOUT).status_code == 404
    assert httpx.get(f"{url}/images/-99999999999999999999999", timeout=TIMEOUT).status_code == 404


def test_a_client_that_leaves_mid_upload_costs_one_log_line(server: tuple[str, Path]) -> None:
    """The server is reading the upload (it answered 100-continue) when the client leaves: one line says
    so, beside the request's access line (same request id), and no traceback."""
    url, log = server
    port = int(url.rsplit(":", 1)[1])
    body = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n' + b"x" * 5000
    with started_upload(port, 100_000) as s:
        s.sendall(body)
    went = re.compile(r"client 127\.0\.0\.1 went away during its upload \[(\w+)\]")
    line = wait_for(lambda: went.search(log.read_text()), "the log line of the client that went away")
    rid = line.group(1)
    # The access line comes once the request is over: then this request's lines are all written.
    wait_for(lambda: "POST /api/search 400" in log.read_text(), "the request's access line")
    text = log.read_text()
    mine = [ln for ln in text.splitlines() if ln.endswith(f" [{rid}]")]
    assert len(mine) == 2 and mine[0] == line.group(0), mine
    assert re.fullmatch(rf"POST /api/search 400 [\d.]+ ms \[{rid}\]", mine[1]), mine
    assert len(went.findall(text)) == 1 and "Traceback" not in text and "ERROR" not in text, text
    assert httpx.get(f"{url}/healthz", timeout=TIMEOUT).status_code == 200  # still serving


def test_slow_clients_are_timed_out(server: tuple[str, Path]) -> None:
    """30 clients dribbling their headers one byte at a time, and one dribbling its body, are cut off
    after the deadlines (1 s headers, 2 s body here) instead of holding their connections. The waits below
    end as soon as that happens, or after a minute: without the deadlines these clients are never cut off
    (a loaded machine is slow, not broken; how fast the cut comes is not measured here)."""
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]
    start = time.time()
    closed = set()
    try:
        while time.time() - start < TIMEOUT and len(closed) < len(slow):
            for i, s in enumerate(slow):
                if i in closed:
                    continue
                try:
                    s.sendall(b"G" if time.time() - start < 0.2 else b"X")
                except OSError:
                    closed.add(i)
                    continue
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    if s.recv(1) == b"":
                        closed.add(i)
                s.setblocking(True)
            time.sleep(0.1)
        assert len(closed) == len(slow)
    finally:
        for s in slow:
            s.close()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(
            b"POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n"
            b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
        )
        s.settimeout(0.5)
        start, answer = time.time(), b""
        while time.time() - start < TIMEOUT and b"HTTP/1.1" not in answer:
            with contextlib.suppress(OSError):
                s.sendall(b"x" * 10)
            with contextlib.suppress(TimeoutError):
                answer += s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:80]  # only the body deadline answers 408
    r = httpx.post(f"{url}/api/search", files={"image": PHOTO.read_bytes()}, timeout=TIMEOUT)
    assert r.status_code == 200
