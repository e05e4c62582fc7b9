"""``POST /v1/scans``: the pipeline's source. Authenticate the app, parse the batch, check
every event (``gateway.pipeline.events``), hand the accepted ones to the Redis buffer
(``gateway.pipeline.buffer``, which shards and encodes them), and answer each event's
verdict in request order. A 2xx is sent only after Redis has taken every accepted event.
"""

from __future__ import annotations

import math
import time
from collections import Counter as Tally
from typing import Any, Final

import orjson
from aiohttp import web

from gateway.http.context import (
    JSON_HEADERS,
    NOT_RECEIVED,
    app_of_known_token,
    app_of_refreshed_token,
    json_awaited,
    json_received,
)
from gateway.http.errors import (
    BacklogFull,
    InvalidRequest,
    PayloadTooLarge,
    RateLimited,
    Unavailable,
)
from gateway.http.keys import (
    BUFFER,
    EVENT_RULES,
    KEYRING,
    KEYRING_REFRESH,
    METRICS,
    RATE_LIMITS,
    REVOKED_VENUES,
    SETTINGS,
    TOKEN_USES,
)
from gateway.metrics import Metrics
from gateway.pipeline.buffer import BufferUnavailable
from gateway.pipeline.events import Rejection, ScanEvent, check_event

MAX_EVENTS: Final = 500
RETRY_AFTER_UNAVAILABLE_S: Final = 1
RETRY_AFTER_BACKLOG_S: Final = 5


class ScanIntake:
    """``POST /v1/scans`` with the application's resources looked up once, when it has
    started (``add_routes`` binds it): the hot path reads no application key per request.
    The revoked venues are read through their holder, which a refresh updates."""

    def __init__(self, app: web.Application) -> None:
        self.keyring = app[KEYRING]
        self.keyring_refresh = app[KEYRING_REFRESH]
        self.token_uses = app[TOKEN_USES]
        self.settings = app[SETTINGS]
        self.rate_limits = app[RATE_LIMITS]
        self.buffer = app[BUFFER]
        self.metrics = app[METRICS]
        self.rules = app[EVENT_RULES]
        self.revoked = app[REVOKED_VENUES]

    async def take(self, request: web.Request) -> bytes:
        """Check a batch, buffer what it accepts, and answer every verdict in request
        order: the answer's body (a 200), or an ``ApiError`` raised. The front door calls
        this directly (its requests have no ``request.app``); the router through
        ``post_scans``."""
        keyring, settings = self.keyring, self.settings
        # Each step without an await when it can (a known token, a body that has arrived).
        app_id = app_of_known_token(request, keyring, self.token_uses)
        if app_id is None:  # not known yet: wait for a check of the keyring's store
            app_id = await app_of_refreshed_token(
                request, keyring, self.keyring_refresh, self.token_uses
            )
        doc = json_received(request)
        if doc is NOT_RECEIVED:
            doc = await json_awaited(request)
        if not isinstance(doc, dict) or not isinstance(doc.get("events"), list):
            raise InvalidRequest('expected {"events": [...]}')
        raw_events: list[Any] = doc["events"]
        if not raw_events:
            raise InvalidRequest("events: send 1 to 500 events")
        if len(raw_events) > MAX_EVENTS:
            raise PayloadTooLarge(f"events: at most {MAX_EVENTS} per request")
        rate_limits = self.rate_limits
        if rate_limits is not None:
            wait_s = rate_limits.take(app_id, len(raw_events), time.monotonic())
            if wait_s:
                raise RateLimited(
                    f"over {settings.rate_limit} events per second for this app",
                    retry_after_s=max(1, math.ceil(wait_s)),
                )
        buffer, metrics = self.buffer, self.metrics
        if sum(buffer.lengths) >= settings.backlog_high_water:
            metrics.backpressure_rejections.inc()
            raise BacklogFull(
                "the buffer is over its high-water mark; retry later",
                retry_after_s=RETRY_AFTER_BACKLOG_S,
            )

        now_ms = int(time.time() * 1000)
        verifier, rules, revoked = keyring.verifier(app_id), self.rules, self.revoked.ids
        checked = [check_event(raw, app_id, verifier, rules, now_ms, revoked) for raw in raw_events]
        accepted = [verdict for verdict in checked if isinstance(verdict, ScanEvent)]
        del doc, raw_events  # not held while the events wait for their group commit
        fresh: list[bool] = []
        if accepted:
            try:
                fresh = await buffer.append(accepted, now_ms)
            except BufferUnavailable as exc:
                metrics.redis_errors.inc()
                raise Unavailable(str(exc), retry_after_s=RETRY_AFTER_UNAVAILABLE_S) from exc

        if len(accepted) == len(checked) and all(fresh):
            return _all_accepted(app_id, accepted, metrics)
        return _answer(app_id, checked, fresh, metrics)


