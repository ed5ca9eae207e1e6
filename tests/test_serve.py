"""HTTP API through FastAPI's TestClient on a small real index: shapes, limits, traversal, concurrency."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from carsearch.index.build import build_index
from carsearch.search import Searcher
from carsearch.serve.app import create_app
from carsearch.serve.settings import ServeSettings
from tests.conftest import DEV, live_server

PHOTO = DEV / "images" / "00001.jpg"


@pytest.fixture(scope="module")
def index_dir(dev_embeddings: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "idx"
    build_index([dev_embeddings], out)
    return out


@pytest.fixture(scope="module")
def client(index_dir: Path) -> TestClient:
    app = create_app(
        searcher=Searcher.open(index_dir),
        settings=ServeSettings(max_upload_bytes=2_000_000, max_pixels=20_000_000),
    )
    with TestClient(app) as c:
        yield c


def _post(client: TestClient, data: bytes, params: str = "", name: str = "car.jpg") -> object:
    return client.post(f"/api/search{params}", files={"image": (name, data, "image/jpeg")})


def one_answer(response) -> dict:
    """The one photo's answer in a 200 of API version 2 (any client's response: TestClient, httpx)."""
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["api_version"] == 2 and len(body["results"]) == 1, body
    return body["results"][0]


def test_search_response_shape(client: TestClient) -> None:
    r = _post(client, PHOTO.read_bytes(), "?k=7&level=model")
    assert r.status_code == 200, r.text
    whole = r.json()
    # One shape for any number of photos: the request's settings, then one answer per photo.
    assert set(whole) == {"api_version", "k", "level", "filter", "results"}
    # "model" is the whole class's old name: accepted, answered as "class".
    assert whole["api_version"] == 2 and whole["k"] == 7 and whole["level"] == "class"
    assert whole["filter"] is None and len(whole["results"]) == 1
    body = whole["results"][0]
    assert {
        "query",
        "label",
        "confidence",
        "top5",
        "unknown",
        "neighbors",
        "openset_score",
        "threshold",
    } <= set(body)
    assert body["query"] == "car.jpg" and body["label"] == "Audi TTS Coupe 2012"
    assert len(body["neighbors"]) == 7 and 1 <= len(body["top5"]) <= 5
    n = body["neighbors"][0]
    assert {"id", "label", "score", "image_url", "path"} <= set(n) and n["image_url"].startswith(
        f"/images/{n['id']}?v="
    )
    assert isinstance(body["unknown"], bool) and 0 < body["confidence"] <= 1
    assert body["note"] is None and body["error"] is None
    assert {"make", "model", "year", "display"} <= set(body) and body["display"] == "Audi TTS Coupe 2012"
    make = one_answer(_post(client, PHOTO.read_bytes(), "?level=make"))
    assert make["label"] == "Audi" and len(make["neighbors"]) == 20
    # Two photos: the same shape, an answer each, in order; one that is no image holds its error.
    two = client.post(
        "/api/search?k=3&make=audi",
        files=[("image", ("a.jpg", PHOTO.read_bytes())), ("image", ("b.txt", b"not a photo"))],
    )
    assert two.status_code == 200, two.text
    both = two.json()
    assert set(both) == set(whole) and both["api_version"] == 2 and both["filter"]["make"] == ["audi"]
    first, second = both["results"]
    assert first["query"] == "a.jpg" and len(first["neighbors"]) == 3 and first["error"] is None
    assert second == {"query": "b.txt", "error": second["error"]} and "not_an_image" in second["error"]


def test_a_filter_given_twice_keeps_all_its_values(client: TestClient) -> None:
    twice = _post(client, PHOTO.read_bytes(), "?make=BMW&make=Audi&level=make").json()
    once = _post(client, PHOTO.read_bytes(), "?make=BMW,Audi&level=make").json()
    assert twice["filter"]["make"] == ["audi", "bmw"] and twice == once
    assert {n["make"] for n in twice["results"][0]["neighbors"]} <= {"BMW", "Audi"}


def test_info_health_page(client: TestClient) -> None:
    info = client.get("/api/info").json()
    assert info["images"] == 1568 and info["backbone"] == "efficientnet_lite0" and info["max_k"] == 200
    assert info["runtime"] == "torch"  # the suite's runtime (conftest.py); the answer names what runs
    assert client.get("/healthz").json() == {"status": "ok", "images": 1568}
    page = client.get("/")
    assert page.status_code == 200 and "<title>carsearch" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: works offline
    for asset in ("/static/app.js", "/static/style.css"):
        got = client.get(asset)
        assert got.status_code == 200 and got.text.strip(), asset
        assert "http://" not in got.text and "https://" not in got.text, asset  # no CDN here either


def test_images_by_id_only(client: TestClient, index_dir: Path) -> None:
    from carsearch.index.store import open_bundle

    bundle = open_bundle(index_dir)
    some_id = int(bundle.gallery.ids[0])
    full = client.get(f"/images/{some_id}")
    assert full.status_code == 200 and full.headers["content-type"] == "image/jpeg"
    assert full.content == (DEV / bundle.gallery.paths[0]).read_bytes()
    thumb = client.get(f"/images/{some_id}?size=64")
    assert thumb.status_code == 200 and max(Image.open(io.BytesIO(thumb.content)).size) <= 64
    assert client.get("/images/987654321").status_code == 404
    assert client.get(f"/images/{some_id}?size=5000").status_code == 422
    for attempt in (
        "/images/../../etc/passwd",
        "/images/..%2F..%2Fetc%2Fpasswd",
        "/images/%2e%2e%2f%2e%2e%2fetc",
        "/images/1%2F..%2F..%2Fetc%2Fpasswd",
        "/images/-1",
        "/images/abc",
        "/images/1.5",
    ):
        r = client.get(attempt)
        assert r.status_code in (404, 422), (attempt, r.status_code)
        assert b"root:" not in r.content


def test_limits(client: TestClient) -> None:
    # Too large: 413 (2 MB limit in this app).
    big = _post(client, b"\xff" * 3_000_000)
    assert big.status_code == 413 and "larger than 2 MB" in big.json()["error"]
    # Not an image: 400.
    r = _post(client, b"just some text")
    assert r.status_code == 400 and "not_an_image" in r.json()["error"]
    # Over the pixel limit (20 Mpx here): 400, refused from the header.
    huge = io.BytesIO()
    Image.new("L", (6000, 4000)).save(huge, "PNG")
    r = _post(client, huge.getvalue(), name="huge.png")
    assert r.status_code == 400 and "too_many_pixels" in r.json()["error"]
    # k out of range, bad level: 422.
    for params in ("?k=0", "?k=201", "?k=abc", "?level=trim"):
        assert _post(client, PHOTO.read_bytes(), params).status_code == 422, params
    # No image field, or not multipart: 400.
    assert client.post("/api/search", files={"photo": ("a.jpg", b"x")}).status_code == 400
    assert (
        client.post(
            "/api/search", content=PHOTO.read_bytes(), headers={"content-type": "image/jpeg"}
        ).status_code
        == 400
    )


def test_413_is_answered_while_reading(index_dir: Path) -> None:
    """Over a real socket: a chunked upload (no Content-Length) of up to 200 MB against a 2 MB limit.
    The 413 must arrive while the client is still sending, long before everything is sent."""
    import select
    import socket

    app = create_app(searcher=Searcher.open(index_dir), settings=ServeSettings(max_upload_bytes=2_000_000))
    with live_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(
            b"POST /api/search HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=B\r\n\r\n"
        )
        head = b'--B\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n\r\n'
        sock.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        sent_mb, response = 0, b""
        chunk = b"%x\r\n%s\r\n" % (1_000_000, b"\0" * 1_000_000)
        try:
            for _ in range(200):
                if select.select([sock], [], [], 0)[0]:
                    break  # the server has answered
                sock.sendall(chunk)
                sent_mb += 1
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed the connection after answering
        try:
            while b"\r\n\r\n" not in response:
                data = sock.recv(65536)
                if not data:
                    break
                response += data
        finally:
            sock.close()
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    # 2 MB read by the server, plus what the kernel's socket buffers had accepted meanwhile.
    assert sent_mb < 40, f"{sent_mb} MB were sent before the 413"


def test_concurrent_requests_agree(client: TestClient) -> None:
    photos = [DEV / "images" / f"{i:05d}.jpg" for i in (1, 2, 3, 4)]
    expected = {
        p.name: one_answer(_post(client, p.read_bytes(), "?k=5"))["neighbors"][0]["id"] for p in photos
    }

    def one(p: Path) -> tuple[str, int]:
        return p.name, one_answer(_post(client, p.read_bytes(), "?k=5", name=p.name))["neighbors"][0]["id"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, photos * 6))
    assert all(expected[name] == first for name, first in results)


def test_ids_beyond_int64_are_not_found(client: TestClient) -> None:
    for image_id in ("99999999999999999999999", "-99999999999999999999999", str(1 << 63)):
        r = client.get(f"/images/{image_id}")
        assert r.status_code == 404, (image_id, r.status_code)


def test_worker_settings_do_not_reuse_click_variables(
    index_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve --workers N` hands its settings to each worker in one variable of its own; click reads
    CARSEARCH_SERVE_<OPTION> for the options, and a hand-off must not be mistaken for one of them."""
    import json

    from carsearch.serve import app as serve_app

    assert not serve_app.ENV_SETTINGS.startswith("CARSEARCH_SERVE_")
    monkeypatch.setenv(
        serve_app.ENV_SETTINGS,
        json.dumps(
            {
                "index_dir": str(index_dir),
                "log_format": "text",
                "settings": {"max_upload_bytes": 1234, "precision": "fp32", "device": "cpu"},
            }
        ),
    )
    app = serve_app.app_from_env()
    with TestClient(app) as c:
        assert c.get("/api/info").json()["max_upload_bytes"] == 1234


