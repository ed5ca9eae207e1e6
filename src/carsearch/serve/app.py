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

import html
import inspect
import json
import logging
import mimetypes
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from carsearch import __version__, defaults
from carsearch.datasets import attributes
from carsearch.datasets.levels import level_name
from carsearch.errors import CarsearchError
from carsearch.search import Searcher
from carsearch.search.filters import Filter
from carsearch.serve import memory, refusals
from carsearch.serve.limits import read_form
from carsearch.serve.live import LiveIndex
from carsearch.serve.observe import Metrics, Observe
from carsearch.serve.protocol import BodyDeadline
from carsearch.serve.queries import Queries
from carsearch.serve.settings import ServeSettings
from carsearch.serve.writes import add_write_routes

log = logging.getLogger(__name__)

MAX_K = defaults.SERVE_MAX_K
THUMB_MAX = defaults.THUMB_MAX
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
    if searcher is None:
        if index_dir is None:
            raise ValueError("give index_dir or searcher")
        searcher = Searcher.open(
            index_dir,
            device=cfg.device,
            precision=cfg.precision,
            max_pixels=cfg.max_pixels,
            runtime=cfg.runtime,
        )
    searcher.max_pixels = cfg.max_pixels
    # The network loads now, once: lazily, concurrent first requests would each load it.
    _ = searcher.encoder
    live = LiveIndex(searcher)
    memory.tune_allocator()
    metrics = Metrics()
    queries = Queries(searcher, live, cfg, metrics)
    app = FastAPI(title="carsearch", version=__version__, docs_url="/api/docs", redoc_url=None)
    refusals.install(app)
    app.add_middleware(BodyDeadline, seconds=cfg.body_timeout)
    app.add_middleware(Observe, metrics=metrics)  # outermost: sees every request, 408s and 413s included
    app.state.live, app.state.metrics = live, metrics
    static = resources.files("carsearch.serve") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    page = (resources.files("carsearch.serve") / "templates" / "index.html").read_text()
    page = page.replace(FILTER_SLOT, filter_controls())

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    def healthz() -> dict:  # no lock: a health check must answer while a change is being written
        return {"status": "ok", "images": queries.ntotal()}

    @app.api_route("/api/info", methods=["GET", "HEAD"])
    def info() -> dict:
        return {
            **queries.described(),
            "max_upload_bytes": cfg.max_upload_bytes,
            "max_k": MAX_K,
            "batching": {"max_batch": cfg.batch_size, "max_wait_ms": cfg.batch_wait_ms}
            if queries.batcher
            else None,
            "writes": cfg.token is not None,
            "version": __version__,
            "api_version": API_VERSION,
        }

    @app.api_route("/metrics", methods=["GET"])
    def metrics_route() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    _add_search_route(app, queries, cfg.max_upload_bytes)
    add_write_routes(app, live, cfg.token, embed=queries.embed_one, max_upload_bytes=cfg.max_upload_bytes)
    _add_image_route(app, queries)

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    def index_page() -> str:
        return page

    memory.freeze_startup_objects()  # last: everything loaded above is in place
    return app


FILTER_SLOT = "<!-- filter controls: one per datasets/attributes.FILTER_FIELDS, rendered by serve/app.py -->"


def filter_controls() -> str:
    """The page's "only cars with" controls, one labelled text field per filterable field (ids f-NAME in
    NAME-control; a datalist NAME-values where the index's values are suggested)."""
    out = []
    for f in attributes.FILTER_FIELDS:
        listed = f' list="{f.name}-values"' if f.suggest else ""
        out.append(
            f'<label id="{f.name}-control">{f.name} <input id="f-{f.name}" data-filter="{f.name}"{listed} '
            f'placeholder="{html.escape(f.placeholder)}" title="{html.escape(f.help)}" enterkeyhint="search">'
            "</label>"
        )
        if f.suggest:
            out.append(f'<datalist id="{f.name}-values"></datalist>')
    return "\n        ".join(out)


SEARCH_PARAMETERS = ("k", "level")  # the search route's query parameters besides the filters


