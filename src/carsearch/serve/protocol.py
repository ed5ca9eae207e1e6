"""Slow clients: uvicorn's h11 protocol with a deadline on a request's headers (a slowloris client that
sends a byte a second would otherwise hold its connection for ever), and an ASGI guard with a deadline on
its body. uvicorn offers neither; its keep-alive timeout only covers idle connections."""

from __future__ import annotations

import asyncio
import logging
import os

from uvicorn.protocols.http.h11_impl import H11Protocol

from carsearch import defaults

log = logging.getLogger("carsearch.serve")

ENV_HEADER_TIMEOUT = "_CARSEARCH_SERVE_HEADER_TIMEOUT"


class HeaderDeadlineProtocol(H11Protocol):
    """Closes a connection whose request line and headers have not all arrived within the deadline, counted
    from the connection (or the end of the previous response on a kept-alive connection)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timeout = float(os.environ.get(ENV_HEADER_TIMEOUT, defaults.HEADER_TIMEOUT))
        self._waiting_for = None
        self._arm()

    def _arm(self) -> None:
        self._waiting_for = self.cycle
        self._deadline = self.loop.call_later(self._timeout, self._too_slow)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not self._waiting_for and self._deadline is not None:
            self._deadline.cancel()  # a new request's headers are complete
            self._deadline = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing() and self.cycle is self._waiting_for:
            log.warning(
                "closed a connection from %s: no complete request headers in %gs", self.client, self._timeout
            )
            self.transport.close()


class BodyTimeout(Exception):
    """The client did not send its request body within the deadline."""


class BodyDeadline:
    """ASGI middleware: a request body must arrive whole within `seconds` of the request's start."""

    def __init__(self, app, seconds: float) -> None:
        self.app, self.seconds = app, seconds

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        body_done = False

        async def timed_receive():
            nonlocal body_done
            if body_done:  # after the body, receive only waits for a disconnect: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.001))
            except TimeoutError:
                raise BodyTimeout from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)