def test_serve_takes_precision() -> None:
    from click.testing import CliRunner

    from carsearch.cli import cli

    out = CliRunner().invoke(cli, ["serve", "--help"]).output
    assert "--precision [auto|fp32|bf16]" in out and "--device" in out


def test_uploads_have_their_own_lower_pixel_limit(index_dir: Path) -> None:
    """A PNG that is small on disk but 56 megapixels is refused from its header by the default upload
    limit (50 MP), though batch embedding would take it (89 MP); the bound is configurable."""
    import io

    from PIL import Image

    from carsearch import defaults

    buf = io.BytesIO()
    Image.new("RGB", (8000, 7000), (10, 20, 30)).save(buf, "PNG")
    assert len(buf.getvalue()) < 2_000_000 and defaults.UPLOAD_MAX_PIXELS < 56_000_000 < defaults.MAX_PIXELS
    app = create_app(searcher=Searcher.open(index_dir))
    with TestClient(app) as c:
        r = c.post("/api/search", files={"image": ("big.png", buf.getvalue())})
        assert r.status_code == 400 and "too_many_pixels" in r.json()["error"]
    roomy = create_app(
        searcher=Searcher.open(index_dir), settings=ServeSettings(max_pixels=60_000_000, max_decodes=1)
    )
    with TestClient(roomy) as c:
        assert c.post("/api/search", files={"image": ("big.png", buf.getvalue())}).status_code == 200