def _filter_parameters() -> Callable[..., Filter | None]:
    """A dependency taking one query parameter per filterable field (datasets/attributes.FILTER_FIELDS)
    and giving the Filter they make (None: no filter). A parameter given twice counts with all its values
    (make=BMW&make=Audi is make=BMW,Audi); 400 for a malformed value or a query parameter the route does not
    take (a misspelt filter would otherwise be ignored and the answer come back unfiltered)."""
    names = [f.name for f in attributes.FILTER_FIELDS]

    def where(request: Request, **_declared: str | None) -> Filter | None:
        taken = [*SEARCH_PARAMETERS, *names]
        unknown = sorted(set(request.query_params) - set(taken))
        if unknown:
            said = f"no query parameter {unknown[0]!r}; this route takes {', '.join(taken)}."
            raise HTTPException(400, said)
        typed = {name: ",".join(request.query_params.getlist(name)) or None for name in names}
        try:
            return Filter.parse(**typed) or None
        except CarsearchError as e:
            raise HTTPException(400, str(e)) from None

    # FastAPI reads the parameters from the signature: the request, and one optional string query
    # parameter per field (for validation and the API docs; the values are read from the request).
    where.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request),
            *[
                inspect.Parameter(
                    f.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=Query(None, description=f.help),
                    annotation=str | None,
                )
                for f in attributes.FILTER_FIELDS
            ],
        ]
    )
    return where


WHERE = Depends(_filter_parameters())


def _add_search_route(app: FastAPI, queries: Queries, max_upload_bytes: int) -> None:
    """POST /api/search: one answer object per uploaded photo (API_VERSION 2)."""

    @app.post("/api/search")
    async def search(
        request: Request,
        k: int = Query(defaults.K_VOTE, ge=1, le=MAX_K, description="neighbours that vote and are shown"),
        level: Literal[(*defaults.LEVELS, *defaults.LEVEL_ALIASES)] = Query(
            defaults.LEVEL, description="vote over whole classes, makes or years ('model': class's old name)"
        ),
        where: Filter | None = WHERE,
    ) -> dict:
        form = await read_form(request, max_upload_bytes, defaults.SERVE_MAX_QUERIES)
        uploads = [u for u in form.getlist("image") if not isinstance(u, str)]
        if not uploads:
            raise HTTPException(400, "send the photo in the multipart field 'image'")
        fields = sorted(set(form.keys()) - {"image"})
        if fields:
            await form.close()
            raise HTTPException(
                400,
                f"form field {fields[0]!r} is not read: send photos as 'image' fields and "
                f"{', '.join(SEARCH_PARAMETERS)} and the filters in the query string (?level=make&make=BMW).",
            )
        if len(uploads) > defaults.SERVE_MAX_QUERIES:
            raise HTTPException(400, f"at most {defaults.SERVE_MAX_QUERIES} images per request")
        files = [(await u.read(), u.filename or "upload") for u in uploads]
        await form.close()
        from starlette.concurrency import run_in_threadpool

        level = level_name(level)  # "model" is answered as "class"
        results = await run_in_threadpool(queries.classify_many, files, k, level, where)
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


def _add_image_route(app: FastAPI, queries: Queries) -> None:
    """GET /images/{id}: an indexed photo, whole or as a thumbnail, with a validator from its content."""

    @app.api_route("/images/{image_id}", methods=["GET", "HEAD"])
    def image(
        request: Request, image_id: int, size: int | None = Query(None, ge=16, le=THUMB_MAX)
    ) -> Response:
        with queries.live.lock.read():
            digest = queries.sha256_of(image_id)
        # A validator from the content: a client revalidates (If-None-Match) instead of trusting max-age
        # for a URL whose photo changed.
        etag = f'"{digest[:32]}{"-" + str(size) if size else ""}"' if digest else None
        headers = {"Cache-Control": "public, max-age=3600, must-revalidate"}
        if etag:
            headers["ETag"] = etag
            if etag in request.headers.get("if-none-match", ""):
                return Response(status_code=304, headers=headers)
        if size is None:
            path = queries.path_of(image_id)
            return FileResponse(
                path,
                media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream",
                headers=headers,
            )
        return Response(queries.thumbnail(image_id, size), media_type="image/jpeg", headers=headers)


# How `carsearch serve --workers N` hands its settings to each uvicorn worker process: one JSON variable
# whose name cannot collide with click's CARSEARCH_SERVE_<OPTION> variables.
ENV_SETTINGS = "_CARSEARCH_SERVE_APP_SETTINGS"


def app_from_env() -> FastAPI:
    """uvicorn factory for `--workers N`: each worker process opens the index itself."""
    from carsearch.serve.observe import setup_server_logging

    env = json.loads(os.environ[ENV_SETTINGS])
    setup_server_logging(env.get("log_format", "text"))
    return create_app(env["index_dir"], settings=ServeSettings(**env["settings"]))
