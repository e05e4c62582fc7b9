"""The HTTP connection, held to deadlines: what aiohttp's own protocol lacks against
clients that are slow on purpose.

aiohttp closes a connection that stays idle between requests (its keep-alive timeout),
but not one that trickles a request: 300 clients sending a header line every 10 s held
300 connections for as long as they liked. Here each connection gets:
- a deadline for a request's head, from its first byte (or from the connection's
  opening) to the blank line that ends it (``SCANGATE_HEADER_TIMEOUT``);
- a deadline for its body, from the end of the head to the body's last byte
  (``SCANGATE_BODY_TIMEOUT``);
- the idle keep-alive timeout between requests (``SCANGATE_KEEPALIVE_TIMEOUT``);
- a cap on a worker's open connections (``SCANGATE_MAX_CONNECTIONS``). Past it, an idle
  keep-alive connection is closed to make room, so that holding idle connections locks
  nobody out. Only when every connection is busy is the newcomer answered 503
  ``overloaded`` (with ``Retry-After: 1``) and closed.

It also answers aiohttp's own errors (a request that is not HTTP) in the API's JSON, never
quoting the bytes back, with a request id like every answer, and names the server without
its version.

This reads a few of aiohttp's protocol internals (the parsed-message queue and counter, the
idle waiter). ``pyproject.toml`` bounds aiohttp to the minor versions tested, and
``tests/test_connections.py`` fails if they stop meaning what they mean here.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, cast

import orjson
from aiohttp import web, web_protocol, web_server

from gateway.http.access import AccessLog
from gateway.http.front_door import front_door
from gateway.http.headers import COMMON_HEADERS, SERVER_NAME
from gateway.http.keys import SETTINGS
from gateway.logs import ACCESS, REQUEST_ID_HEADER, bind_request_id, current_request_id
from gateway.settings import Settings

OVERLOADED_BODY: Final = orjson.dumps(
    {"error": "overloaded", "detail": "this server has too many connections; retry shortly"}
)
OVERLOADED_ANSWER: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Retry-After: 1\r\n"
    b"Server: " + SERVER_NAME.encode() + b"\r\n"
    b"X-Content-Type-Options: nosniff\r\n"
    b"Connection: close\r\n"
    b"Content-Length: " + str(len(OVERLOADED_BODY)).encode() + b"\r\n\r\n" + OVERLOADED_BODY
)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout_s: float
    body_timeout_s: float
    keepalive_timeout_s: float
    max_connections: int

    @classmethod
    def of(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            settings.header_timeout_s,
            settings.body_timeout_s,
            settings.keepalive_timeout_s,
            settings.max_connections,
        )


class GuardedRequestHandler(web_protocol.RequestHandler):
    """aiohttp's protocol with the deadlines and the cap above."""

    def __init__(self, manager: web_server.Server, *, limits: ConnectionLimits, **kw: Any):
        super().__init__(manager, keepalive_timeout=limits.keepalive_timeout_s, **kw)
        self._limits = limits
        self._server = manager
        self._deadline: asyncio.TimerHandle | None = None
        self._body: Any = None  # the body being received (a StreamReader), if any
        self._refused = False

    # -- the cap ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        connections = self._server.connections
        if len(connections) >= self._limits.max_connections and not _close_one_idle(connections):
            self._refused = True
            # (uvloop's transports are not subclasses of asyncio.Transport: cast, not check)
            refused = cast(asyncio.Transport, transport)
            refused.write(OVERLOADED_ANSWER)
            refused.close()
            return
        super().connection_made(transport)
        self._arm(self._limits.header_timeout_s)  # a connection that sends nothing

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        if not self._refused:
            super().connection_lost(exc)

    def is_idle(self) -> bool:
        """Waiting for the next request, with none of it received."""
        waiter = self._waiter
        return waiter is not None and not waiter.done() and self._deadline is None

    # -- the deadlines ------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        heads_before = self._request_count
        super().data_received(data)
        if self._force_close or self._close:
            return
        if self._request_count > heads_before and self._messages:
            # A head is complete: its body (if it has one still to come) is on the clock.
            body = self._messages[-1][1]
            self._disarm()
            if not body.is_eof():
                self._body = body
                self._arm(self._limits.body_timeout_s)
        elif self._body is not None:
            if self._body.is_eof():  # the body's last byte came
                self._body = None
                self._disarm()
        elif self._deadline is None and data:
            self._arm(self._limits.header_timeout_s)  # the first bytes of a new head

    def _arm(self, timeout_s: float) -> None:
        self._disarm()
        self._deadline = self._loop.call_later(timeout_s, self._deadline_passed)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self._body is not None and self._body.is_eof():
            self._body = None  # finished after all (read by the handler meanwhile)
            return
        self.force_close()

    # -- aiohttp's own errors -----------------------------------------------------------

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The answer to a request aiohttp could not parse or handle: JSON like every other
        error, without the bytes it could not parse (aiohttp quotes them), with its request
        id (bound before aiohttp logs the error, so that line carries it too)."""
        request_id = current_request_id() or bind_request_id(request.headers.get(REQUEST_ID_HEADER))
        response = super().handle_error(request, status, exc, message)
        if isinstance(response, web.Response):
            phrase = HTTPStatus(status).phrase
            detail = "the request is not valid HTTP" if status == 400 else phrase
            code = "bad_request" if status == 400 else phrase.lower().replace(" ", "_")
            response.body = orjson.dumps({"error": code, "detail": detail})
            response.content_type = "application/json"
        response.headers.update(COMMON_HEADERS)
        response.headers[REQUEST_ID_HEADER] = request_id
        return response


def _close_one_idle(connections: list[web_protocol.RequestHandler]) -> bool:
    for connection in connections:
        if isinstance(connection, GuardedRequestHandler) and connection.is_idle():
            connection.force_close()
            return True
    return False


class GuardedServer(web_server.Server):
    """aiohttp's server, making ``GuardedRequestHandler`` connections."""

    limits: ConnectionLimits

    def __call__(self) -> web_protocol.RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, limits=self.limits, **self._kwargs)


class GuardedRunner(web.AppRunner):
    """An ``AppRunner`` whose connections keep ``ConnectionLimits`` from the app's
    settings; ``scangate serve`` and the tests' servers run the gateway with it.

    aiohttp's own access log is never on, whatever the caller asks: it names the client's
    address and quotes the path and query. The gateway's (``gateway.http.access``) is on
    with ``SCANGATE_ACCESS_LOG``."""

    def __init__(self, app: web.Application, limits: ConnectionLimits, **kwargs: Any) -> None:
        kwargs["access_log_class"] = AccessLog
        kwargs["access_log"] = ACCESS if app[SETTINGS].access_log else None
        super().__init__(app, **kwargs)
        self._limits = limits

    async def _make_server(self) -> web_server.Server:
        server = await super()._make_server()
        # aiohttp makes a plain Server (with the app's handler and arguments); ours only
        # changes which protocol it makes for each connection.
        server.__class__ = GuardedServer
        assert isinstance(server, GuardedServer)
        server.limits = self._limits
        # Requests enter through the front door, which takes the scans itself and passes
        # the rest to the application (the app has started: its resources are open).
        server.request_handler = front_door(self.app)
        return server