def test_every_refusal_is_one_sentence_in_one_format(client: TestClient) -> None:
    """The app's own refusals, FastAPI's parameter validation (k=0 was a raw pydantic list) and Starlette's
    routing all answer {"error": one sentence, "status": the code}."""
    photo = PHOTO.read_bytes()
    two_texts = [("image", ("a.txt", b"one")), ("image", ("b.txt", b"two"))]
    cases = [
        (_post(client, photo, "?k=0"), 422, "k should be greater than or equal to 1 (got 0)."),
        (_post(client, photo, "?k=201"), 422, "k should be less than or equal to 200 (got 201)."),
        (_post(client, photo, "?k=abc"), 422, "k should be a valid integer"),
        (
            _post(client, photo, "?level=trim"),
            422,
            "level should be 'class', 'make', 'year' or 'model' (got trim).",
        ),
        (_post(client, photo, "?k=0&level=trim"), 422, "(got 0); level should be"),
        (_post(client, photo, "?year=20x1"), 400, "year '20x1'"),
        # A misspelt filter, or settings sent as form fields, were ignored: the answer came back unfiltered.
        (_post(client, photo, "?makes=BMW"), 400, "no query parameter 'makes'; this route takes k, level,"),
        (_post(client, photo, "?Make=BMW"), 400, "no query parameter 'Make'"),
        (
            client.post("/api/search", files={"image": ("a.jpg", photo)}, data={"make": "BMW"}),
            400,
            "form field 'make' is not read",
        ),
        (_post(client, b"just some text", name="notes.txt"), 400, "not_an_image"),
        (
            client.post("/api/search", files=two_texts),
            400,
            "none of the 2 photos can be used; the first, a.txt",
        ),
        (client.post("/api/search", files={"photo": ("a.jpg", photo)}), 400, "multipart field 'image'"),
        (client.post("/api/search", content=photo, headers={"content-type": "image/jpeg"}), 400, "multipart"),
        (_post(client, b"\xff" * 3_000_000), 413, "larger than 2 MB"),
        (client.get("/images/abc"), 422, "image_id should be a valid integer"),
        (client.get("/images/1?size=5000"), 422, "size should be less than or equal to"),
        (client.get("/images/987654321"), 404, "987654321"),
        (client.get("/api/nothing"), 404, "GET /api/nothing: not found"),
        (client.get("/api/search"), 405, "GET /api/search: method not allowed"),
        (client.post("/api/images", files={"image": ("a.jpg", photo)}), 403, "--token"),
    ]
    for r, status, words in cases:
        body = r.json()
        assert r.status_code == status and body == {"error": body.get("error"), "status": status}, (
            words,
            r.text,
        )
        assert isinstance(body["error"], str) and words in body["error"], (words, body)
        assert "\n" not in body["error"] and "{" not in body["error"], body  # a sentence, not a record


