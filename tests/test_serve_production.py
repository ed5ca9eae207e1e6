"""The production server through real sockets (`carsearch serve` in a subprocess on 127.0.0.1): batched
answers equal unbatched ones, filters, batch queries, tokens, live add/delete/reload (also under load and
across a kill -9), /metrics, request ids and JSON logs, graceful shutdown."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from carsearch.embed.settings import EmbedJob
from carsearch.errors import CarsearchError
from carsearch.index.build import build_index
from carsearch.index.settings import IndexSettings
from carsearch.index.store import open_bundle
from carsearch.search import Searcher
from carsearch.search.filters import Filter
from tests.conftest import DEV, dev_rows
from tests.test_serve import one_answer as answer
from tests.test_serve_socket import TIMEOUT, _free_port, _server, started_upload, wait_for

TOKEN = "s3cret-token"


def photos(n: int, offset: int = 0) -> list[Path]:
    """Dev photos not in `dev_embeddings` (which holds the first 8 of each class): the 9th onwards."""
    by_class: dict[str, list[str]] = {}
    for row in sorted(dev_rows(), key=lambda r: r["image"]):
        by_class.setdefault(row["class_id"], []).append(row["image"])
    fresh = [imgs[8] for imgs in by_class.values() if len(imgs) > 8]
    return [DEV / p for p in fresh[offset : offset + n]]


@pytest.fixture(scope="module")
def index_dir(dev_embeddings: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prod") / "idx"
    build_index([dev_embeddings], out, IndexSettings(factory="Flat"))
    return out


@pytest.fixture(scope="module")
def server(index_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("prodlog") / "stderr.log"
    with _server(index_dir, log, "--precision", "fp32", "--token", TOKEN, "--log-format", "json") as url:
        yield url, log


@contextlib.contextmanager
def serving(folder: Path, *extra: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`carsearch serve` in a subprocess whose process the test may signal: (url, process)."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "carsearch", "serve", "--index", str(folder), "--port", str(port), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url, proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


def post(url: str, files: list[Path], **params: str) -> httpx.Response:
    return httpx.post(
        f"{url}/api/search",
        params=params,
        files=[("image", (p.name, p.read_bytes(), "image/jpeg")) for p in files],
        timeout=TIMEOUT,
    )


def same_answer(got: dict, want: dict) -> None:
    assert got["label"] == want["label"]
    assert [n["id"] for n in got["neighbors"]] == [n["id"] for n in want["neighbors"]]
    np.testing.assert_allclose(
        [n["score"] for n in got["neighbors"]], [n["score"] for n in want["neighbors"]], atol=1e-4
    )


def test_batched_answers_equal_unbatched_under_concurrency(server, index_dir: Path) -> None:
    url, _ = server
    queries = photos(24)
    searcher = Searcher.open(index_dir, precision="fp32")
    want = {p.name: r.to_json() for p, r in zip(queries, searcher.classify(queries, k=20), strict=True)}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: post(url, [p]), queries))
    for p, r in zip(queries, answers, strict=True):
        same_answer(answer(r), want[p.name])
    metrics = httpx.get(f"{url}/metrics", timeout=TIMEOUT).text
    sizes = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples}
    # Fewer forward passes than queries: some were shared.
    assert (
        sizes["carsearch_batch_size_sum"] >= 24
        and sizes["carsearch_batch_size_count"] < sizes["carsearch_batch_size_sum"]
    )


def test_batch_query_in_one_request(server, index_dir: Path) -> None:
    url, _ = server
    queries = photos(3, 30)
    r = post(url, [*queries, DEV / "labels.csv"])
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["query"] for x in results] == [*(p.name for p in queries), "labels.csv"]
    assert "not_an_image" in results[-1]["error"]
    for p, got in zip(queries, results[:-1], strict=True):
        same_answer(got, answer(post(url, [p])))


def test_filters_on_the_api_equal_the_oracle(server, index_dir: Path) -> None:
    url, _ = server
    bundle = open_bundle(index_dir)
    g = bundle.gallery
    make = str(g.make[0])
    r = post(url, photos(1), k="12", make=make.upper())
    body = answer(r)
    # The oracle: exact cosine over the photos of that make only.
    query = Searcher.open(index_dir, precision="fp32").embed(photos(1))[0][0]
    mask = np.char.lower(g.make.astype(str)) == make.lower()
    vectors = np.vstack([bundle.index.faiss.reconstruct(int(i)) for i in g.ids[mask]])
    order = np.argsort(-(vectors @ query), kind="stable")[:12]
    assert [n["id"] for n in body["neighbors"]] == [int(i) for i in g.ids[mask][order]]
    assert all(n["make"] == make for n in body["neighbors"]) and r.json()["filter"]["make"] == [make.lower()]
    assert post(url, photos(1), year="20x1").status_code == 400
    none = answer(post(url, photos(1), make="no such make"))
    assert none["neighbors"] == [] and none["label"] is None and "no indexed car passes" in none["note"]


def test_tokens(server, index_dir: Path, tmp_path: Path) -> None:
    url, _ = server
    photo = photos(1, 40)[0]
    files = {"image": (photo.name, photo.read_bytes(), "image/jpeg")}
    assert httpx.post(f"{url}/api/images", files=files, timeout=TIMEOUT).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.post(f"{url}/api/images", files=files, headers=wrong, timeout=TIMEOUT).status_code == 401
    assert httpx.delete(f"{url}/api/images/1", headers=wrong, timeout=TIMEOUT).status_code == 401
    assert httpx.post(f"{url}/api/reload", headers=wrong, timeout=TIMEOUT).status_code == 401
    # A server started without a token has no write routes at all.
    with _server(index_dir, tmp_path / "ro.log") as ro:
        r = httpx.post(
            f"{ro}/api/images", files=files, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=TIMEOUT
        )
        assert r.status_code == 403 and "--token" in r.json()["error"]


def auth() -> dict:
    return {"Authorization": f"Bearer {TOKEN}"}


def test_add_search_delete_search(server, index_dir: Path) -> None:
    url, _ = server
    photo = photos(1, 50)[0]
    before = httpx.get(f"{url}/api/info", timeout=TIMEOUT).json()["images"]
    r = httpx.post(
        f"{url}/api/images",
        files={"image": (photo.name, photo.read_bytes(), "image/jpeg")},
        data={"make": "Testmake", "model": "Roadster", "year": "2031"},
        headers=auth(),
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    new_id = r.json()["id"]
    hit = answer(post(url, [photo], k="5"))["neighbors"][0]  # searchable at once: the very next search
    assert hit["id"] == new_id and hit["score"] > 0.999 and hit["label"] == "Testmake Roadster 2031"
    assert httpx.get(f"{url}/images/{new_id}", timeout=TIMEOUT).content == photo.read_bytes()
    assert httpx.get(f"{url}/api/info", timeout=TIMEOUT).json()["images"] == before + 1
    only = answer(post(url, [photo], make="testmake"))["neighbors"]
    assert [n["id"] for n in only] == [new_id]  # the filter sees the new photo's labels
    # The same file again: refused (409) with the id it already has, unless allow_duplicates is sent.
    files = {"image": (photo.name, photo.read_bytes(), "image/jpeg")}
    dup = httpx.post(f"{url}/api/images", files=files, headers=auth(), timeout=TIMEOUT)
    assert dup.status_code == 409 and f"image {new_id}" in dup.json()["error"], dup.text
    assert httpx.get(f"{url}/api/info", timeout=TIMEOUT).json()["images"] == before + 1
    r = httpx.delete(f"{url}/api/images/{new_id}", headers=auth(), timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert new_id not in [n["id"] for n in answer(post(url, [photo], k="5"))["neighbors"]]
    assert httpx.get(f"{url}/api/info", timeout=TIMEOUT).json()["images"] == before
    assert httpx.delete(f"{url}/api/images/{new_id}", headers=auth(), timeout=TIMEOUT).status_code == 404
    assert open_bundle(index_dir).index.ntotal == before  # on disk too


def test_kill_9_after_an_acknowledged_add_loses_nothing(dev_embeddings: Path, tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    build_index([dev_embeddings], folder, IndexSettings(factory="HNSW32"))
    before = open_bundle(folder).index.ntotal
    photo = photos(1, 60)[0]
    with serving(folder, "--token", TOKEN) as (url, proc):
        r = httpx.post(
            f"{url}/api/images",
            files={"image": (photo.name, photo.read_bytes(), "image/jpeg")},
            data={"label": "kept"},
            headers=auth(),
            timeout=TIMEOUT,
        )
        assert r.status_code == 200, r.text
        os.kill(proc.pid, signal.SIGKILL)
    bundle = open_bundle(folder)  # checks every file against index.json
    new_id = r.json()["id"]
    assert bundle.index.ntotal == before + 1 and new_id in bundle.gallery.ids.tolist()
    # HNSW cannot forget: deleting is refused with the reason (409), nothing changes.
    with _server(folder, tmp_path / "s.log", "--token", TOKEN) as again:
        r = httpx.delete(f"{again}/api/images/{new_id}", headers=auth(), timeout=TIMEOUT)
        assert r.status_code == 409 and "HNSW" in r.json()["error"]
    # A rebuild from the embedding folders would drop the acknowledged photo: refused unless asked for.
    from carsearch.errors import CarsearchError

    with pytest.raises(CarsearchError, match="holds 1 photos added over POST /api/images"):
        build_index([dev_embeddings], folder, IndexSettings(factory="HNSW32"))
    assert open_bundle(folder).index.ntotal == before + 1
    build_index([dev_embeddings], folder, IndexSettings(factory="HNSW32"), drop_uploads=True)
    assert open_bundle(folder).index.ntotal == before


def test_reload_under_load_fails_no_request(
    server, index_dir: Path, dev_embeddings: Path, tmp_path: Path
) -> None:
    url, _ = server
    other = tmp_path / "rebuilt"
    build_index([dev_embeddings], other, IndexSettings(factory="HNSW32"))
    stop, statuses = threading.Event(), []
    queries = photos(4, 70)

    def load() -> None:
        i = 0
        while not stop.is_set():
            statuses.append(post(url, [queries[i % len(queries)]]).status_code)
            i += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    # The reload comes once searches are answered, and the load goes on until more have been answered after
    # it: requests before, during and after the swap.
    wait_for(lambda: len(statuses) >= 8, "8 searches under load before the reload")
    r = httpx.post(f"{url}/api/reload", json={"index": str(other)}, headers=auth(), timeout=TIMEOUT)
    reloaded = len(statuses)
    wait_for(lambda: len(statuses) >= reloaded + 8, "8 searches after the reload")
    stop.set()
    for t in threads:
        t.join(timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    info = httpx.get(f"{url}/api/info", timeout=TIMEOUT).json()
    assert info["factory"] == "HNSW32" and len(statuses) >= 16 and set(statuses) == {200}
    # Back to the first folder, for the other tests.
    r = httpx.post(f"{url}/api/reload", json={"index": str(index_dir)}, headers=auth(), timeout=TIMEOUT)
    assert r.status_code == 200 and httpx.get(f"{url}/api/info", timeout=TIMEOUT).json()["factory"] == "Flat"


def test_metrics_request_ids_and_json_logs(server) -> None:
    url, log = server
    r = httpx.get(f"{url}/api/info", headers={"X-Request-ID": "trace-42"}, timeout=TIMEOUT)
    assert r.headers["x-request-id"] == "trace-42"
    mine = post(url, photos(1)).headers["x-request-id"]
    assert len(mine) == 16
    text = httpx.get(f"{url}/metrics", timeout=TIMEOUT).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "carsearch_requests",
        "carsearch_request_seconds",
        "carsearch_batch_size",
        "carsearch_queue_wait_seconds",
        "carsearch_index_images",
    ):
        assert name in families, name
    searches = [
        s
        for s in families["carsearch_requests"].samples
        if s.labels.get("route") == "/api/search" and s.labels.get("status") == "200"
    ]
    assert searches and searches[0].value >= 1

    def access() -> list[dict]:
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        return [x for x in lines if x["logger"] == "carsearch.serve.access"]

    # The access line is written as a request ends, which the client may see first: wait for it.
    wait_for(lambda: any(x["request_id"] == mine for x in access()), "the search's access line")
    assert any(x["request_id"] == "trace-42" and x["route"] == "/api/info" for x in access())
    assert any(x["request_id"] == mine and x["status"] == 200 for x in access())


def test_graceful_shutdown_finishes_in_flight_requests(index_dir: Path) -> None:
    """SIGTERM while a 24-photo request is in flight (the app has begun reading its body: it answered
    100-continue): the request is answered in full, then the server exits."""
    queries = photos(24, 80)
    body = b"".join(
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="%s"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n%s\r\n" % (p.name.encode(), p.read_bytes())
        for p in queries
    )
    body += b"--b--\r\n"
    with serving(index_dir) as (url, proc):
        with started_upload(int(url.rsplit(":", 1)[1]), len(body)) as s:
            proc.send_signal(signal.SIGTERM)
            s.sendall(body)
            reply = b""
            while chunk := s.recv(65536):  # the server closes the connection after this last answer
                reply += chunk
        head, _, payload = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert [x["query"] for x in json.loads(payload)["results"]] == [p.name for p in queries]
        assert all(x["error"] is None for x in json.loads(payload)["results"])
        # uvicorn stops cleanly, then re-raises the signal it caught, as a process killed by it would.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)


def test_filter_parsing() -> None:
    f = Filter.parse(make=" BMW , audi", year="2008-2010, 2012,-1999")
    assert f.values("make") == ("audi", "bmw") and f.values("year") == ((2008, 2010), (2012, 2012), (0, 1999))
    assert f.values("model") == () and f.describe() == "make BMW , audi; year 2008-2010, 2012,-1999"
    years = [[2008, 2010], [2012, 2012], [0, 1999]]
    assert f.to_json() == {"make": ["audi", "bmw"], "model": [], "years": years}
    keep = f.mask(
        {
            "make": np.array(["BMW", "Audi", "BMW", "Fiat"]),
            "model": np.array(["", "", "", ""]),
            "year": np.array(["2009", "2012", "2011", "2009"]),
        }
    )
    assert keep.tolist() == [True, True, False, False]
    assert not Filter.parse(model="", year=None)
    with pytest.raises(CarsearchError, match="no filter 'colour'; filters are make, model, year"):
        Filter.parse(colour="red")


def test_a_new_filter_field_reaches_every_surface(monkeypatch: pytest.MonkeyPatch) -> None:
    """A field added to datasets/attributes.FILTER_FIELDS alone becomes a filter, a CLI option of the
    commands that take filters, a query parameter of POST /api/search and a control of the page."""
    import inspect

    import click

    from carsearch.cli.search import filter_options
    from carsearch.datasets import attributes
    from carsearch.serve import app

    body = attributes.FilterField("body", attributes.NAMES, "Only these body styles.", "any, e.g. Sedan")
    monkeypatch.setattr(attributes, "FILTER_FIELDS", (*attributes.FILTER_FIELDS, body))
    f = Filter.parse(body="sedan,SUV")
    rows = {"make": np.array(["a", "b", "c"]), "model": np.array([""] * 3), "year": np.array([""] * 3)}
    assert f.mask({**rows, "body": np.array(["Sedan", "Coupe", "suv"])}).tolist() == [True, False, True]
    assert f.to_json()["body"] == ["sedan", "suv"] and f.describe() == "body sedan,SUV"
    seen = []
    command = click.command()(filter_options(lambda where: seen.append(where)))
    assert [p.name for p in command.params] == ["make", "model", "year", "body"]
    command(["--body", "Coupe"], standalone_mode=False)
    assert seen[0].values("body") == ("coupe",)
    assert 'id="f-body" data-filter="body"' in app.filter_controls()
    declared = inspect.signature(app._filter_parameters()).parameters
    assert list(declared) == ["request", "make", "model", "year", "body"]


# RR32, a random rotation, is the transform-in-front-of-IVF path (as OPQ takes it) without OPQ's
# training, which took 15 s on 20,000 vectors (issue 22, point 9).
@pytest.mark.parametrize("factory", ["HNSW32", "IVF64,Flat", "RR32,IVF64,Flat", "PQ16"])
def test_selective_filter_recall_on_every_path(factory: str) -> None:
    """1% of 20,000 vectors allowed, through faiss's selector (HNSW, IVF, a transform + IVF) or the
    post-filter (PQ, which takes no selector): recall@10 against the exact oracle over the allowed
    subset."""
    from carsearch.index.core import Index
    from carsearch.search.filters import filtered_search

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, 32))
    x = (centres[rng.integers(0, 50, 20_000)] + 0.6 * rng.normal(size=(20_000, 32))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(20_000, dtype=np.int64) * 7
    index = Index.build(factory, x, ids, seed=0, target_recall=0.95)
    allowed = np.sort(rng.choice(ids, 200, replace=False))
    q = x[rng.choice(20_000, 50, replace=False)]
    _, found = filtered_search(index, q, 10, allowed, exact_limit=0)
    assert np.isin(found[found >= 0], allowed).all()
    sub = x[np.searchsorted(ids, allowed)]
    truth = allowed[np.argsort(-(q @ sub.T), axis=1)[:, :10]]
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
    assert recall >= 0.95, recall
    _, exact = filtered_search(index, q, 10, allowed)  # the default: exact over the subset
    if factory == "HNSW32":
        assert (exact == truth).mean() > 0.99


def test_rebuilt_and_reloaded_index_never_serves_a_stale_photo(tmp_path: Path) -> None:
    """An index rebuilt in place over other photos (ids are positions: id 0 is now another car) and
    reloaded: the answers' image URLs change with the content, image responses carry an ETag from the
    file's sha256, and a client revalidating the old URL's ETag gets the new photo, not a 304."""
    from carsearch.embed import embed_dataset
    from tests.conftest import _subset_labels, pick_range

    folder = tmp_path / "idx"
    made = {}
    for name, start in (("first", 0), ("second", 1)):
        labels = _subset_labels(tmp_path / f"{name}.csv", pick_range(list(range(1, 21)), start, start + 1))
        emb = tmp_path / name
        embed_dataset(
            EmbedJob(DEV, emb, labels_file=labels, backbone="efficientnet_lite0", workers=0), progress=False
        )
        made[name] = emb
    build_index([made["first"]], folder, IndexSettings(factory="Flat", calibrate=False))
    query = DEV / pick_range([1], 0, 1)[0]["image"]
    with serving(folder, "--token", TOKEN) as (url, _):
        first = answer(post(url, [query], k="1"))["neighbors"][0]
        assert first["score"] > 0.99 and "?v=" in first["image_url"]
        image_id = first["id"]
        r0 = httpx.get(f"{url}{first['image_url']}", timeout=TIMEOUT)
        etag = r0.headers["etag"]
        assert r0.status_code == 200 and etag
        again = httpx.get(f"{url}{first['image_url']}", headers={"If-None-Match": etag}, timeout=TIMEOUT)
        assert again.status_code == 304
        build_index(
            [made["second"]], folder, IndexSettings(factory="Flat", calibrate=False)
        )  # in place: id 0 is another photo
        assert httpx.post(f"{url}/api/reload", headers=auth(), timeout=TIMEOUT).status_code == 200
        second = answer(post(url, [query], k="20"))["neighbors"]
        now = next(n for n in second if n["id"] == image_id)
        assert now["image_url"] != first["image_url"]
        fresh = httpx.get(f"{url}/images/{image_id}", headers={"If-None-Match": etag}, timeout=TIMEOUT)
        assert fresh.status_code == 200 and fresh.headers["etag"] != etag
        assert fresh.content != r0.content  # another photo now, not the cached old one
        thumb = httpx.get(f"{url}{now['image_url']}&size=64", timeout=TIMEOUT)
        assert thumb.status_code == 200 and thumb.headers["etag"].endswith('-64"')
