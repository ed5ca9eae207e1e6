"""Reading an upload with a size limit enforced while the body streams in, not after it is buffered."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi import HTTPException, Request
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from carsearch.serve.protocol import BodyTimeout

log = logging.getLogger("carsearch.serve")


def too_large(max_bytes: int) -> HTTPException:
    return HTTPException(413, f"upload larger than {max_bytes / 1e6:g} MB; send a smaller image")


async def read_form(request: Request, max_bytes: int, max_files: int = 1) -> FormData:
    """Parse a multipart form, answering 413 as soon as the body passes `max_bytes`.

    A Content-Length over the limit is refused before a byte is read; a chunked body is counted as it
    arrives and dropped at the limit. The limit is for the whole body, however many files it holds.
    """
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise too_large(max_bytes)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(400, "send the photo as multipart/form-data in the field 'image'")

    async def limited() -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > max_bytes:
                raise too_large(max_bytes)
            yield chunk

    try:
        return await MultiPartParser(request.headers, limited(), max_files=max_files, max_fields=8).parse()
    except MultiPartException as e:
        raise HTTPException(400, f"malformed upload: {e.message}") from None
    except ClientDisconnect:
        # Nobody is left to answer; one log line, not an ERROR traceback.
        log.info("client %s went away during its upload", request.client.host if request.client else "?")
        raise HTTPException(400, "the client disconnected during the upload") from None
    except BodyTimeout:
        raise HTTPException(408, "the upload did not arrive in time; send it again") from None
