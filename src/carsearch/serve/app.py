"""FastAPI app: POST /api/search, GET /images/{id}, GET /api/info, GET /healthz, GET /metrics, GET / (the
page), and with a token POST /api/images, DELETE /api/images/{id}, POST /api/reload.

One answer shape for any number of photos (API_VERSION 2): `{"api_version": 2, "k", "level", "filter",
"results": [one object per photo]}`; a photo that cannot be used holds `error` in place of its answer, a
request none of whose photos can be used is refused. Every refusal is `{"error": sentence, "status": code}`
(serve/refusals.py); an empty or unvoted list comes with a `note` that says why.

Concurrency: one Searcher is shared by every request. Uploads are decoded in FastAPI's thread pool (at
most `max_decodes` at once) and framed to the network's input; concurrent queries then share forward
passes (serve/batcher.py); faiss searches run concurrently under a read lock that live changes take
exclusively (serve/live.py). Without a token the index folder is never written.
"""

from __future__ import annotations

import io
import json
import logging
import mimetypes
import os
import threading
from concurrent.futures import Future
from dataclasses import asdict
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from carsearch import __version__, defaults
from carsearch.embed.images import BadImage, load_image
from carsearch.errors import CarsearchError
from carsearch.index.store import is_image_id
from carsearch.search import Searcher
from carsearch.search.filters import Filter
from carsearch.serve import memory, refusals
from carsearch.serve.batcher import Batcher
from carsearch.serve.limits import read_form
from carsearch.serve.live import LiveIndex
from carsearch.serve.observe import Metrics, Observe
from carsearch.serve.protocol import BodyDeadline
from carsearch.serve.settings import ServeSettings
from carsearch.serve.writes import add_write_routes

log = logging.getLogger(__name__)

MAX_K = defaults.SERVE_MAX_K
THUMB_MAX = defaults.THUMB_MAX
BIG_DECODE = 4_000_000  # pixels: after such a decode, hand freed memory back to the OS
# The answer's version. 1: one photo answered by its object, several by {"results": [...]}, FastAPI's
# own 422 records. 2: {"api_version", "k", "level", "filter", "results": [...]} for any number of photos,
# every refusal {"error", "status"}, a `note` on every empty or unvoted list.
API_VERSION = 2


