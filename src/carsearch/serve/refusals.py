"""One error format for every refusal: `{"error": "<one sentence>", "status": <code>}`.

The app's own refusals (HTTPException), FastAPI's parameter validation (a 422 that would otherwise be a
list of pydantic records) and Starlette's routing answers (404 for an unknown path, 405 for a wrong
method) all answer in it, so a client reads `error` whatever refused it.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


def refusal(status: int, sentence: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": sentence, "status": status}, status_code=status, headers=headers)


def validation_sentence(errors: list[dict]) -> str:
    """FastAPI's validation errors as one sentence that names each parameter and the value it got, e.g.
    "k should be greater than or equal to 1 (got 0)."."""
    parts = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p not in ("query", "path", "header", "body", "cookie")]
        name = ".".join(loc) or "the request"
        if e.get("type") == "missing":
            parts.append(f"{name} is missing")
            continue
        msg = str(e.get("msg", "is not valid"))
        msg = f"{name} {msg[6:]}" if msg.startswith("Input ") else f"{name}: {msg[:1].lower()}{msg[1:]}"
        got = e.get("input")
        parts.append(f"{msg} (got {got})" if isinstance(got, str | int | float) else msg)
    return "; ".join(parts).rstrip(".") + "."


def install(app: FastAPI) -> None:
    """Answer every refusal of `app` in the one format."""

    @app.exception_handler(HTTPException)
    async def http_refusal(request: Request, exc: HTTPException) -> JSONResponse:
        detail = str(exc.detail)
        if detail == HTTPStatus(exc.status_code).phrase:  # Starlette's routing: "Not Found", ...
            detail = (
                f"{request.method} {request.url.path}: {detail.lower()} (the API is listed at /api/docs)."
            )
        return refusal(exc.status_code, detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
        return refusal(422, validation_sentence(list(exc.errors())))
