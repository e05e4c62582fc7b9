"""The access log (``SCANGATE_ACCESS_LOG``): aiohttp's access-log hook, writing
``gateway.logs.log_access`` lines in place of aiohttp's own (which names the client's
address and quotes the request line, path and query: personal data).

The hook is called once the answer is written, with the request and its answer, for every
request, aiohttp's own error answers included; what it logs comes from the request keys
below, which the gateway sets as it handles the request.
"""

from __future__ import annotations

from time import perf_counter
from typing import Final

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from gateway.logs import log_access

# The pattern of the route that answered (``/v1/trace/{person_id}``) and the
# ``perf_counter`` when handling began, set by the application's middleware; a request
# aiohttp could not parse never gets them. (aiohttp's own clock for the duration is the
# event loop's, which counts whole milliseconds under uvloop.)
ROUTE: Final = web.RequestKey("route", str)
STARTED: Final = web.RequestKey("started", float)
# The app id of the request's token, once authenticated (``gateway.http.context``).
CALLER_APP: Final = web.RequestKey("caller_app", str)

# A method is any token to HTTP's parser: one not among these is logged as OTHER, since a
# client could put anything in it.
KNOWN_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)


class AccessLog(AbstractAccessLogger):
    """aiohttp's access logger, as the runner makes it (``gateway.http.protocol``)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        route, started = request.get(ROUTE), request.get(STARTED)
        if route is None:
            method = "-"  # aiohttp's own answer to a request it could not parse
        else:
            method = request.method if request.method in KNOWN_METHODS else "OTHER"
        if started is not None:
            time = perf_counter() - started
        log_access(
            method,
            route or "-",
            response.status,
            time,
            response.body_length,
            request.get(CALLER_APP),
        )
