"""FastAPI app: POST /api/search, GET /images/{id}, GET /api/info, GET /healthz, GET / (the page).

Concurrency: one Searcher is shared by every request, read-only. FastAPI runs the plain `def` handlers
in its thread pool; faiss searches run concurrently, and the network's forward pass is serialised by
the Searcher's lock (one CPU forward pass already uses every core). The index folder is never written.
"""

from __future__ import annotations

import io
import json
import logging
import mimetypes
import os
import threading
from dataclasses import asdict
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from carsearch import __version__, defaults
from carsearch.embed.images import BadImage, load_image
from carsearch.errors import CarsearchError
from carsearch.search import Searcher
from carsearch.serve import memory
from carsearch.serve.limits import read_form
from carsearch.serve.protocol import BodyDeadline

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD = int(defaults.MAX_UPLOAD_MB * 1e6)
MAX_K = defaults.SERVE_MAX_K
THUMB_MAX = defaults.THUMB_MAX
BIG_DECODE = 4_000_000  # pixels: after such a decode, hand freed memory back to the OS


def create_app(
    index_dir: str | Path | None = None,
    searcher: Searcher | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    max_pixels: int = defaults.UPLOAD_MAX_PIXELS,
    device: str = defaults.DEVICE,
    precision: str = defaults.PRECISION,
    max_decodes: int = defaults.MAX_DECODES,
    body_timeout: float = defaults.BODY_TIMEOUT,
) -> FastAPI:
    """The app over an index folder (or an already open Searcher).

    `max_pixels` bounds an upload's size once decoded (checked from its header), `max_decodes` how many
    uploads are decoded and embedded at once: together they bound the memory a burst of uploads takes."""
    if searcher is None:
        if index_dir is None:
            raise ValueError("give index_dir or searcher")
        searcher = Searcher.open(index_dir, device=device, precision=precision, max_pixels=max_pixels)
    searcher.max_pixels = max_pixels
    s = searcher
    decode_slots = threading.BoundedSemaphore(max_decodes)
    memory.tune_allocator()
    app = FastAPI(title="carsearch", version=__version__, docs_url="/api/docs", redoc_url=None)
    app.add_middleware(BodyDeadline, seconds=body_timeout)
    static = resources.files("carsearch.serve") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    page = (resources.files("carsearch.serve") / "templates" / "index.html").read_text()

    def image_url(image_id: int) -> str:
        return f"/images/{image_id}"

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    def healthz() -> dict:
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
            "recall@10": (i.get("recall") or {}).get("measured"),
            "openset": i.get("openset"),
            "labelled": bool(any(s.bundle.gallery.labels)),
            "max_upload_bytes": max_upload_bytes,
            "max_k": MAX_K,
            "version": __version__,
        }

    @app.post("/api/search")
    async def search(
        request: Request,
        k: int = Query(defaults.K_VOTE, ge=1, le=MAX_K, description="neighbours that vote and are shown"),
        level: Literal["model", "make", "year"] = Query("model"),
    ) -> dict:
        form = await read_form(request, max_upload_bytes)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise HTTPException(400, "send the photo in the multipart field 'image'")
        data = await upload.read()
        await form.close()
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(_classify, data, upload.filename or "upload", k, level)

    def _classify(data: bytes, name: str, k: int, level: str) -> dict:
        # The decoded image lives only inside a slot: at most `max_decodes` at once, whatever the load.
        with decode_slots:
            try:
                image = load_image(data, s.max_pixels, s.encoder.preprocessing.draft_size)
            except BadImage as e:
                raise HTTPException(400, f"not a usable image ({e.reason}): {e.detail}") from None
            big = image.width * image.height >= BIG_DECODE
            result = s.classify([image], k=k, level=level)[0]
            del image
        if big:
            memory.release()
        body = asdict(result)
        body["query"] = name
        for n in body["neighbors"]:
            n["image_url"] = image_url(n["id"])
        return body

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

    def _resolve(image_id: int) -> Path:
        """The file of an indexed image, by id only (the Searcher checks it lies under its dataset root)."""
        try:
            return s.path_of(image_id)
        except CarsearchError as e:
            raise HTTPException(404, str(e)) from None

    @app.api_route("/images/{image_id}", methods=["GET", "HEAD"])
    def image(image_id: int, size: int | None = Query(None, ge=16, le=THUMB_MAX)) -> Response:
        if size is None:
            path = _resolve(image_id)
            return FileResponse(
                path,
                media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream",
                headers={"Cache-Control": "public, max-age=3600"},
            )
        return Response(
            _thumbnail(image_id, size),
            media_type="image/jpeg",
            headers={"Cache-Control": "public, max-age=3600"},
        )

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    def index_page() -> str:
        return page

    return app


# How `carsearch serve --workers N` hands its settings to each uvicorn worker process: one JSON variable
# whose name cannot collide with click's CARSEARCH_SERVE_<OPTION> variables.
ENV_SETTINGS = "_CARSEARCH_SERVE_APP_SETTINGS"


def app_from_env() -> FastAPI:
    """uvicorn factory for `--workers N`: each worker process opens the index itself."""
    return create_app(**json.loads(os.environ[ENV_SETTINGS]))
