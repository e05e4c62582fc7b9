"""Where every request enters, and where whatever a handler raised becomes an answer.

aiohttp's server calls ``front_door(app)`` for each request (``GuardedRunner`` installs
it). An exact ``POST /v1/scans``, the hot path, is answered there directly; every other
request goes through the application: its router, the middleware below and the
``on_response_prepare`` signal (``gateway.http.headers``). Those three cost 13-17% of a
single-event scan (benchmarks/RESULTS.md), and a scan needs none of their generality. The
front door gives a scan's answer the same per-answer rules itself:

- the request id bound (every line logged for the request carries it) and answered in
  ``X-Request-Id``; the route and start time the access log reads;
- the request counted and timed in the metrics under its route's name;
- errors answered as the middleware answers them (``answer_error``);
- the headers every answer carries (``gateway.http.headers``).

The client's address behind trusted proxies (``gateway.http.addresses``) is read the same
way on both paths, and the connection caps and deadlines sit below both, in the protocol
(``gateway.http.protocol``).

Anything else that names the scans takes the routed path, which answers it the same at its
usual cost: a query string, an escaped path, another method (405), or
``Expect: 100-continue`` (the router's resource answers the expectation).
``tests/test_scans.py`` holds the two paths' answers equal.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Final, cast

import orjson
from aiohttp import HttpVersion11, hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import rfc822_formatted_time

from gateway.http.access import ROUTE, STARTED
from gateway.http.context import JSON, MAX_BODY_BYTES
from gateway.http.errors import HTTP_STATUS_CODES, ApiError
from gateway.http.headers import COMMON_HEADERS, stamp_answer
from gateway.http.keys import METRICS, SETTINGS
from gateway.http.scans import SCAN_INTAKE
from gateway.logs import REQUEST_ID_HEADER, bind_request_id
from storage import StorageUnavailable

log = logging.getLogger(__name__)

RETRY_AFTER_UNAVAILABLE_S: Final = 1
SCANS_PATH: Final = "/v1/scans"
SCANS_ROUTE: Final = "scans"  # the route's name, as the router's route is named
# A scan's answer: JSON, with the headers ``stamp_answer`` would add, set at once.
SCAN_ANSWER_HEADERS: Final = {
    "Content-Type": JSON,
    **COMMON_HEADERS,
    "Cache-Control": "no-store",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ServerHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def front_door(app: web.Application) -> ServerHandler:
    """The handler aiohttp's server calls for each of ``app``'s requests (set once the
    application has started: the scans read resources its cleanup contexts open)."""
    routed = app._handle
    metrics = app[METRICS]
    take_scans = app[SCAN_INTAKE].take
    access_log = app[SETTINGS].access_log

    async def enter(base: web.BaseRequest) -> web.StreamResponse:
        request = cast(web.Request, base)  # the runner's request factory makes web.Request
        if (
            request.raw_path != SCANS_PATH
            or request.method != hdrs.METH_POST
            or hdrs.EXPECT in request.headers
        ):
            return await routed(request)
        request_id = bind_request_id(request.headers.get(REQUEST_ID_HEADER))
        started = time.perf_counter()
        if access_log:  # what it reads (gateway.http.access)
            request[ROUTE] = SCANS_PATH
            request[STARTED] = started
        try:
            response: web.StreamResponse = ScanAnswer(await take_scans(request), request_id)
        except Exception as exc:
            if isinstance(exc, web.HTTPException) and exc.status < 400:
                raise  # as the middleware does: a redirect is an answer, not an error
            response = answer_error(exc, hdrs.METH_POST, SCANS_ROUTE)
            stamp_answer(response, request_id)
        metrics.observe_request(SCANS_ROUTE, response.status, time.perf_counter() - started)
        return response

    return enter


class ScanAnswer(web.StreamResponse):
    """A scan's 200 answer. To a keep-alive HTTP/1.1 request (every scanner app's) it is
    written as one block of bytes, its head laid out from a template, instead of through
    aiohttp's header machinery: the head is always the same headers, of which only the
    date, the length and the request id change. Any other request, or a connection whose
    writing is paused (the client is not reading), gets aiohttp's own way, with the same
    headers. ``tests/test_scans.py`` compares the heads of both.

    A ``StreamResponse`` whose body is written in ``prepare``: a ``web.Response`` would
    build its headers and body at creation, for the one answer in many that takes
    aiohttp's way."""

    # aiohttp's way: the head waits for the body, and both go in one write.
    _send_headers_immediately = False

    def __init__(self, body: bytes, request_id: str) -> None:
        super().__init__()
        self._answer = body
        self._request_id = request_id

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return await super().prepare(request)
        body, transport = self._answer, request.transport
        if (
            request.version != HttpVersion11
            or not request.keep_alive
            or transport is None
            or transport.is_closing()
            or request.protocol.writing_paused
        ):
            self.headers.update(SCAN_ANSWER_HEADERS)
            self.headers[REQUEST_ID_HEADER] = self._request_id
            self.content_length = len(body)
            writer = await super().prepare(request)
            await self.write(body)  # aiohttp's finish_response then ends it (write_eof)
            return writer
        answer = _SCAN_ANSWER_HEAD % (
            self._request_id.encode(),
            len(body),
            rfc822_formatted_time().encode(),
            body,
        )
        transport.write(answer)
        # As aiohttp leaves an answer it has written: sent, kept alive, its size counted.
        self._keep_alive = True
        self._eof_sent = True
        self._body_length = len(answer)
        return None


