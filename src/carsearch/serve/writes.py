"""The write routes (live updates), on only when the server has a token.

POST /api/images          multipart `image` + optional fields label, make, model, year -> {"id": ...}
DELETE /api/images/{id}   where the index type can forget (Flat, IVF; HNSW answers 409)
POST /api/reload          switch to the folder's current version, or {"index": "/other/folder"}

Each needs `Authorization: Bearer TOKEN` (401 without or with a wrong one; compared in constant time).
Without a token configured they answer 403: writes are off.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from pathlib import PurePath

import numpy as np
from fastapi import FastAPI, HTTPException, Request

from carsearch.datasets.attributes import ATTRIBUTES
from carsearch.errors import CarsearchError
from carsearch.formats import image_extensions
from carsearch.serve.limits import read_form
from carsearch.serve.live import DuplicatePhoto, LiveIndex

log = logging.getLogger(__name__)


FIELDS = ("label", *ATTRIBUTES)  # what an upload may say of its photo


def add_write_routes(
    app: FastAPI,
    live: LiveIndex,
    token: str | None,
    *,
    embed: Callable[[bytes], np.ndarray],
    max_upload_bytes: int,
) -> None:
    """Register the write routes on `app`; `embed(upload bytes)` gives an upload's vector (400 if bad)."""

    def authorise(request: Request) -> None:
        if token is None:
            raise HTTPException(403, "writes are off: start the server with --token (or CARSEARCH_TOKEN)")
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), token.encode()):
            raise HTTPException(401, "send the server's token as `Authorization: Bearer TOKEN`")

    @app.post("/api/images")
    async def add_image(request: Request) -> dict:
        authorise(request)
        form = await read_form(request, max_upload_bytes)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise HTTPException(400, "send the photo in the multipart field 'image'")
        data = await upload.read()
        meta = {f: str(form.get(f) or "").strip() for f in FIELDS}
        allow_duplicates = str(form.get("allow_duplicates") or "").strip().lower() in ("1", "true", "yes")
        suffix = PurePath(upload.filename or "").suffix.lower()
        await form.close()
        from starlette.concurrency import run_in_threadpool

        def work() -> int:
            vector = embed(data)
            return live.add(
                data, suffix if suffix in image_extensions() else ".img", vector, meta, allow_duplicates
            )

        try:
            new_id = await run_in_threadpool(work)
        except DuplicatePhoto as e:
            raise HTTPException(
                409,
                f"this photo is already in the index as image {e.image_id} (/images/{e.image_id}); send "
                "allow_duplicates=true to add it again",
            ) from None
        except OSError as e:
            raise HTTPException(507, f"the index folder could not be written ({e.strerror or e})") from None
        app.state.metrics.writes.labels("add").inc()
        log.info("added image %d (%s)", new_id, meta.get("label") or "no label")
        return {"id": new_id, "images": live.searcher.bundle.index.ntotal, "image_url": f"/images/{new_id}"}

    @app.delete("/api/images/{image_id}")
    async def delete_image(image_id: int, request: Request) -> dict:
        authorise(request)
        from starlette.concurrency import run_in_threadpool

        try:
            await run_in_threadpool(live.delete, image_id)
        except KeyError:
            raise HTTPException(404, f"no image with id {image_id} in this index") from None
        except CarsearchError as e:
            raise HTTPException(409, str(e)) from None
        app.state.metrics.writes.labels("delete").inc()
        log.info("deleted image %d", image_id)
        return {"deleted": image_id, "images": live.searcher.bundle.index.ntotal}

    @app.post("/api/reload")
    async def reload(request: Request) -> dict:
        authorise(request)
        body = await request.body()
        folder = None
        if body.strip():
            import json

            try:
                folder = json.loads(body).get("index")
            except (ValueError, AttributeError):
                raise HTTPException(400, 'send {"index": "/path/to/index"} or an empty body') from None
        from starlette.concurrency import run_in_threadpool

        try:
            info = await run_in_threadpool(live.reload, folder)
        except CarsearchError as e:
            raise HTTPException(409, str(e)) from None
        app.state.metrics.writes.labels("reload").inc()
        log.info("reloaded %s: %d images", live.folder, info["ntotal"])
        return {"index": str(live.folder), "images": info["ntotal"], "updated": info.get("updated")}