def create_app(
    index_dir: str | Path | None = None,
    searcher: Searcher | None = None,
    settings: ServeSettings | None = None,
) -> FastAPI:
    """The app over an index folder (or an already open Searcher), run as `settings` say
    (serve/settings.py). Raises ValueError when neither index_dir nor searcher is given, CarsearchError
    for an index folder that cannot be opened."""
    cfg = settings or ServeSettings()
    max_upload_bytes, max_pixels, token = cfg.max_upload_bytes, cfg.max_pixels, cfg.token
    if searcher is None:
        if index_dir is None:
            raise ValueError("give index_dir or searcher")
        searcher = Searcher.open(
            index_dir, device=cfg.device, precision=cfg.precision, max_pixels=max_pixels, runtime=cfg.runtime
        )
    searcher.max_pixels = max_pixels
    s = searcher
    _ = s.encoder  # the network loads now, once: lazily, concurrent first requests would each load it
    live = LiveIndex(s)
    decode_slots = threading.BoundedSemaphore(cfg.max_decodes)
    memory.tune_allocator()
    metrics = Metrics()
    metrics.images.set_function(lambda: s.bundle.index.ntotal)
    batcher = (
        Batcher(s.embed_arrays, cfg.batch_size, cfg.batch_wait_ms / 1000, metrics.batch)
        if cfg.batch_size > 1
        else None
    )
    app = FastAPI(title="carsearch", version=__version__, docs_url="/api/docs", redoc_url=None)
    refusals.install(app)
    app.add_middleware(BodyDeadline, seconds=cfg.body_timeout)
    app.add_middleware(Observe, metrics=metrics)  # outermost: sees every request, 408s and 413s included
    app.state.live, app.state.metrics = live, metrics
    static = resources.files("carsearch.serve") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    page = (resources.files("carsearch.serve") / "templates" / "index.html").read_text()

    def sha256_of(image_id: int) -> str:
        """The indexed file's sha256 ("" for rows without one): the photo's identity across reloads."""
        if not is_image_id(image_id):
            return ""  # not an id at all: the route answers 404 for it
        g = s.bundle.gallery
        row = int(g.rows(np.array([image_id], np.int64))[0])
        return str(g.sha256[row]) if row >= 0 else ""

    def image_url(image_id: int) -> str:
        # The URL names the content too: after a rebuild and reload an id may name another photo, and a
        # cached copy under the old URL must not stand in for it.
        digest = sha256_of(image_id)
        return f"/images/{image_id}?v={digest[:16]}" if digest else f"/images/{image_id}"

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    def healthz() -> dict:  # no lock: a health check must answer while a change is being written
        return {"status": "ok", "images": int(s.bundle.index.ntotal)}

    @app.api_route("/api/info", methods=["GET", "HEAD"])
    def info() -> dict:
        i = s.info
        return {
            "images": i["ntotal"],
            "factory": i["factory"],
            "search_params": i["search_params"],
            "dim": i["dim"],
            "backbone": i["provenance"]["backbone"],
            "weights": i["provenance"]["weights"],
            "crop": i["provenance"]["preprocessing"]["crop"],
            "runtime": s.encoder.runtime,
            "recall@10": (i.get("recall") or {}).get("measured"),
            "openset": i.get("openset"),
            "labelled": bool(any(s.bundle.gallery.labels)),
            # which filters can apply: the fields some indexed photo has (the page hides the others)
            "fields": {f: bool(any(getattr(s.bundle.gallery, f))) for f in ("make", "model", "year")},
            "makes": sorted({str(m) for m in s.bundle.gallery.make if m})[:500],
            "max_upload_bytes": max_upload_bytes,
            "max_k": MAX_K,
            "batching": {"max_batch": cfg.batch_size, "max_wait_ms": cfg.batch_wait_ms} if batcher else None,
            "writes": token is not None,
            "version": __version__,
            "api_version": API_VERSION,
        }

    @app.api_route("/metrics", methods=["GET"])
    def metrics_route() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/api/search")
    async def search(
        request: Request,
        k: int = Query(defaults.K_VOTE, ge=1, le=MAX_K, description="neighbours that vote and are shown"),
        level: Literal["model", "make", "year"] = Query("model"),
        make: str | None = Query(None, description="only these makes, comma-separated"),
        model: str | None = Query(None, description="only these models, comma-separated"),
        year: str | None = Query(None, description="2012, 2008-2012, 2010-, -2005, or a list"),
    ) -> dict:
        try:
            where = Filter.parse(make, model, year) or None
        except CarsearchError as e:
            raise HTTPException(400, str(e)) from None
        form = await read_form(request, max_upload_bytes, defaults.SERVE_MAX_QUERIES)
        uploads = [u for u in form.getlist("image") if not isinstance(u, str)]
        if not uploads:
            raise HTTPException(400, "send the photo in the multipart field 'image'")
        if len(uploads) > defaults.SERVE_MAX_QUERIES:
            raise HTTPException(400, f"at most {defaults.SERVE_MAX_QUERIES} images per request")
        files = [(await u.read(), u.filename or "upload") for u in uploads]
        await form.close()
        from starlette.concurrency import run_in_threadpool

        results = await run_in_threadpool(_classify_many, files, k, level, where)
        if all(r["error"] for r in results):
            if len(results) == 1:
                raise HTTPException(400, results[0]["error"])
            name, why = results[0]["query"], results[0]["error"]
            raise HTTPException(
                400, f"none of the {len(results)} photos can be used; the first, {name}: {why}"
            )
        return {
            "api_version": API_VERSION,
            "k": k,
            "level": level,
            "filter": where.to_json() if where else None,
            "results": results,
        }

    def frame(data: bytes) -> np.ndarray:
        """Decode an upload (inside a decode slot) and frame it to the network's input: a small array."""
        with decode_slots:
            try:
                image = load_image(data, s.max_pixels, s.encoder.preprocessing.draft_size)
            except BadImage as e:
                raise HTTPException(400, f"not a usable image ({e.reason}): {e.detail}") from None
            big = image.width * image.height >= BIG_DECODE
            array = s.encoder.preprocessing.apply(image)
            del image
        if big:
            memory.release()
        return array

    def embed_async(data: bytes) -> Future:
        """The upload's embedding, computed in a batch with other queries (or at once, batching off)."""
        if batcher is None:
            done: Future = Future()
            done.set_result(s.embed_arrays(frame(data)[None])[0])
            metrics.batch(1, 0.0)
            return done
        with batcher.arriving():
            return batcher.submit(frame(data))

    def embed_one(data: bytes) -> np.ndarray:
        return embed_async(data).result()

    def _answer(vector: np.ndarray, name: str, k: int, level: str, where: Filter | None) -> dict:
        with live.lock.read():
            result = s.classify(vector[None], k=k, level=level, where=where)[0]
            urls = [image_url(n.id) for n in result.neighbors]  # the same version of the index
            unvoted = result.label is None and bool(result.neighbors)
            labelled = not unvoted or bool(any(s.bundle.gallery.labels))
        body = asdict(result)
        body["query"] = name
        for n, url in zip(body["neighbors"], urls, strict=True):
            n["image_url"] = url
        if unvoted:
            why = (
                f"none of these {len(result.neighbors)} cars has a {level} label, so none is voted."
                if labelled
                else "the index has no labels: these are the most similar photos, with no make or model vote."
            )
            body["note"] = f"{why.rstrip('.')}; {body['note']}" if body["note"] else why  # and any shortfall
        return body

    def _classify_many(
        files: list[tuple[bytes, str]], k: int, level: str, where: Filter | None
    ) -> list[dict]:
        # All submitted before any is awaited: a request's images share forward passes too.
        pending: list[Future | str] = []
        for data, _ in files:
            try:
                pending.append(embed_async(data))
            except HTTPException as e:
                pending.append(str(e.detail))
        out = []
        for (_, name), p in zip(files, pending, strict=True):
            if isinstance(p, str):
                out.append({"query": name, "error": p})
            else:
                out.append(_answer(p.result(), name, k, level, where))
        return out

    add_write_routes(app, live, token, embed=embed_one, max_upload_bytes=max_upload_bytes)

    @lru_cache(maxsize=512)
    def _thumbnail(image_id: int, size: int) -> bytes:
        path = _resolve(image_id)
        # An indexed image passed the batch limit, not the upload one; JPEGs decode near `size`.
        with decode_slots:
            try:
                img = load_image(path, defaults.MAX_PIXELS, draft_size=size)
            except BadImage:
                raise HTTPException(404, f"image {image_id} cannot be read") from None
            img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        return buf.getvalue()

    live.on_change.append(_thumbnail.cache_clear)  # an id may name another photo after a reload

    def _resolve(image_id: int) -> Path:
        """The file of an indexed image, by id only (the Searcher checks it lies under its dataset root)."""
        try:
            return s.path_of(image_id)
        except CarsearchError as e:
            raise HTTPException(404, str(e)) from None

    @app.api_route("/images/{image_id}", methods=["GET", "HEAD"])
    def image(
        request: Request, image_id: int, size: int | None = Query(None, ge=16, le=THUMB_MAX)
    ) -> Response:
        with live.lock.read():
            digest = sha256_of(image_id)
        # A validator from the content: a client revalidates (If-None-Match) instead of trusting max-age
        # for a URL whose photo changed.
        etag = f'"{digest[:32]}{"-" + str(size) if size else ""}"' if digest else None
        headers = {"Cache-Control": "public, max-age=3600, must-revalidate"}
        if etag:
            headers["ETag"] = etag
            if etag in request.headers.get("if-none-match", ""):
                return Response(status_code=304, headers=headers)
        if size is None:
            path = _resolve(image_id)
            return FileResponse(
                path,
                media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream",
                headers=headers,
            )
        return Response(_thumbnail(image_id, size), media_type="image/jpeg", headers=headers)

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    def index_page() -> str:
        return page

    memory.freeze_startup_objects()  # last: everything loaded above is in place
    return app


# How `carsearch serve --workers N` hands its settings to each uvicorn worker process: one JSON variable
# whose name cannot collide with click's CARSEARCH_SERVE_<OPTION> variables.
ENV_SETTINGS = "_CARSEARCH_SERVE_APP_SETTINGS"


def app_from_env() -> FastAPI:
    """uvicorn factory for `--workers N`: each worker process opens the index itself."""
    from carsearch.serve.observe import setup_server_logging

    env = json.loads(os.environ[ENV_SETTINGS])
    setup_server_logging(env.get("log_format", "text"))
    return create_app(env["index_dir"], settings=ServeSettings(**env["settings"]))