# The head of a ScanAnswer; its date comes from aiohttp's own clock (one formatting per
# second), and the request id is sane by then (``gateway.logs.SANE_REQUEST_ID``: ASCII
# letters, digits and ``._:-``, never CR or LF; a test holds it so), so nothing here needs
# the escaping check aiohttp gives every header it writes.
_SCAN_ANSWER_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\n"
    + b"".join(f"{name}: {value}\r\n".encode() for name, value in SCAN_ANSWER_HEADERS.items())
    + REQUEST_ID_HEADER.encode()
    + b": %s\r\nContent-Length: %d\r\nDate: %s\r\n\r\n%s"
)


@web.middleware
async def observe_and_answer_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give every routed request its id (``gateway.logs``: every line logged while it is
    handled carries it), turn errors into JSON answers and count and time every request by
    route."""
    bind_request_id(request.headers.get(REQUEST_ID_HEADER))
    started = time.perf_counter()
    matched = request.match_info.route
    route = matched.name or "unmatched"
    request[ROUTE] = "unmatched" if matched.resource is None else matched.resource.canonical
    request[STARTED] = started
    try:
        response = await handler(request)
    except Exception as exc:
        if isinstance(exc, web.HTTPException) and exc.status < 400:
            raise  # a redirect is an answer, not an error
        response = answer_error(exc, request.method, route)
    request.app[METRICS].observe_request(route, response.status, time.perf_counter() - started)
    return response


def answer_error(exc: Exception, method: str, route: str) -> web.Response:
    """The JSON answer to what a handler raised: an ``ApiError`` as it says, aiohttp's own
    HTTP errors under the API's codes, storage gone as a 503 the client may retry, and
    anything else as a 500 (logged with its traceback, never answered with it)."""
    if isinstance(exc, ApiError):
        response = error_response(exc.status, exc.code, exc.detail, exc.retry_after_s, exc.extra)
        response.headers.update(exc.headers)
        return response
    if isinstance(exc, web.HTTPException):
        code = HTTP_STATUS_CODES.get(exc.status, "http_error")
        detail = exc.reason
        if exc.status == 413:
            detail = f"the body is over {MAX_BODY_BYTES} bytes"
        response = error_response(exc.status, code, detail)
        if "Allow" in exc.headers:  # a 405 says which methods the route has (RFC 9110)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    if isinstance(exc, StorageUnavailable):
        # Storage went away mid-request (a restart, a lost connection): the same promise
        # as for Redis, a 503 the client may retry. The driver's error names what happened.
        cause = type(exc.__cause__ or exc).__name__
        log.warning("%s %s: storage unavailable (%s)", method, route, cause)
        return error_response(
            503, "unavailable", "storage does not answer", RETRY_AFTER_UNAVAILABLE_S
        )
    log.error("%s %s failed", method, route, exc_info=exc)
    return error_response(500, "internal_error", "the server failed; it is logged")


def error_response(
    status: int,
    code: str,
    detail: str,
    retry_after_s: int | None = None,
    extra: Mapping[str, object] | None = None,
) -> web.Response:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return web.Response(
        status=status,
        body=orjson.dumps({"error": code, "detail": detail, **(extra or {})}),
        content_type=JSON,
        headers=headers,
    )