def test_empty_and_unvoted_lists_say_why(client: TestClient, unlabelled_index: Path) -> None:
    none = one_answer(_post(client, PHOTO.read_bytes(), "?make=Trabant"))
    assert none["neighbors"] == [] and none["label"] is None and none["top5"] == []
    assert none["note"] == "no indexed car passes the filter (make Trabant): widen or clear it."
    # No car to compare with is not an unknown model: nothing is rejected, no score is made up.
    assert none["unknown"] is False and none["openset_score"] is None and none["reason"] is None
    few = one_answer(_post(client, PHOTO.read_bytes(), "?k=200&make=audi"))
    assert 0 < len(few["neighbors"]) < 200 and "pass the filter" in few["note"]
    info = client.get("/api/info").json()
    assert info["api_version"] == 2 and info["labelled"] is True
    assert info["fields"] == {"make": True, "model": True, "year": True}
    with TestClient(create_app(searcher=Searcher.open(unlabelled_index))) as bare:
        info = bare.get("/api/info").json()
        assert info["labelled"] is False and info["fields"] == {"make": False, "model": False, "year": False}
        five = one_answer(bare.post("/api/search?k=5", files={"image": ("car.jpg", PHOTO.read_bytes())}))
        assert five["label"] is None and len(five["neighbors"]) == 5
        assert five["note"].startswith("the index has no labels") and five["neighbors"][0]["score"] > 0.999
        many = one_answer(bare.post("/api/search?k=20", files={"image": ("car.jpg", PHOTO.read_bytes())}))
        assert many["note"].startswith("the index has no labels") and "holds only 12 images" in many["note"]


def test_startup_objects_are_kept_out_of_full_collections(index_dir: Path) -> None:
    """What the app loads at startup sits in the collector's permanent generation, so that a full
    collection does not walk the libraries' millions of objects while requests wait (the p99 under
    load: docs/benchmarks.md). The searcher opened here, after the gc reset, must be among them."""
    import gc

    gc.unfreeze()
    try:
        searcher = Searcher.open(index_dir)
        create_app(searcher=searcher)
        frozen = gc.get_freeze_count()
        gc.collect()
        # A frozen object is never scanned again: a full collection leaves it in the permanent generation.
        assert frozen > 100_000 and gc.get_freeze_count() == frozen
        assert not any(o is searcher for o in gc.get_objects())  # not in any generation the collector walks
    finally:
        gc.unfreeze()