SCAN_INTAKE: Final = web.AppKey("scan_intake", ScanIntake)


async def post_scans(request: web.Request) -> web.Response:
    """The routed handler: what the front door passes on (``gateway.http.front_door``)."""
    return web.Response(body=await request.app[SCAN_INTAKE].take(request), headers=JSON_HEADERS)


# The answer when every event was accepted as new, the common case, filled in as bytes:
# the same JSON ``_answer`` makes (tests/test_scans.py compares them), without building a
# dict per event. An event id is 8 to 64 of [A-Za-z0-9_-] (EVENT_ID_PATTERN), which JSON
# needs no escape for, so the ids are joined as text and encoded once.
_ALL_ACCEPTED: Final = (
    b'{"accepted":%d,"duplicates":0,"rejected":0,"results":[{"event_id":"%s","status":"accepted"}]}'
)
_BETWEEN_IDS: Final = '","status":"accepted"},{"event_id":"'


def _all_accepted(app_id: str, events: list[ScanEvent], metrics: Metrics) -> bytes:
    """The response body and the metrics' counts when every event was accepted as new."""
    checkins = [event.kind for event in events].count("checkin")
    if checkins:
        metrics.count_event(app_id, "checkin", "accepted", checkins)
    if checkins < len(events):
        metrics.count_event(app_id, "checkout", "accepted", len(events) - checkins)
    ids = _BETWEEN_IDS.join([event.event_id for event in events])
    return _ALL_ACCEPTED % (len(events), ids.encode())


def _answer(
    app_id: str,
    checked: list[ScanEvent | Rejection],
    fresh: list[bool],
    metrics: Metrics,
) -> bytes:
    """The response body, in request order, and the verdict counts for the metrics.
    ``fresh`` says, for each ScanEvent among ``checked`` in turn, whether it was new."""
    appended = iter(fresh)
    results: list[dict[str, Any]] = []
    tally: Tally[tuple[str, str, str, str]] = Tally()
    accepted = duplicates = 0
    for verdict in checked:
        if isinstance(verdict, ScanEvent):
            new = next(appended)
            status = "accepted" if new else "duplicate"
            if new:
                accepted += 1
            else:
                duplicates += 1
            results.append({"event_id": verdict.event_id, "status": status})
            tally[(app_id, verdict.kind, status, "")] += 1
        else:
            results.append(
                {
                    "event_id": verdict.event_id,
                    "status": "rejected",
                    "reason": verdict.reason,
                    "detail": verdict.detail,
                }
            )
            tally[(app_id, verdict.kind, "rejected", verdict.reason)] += 1
    metrics.count_events(tally)
    return orjson.dumps(
        {
            "accepted": accepted,
            "duplicates": duplicates,
            "rejected": len(checked) - accepted - duplicates,
            "results": results,
        }
    )


async def _bind_intake(app: web.Application) -> None:
    # An on_startup callback runs after every cleanup context has opened its resource.
    app[SCAN_INTAKE] = ScanIntake(app)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/scans", post_scans, name="scans")
    app.on_startup.append(_bind_intake)
