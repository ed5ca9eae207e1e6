"""`carsearch serve`: the HTTP API and web page over an index folder."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from carsearch import defaults
from carsearch.cli.common import FloatRange, device_options, runtime_option, settings_from
from carsearch.errors import CarsearchError

log = logging.getLogger("carsearch")


@click.command()
@click.option("--index", "index_dir", required=True, type=click.Path(file_okay=False), help="Index folder.")
@click.option(
    "--host",
    default=defaults.HOST,
    show_default=True,
    help="Address to bind; the default answers this machine only.",
)
@click.option("--port", default=defaults.PORT, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Server processes, each with its own copy of the index.",
)
@click.option(
    "--max-upload-mb",
    default=defaults.MAX_UPLOAD_MB,
    show_default=True,
    type=FloatRange(0, min_open=True),
    help="Larger uploads are refused (413) while they are read.",
)
@click.option(
    "--max-pixels",
    default=defaults.UPLOAD_MAX_PIXELS,
    show_default=True,
    type=click.IntRange(1),
    help="Uploads with more pixels are refused (400), read from the header before decoding.",
)
@click.option(
    "--max-decodes",
    default=defaults.MAX_DECODES,
    show_default=True,
    type=click.IntRange(1),
    help="Uploads decoded and embedded at once (bounds memory under a burst of large images).",
)
@click.option(
    "--header-timeout",
    default=defaults.HEADER_TIMEOUT,
    show_default=True,
    type=FloatRange(0, min_open=True),
    help="Seconds for a request's headers to arrive whole; slower connections are closed.",
)
@click.option(
    "--body-timeout",
    default=defaults.BODY_TIMEOUT,
    show_default=True,
    type=FloatRange(0, min_open=True),
    help="Seconds for an upload to arrive whole (408 after that).",
)
@click.option(
    "--batch",
    "batch_size",
    default=defaults.SERVE_BATCH,
    show_default=True,
    type=click.IntRange(1),
    help="Concurrent queries that may share one forward pass (1 = no batching).",
)
@click.option(
    "--batch-wait-ms",
    default=defaults.SERVE_BATCH_WAIT_MS,
    show_default=True,
    type=FloatRange(0),
    help="How long a batch waits for queries still being decoded (a lone query never waits).",
)
@click.option(
    "--token",
    envvar="CARSEARCH_TOKEN",
    help="Turns on live updates (POST/DELETE /api/images, POST /api/reload) for clients sending "
    "`Authorization: Bearer TOKEN`; also read from CARSEARCH_TOKEN. Without it the index is read-only.",
)
@click.option(
    "--log-format",
    default="text",
    show_default=True,
    type=click.Choice(["text", "json"]),
    help="json: one JSON object per log line (with the request id), for log collectors.",
)
@device_options
@runtime_option
def serve(
    index_dir: str,
    host: str,
    port: int,
    workers: int,
    max_upload_mb: float,
    header_timeout: float,
    token: str | None,
    log_format: str,
    **options: Any,
) -> None:
    """Serve the HTTP API and the web page over the --index folder (read-only unless --token is given).

    \b
    POST /api/search        multipart field(s) `image`; ?k=1..200&level=class|make|year
                            &make=BMW,Audi&model=...&year=2010-  ->  {"api_version": 2,
                            "results": [one answer per photo]}; refusals {"error", "status"}
    GET  /images/{id}       an indexed image by id (?size=N for a thumbnail)
    GET  /metrics           Prometheus metrics
    GET  /api/info, /healthz, /api/docs, /  (the page)
    with --token:  POST /api/images, DELETE /api/images/{id}, POST /api/reload
    """
    import uvicorn

    from carsearch.index.store import open_bundle
    from carsearch.serve import app as serve_app
    from carsearch.serve.live import refuse_if_shared
    from carsearch.serve.observe import setup_server_logging
    from carsearch.serve.protocol import ENV_HEADER_TIMEOUT, HeaderDeadlineProtocol
    from carsearch.serve.settings import ServeSettings

    refuse_if_shared(workers, token)
    open_bundle(index_dir)  # a damaged or missing index fails here, in one sentence, before any worker starts
    _check_port(host, port)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: other machines can reach this server.", host)
    settings = settings_from(ServeSettings, options, max_upload_bytes=int(max_upload_mb * 1e6), token=token)
    os.environ[serve_app.ENV_SETTINGS] = json.dumps(
        {"index_dir": str(Path(index_dir).resolve()), "log_format": log_format, "settings": asdict(settings)}
    )
    setup_server_logging(log_format, logging.getLogger("carsearch").getEffectiveLevel())
    os.environ[ENV_HEADER_TIMEOUT] = str(header_timeout)
    log.info("carsearch serving %s on http://%s:%d/", index_dir, host, port)
    uvicorn.run(
        "carsearch.serve.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        http=HeaderDeadlineProtocol,
        log_level="warning",
        timeout_graceful_shutdown=30,
    )


def _check_port(host: str, port: int) -> None:
    """Refuse, in one sentence and before saying "serving", an address that cannot be bound."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as e:
            raise CarsearchError(
                f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or stop what uses it."
            ) from None
