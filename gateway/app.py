"""The aiohttp application: ``create_app(settings)`` and its handlers.

The scan handler is the pipeline's source: authenticate the app, parse the batch, check
every event (``gateway.events``), append the accepted ones to the Redis buffer
(``gateway.buffer``), and answer each event's verdict in request order. A 2xx is sent only
after Redis has taken every accepted event.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import time
from collections import Counter as Tally
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Final

import asyncpg
import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from signing import Keyring, Sealer, load_master_key
from signing.codes import ID_PATTERN
from storage import TraceQuery, connect_storage
from storage.tracing import rows_to_csv, rows_to_json

from . import audit, cases, claims, declarations, door, openapi, reports, venues
from . import web as web_pages
from .background import Periodic
from .buffer import BufferUnavailable, RedisBuffer, connect_redis
from .context import (
    GATEWAY,
    JSON,
    JSON_HEADERS,
    MAX_BODY_BYTES,
    TOKEN_USES,
    Gateway,
    authenticate,
    authenticate_admin,
    load_personal_data,
    read_json,
)
from .errors import (
    HTTP_STATUS_CODES,
    ApiError,
    BacklogFull,
    InvalidRequest,
    PayloadTooLarge,
    RateLimited,
    Unavailable,
)
from .events import EventRules, Rejection, ScanEvent, check_event, encode_event
from .keyspace import seen_field, shard_of
from .last_use import LastUse
from .metrics import CONTENT_TYPE, Metrics
from .notifier import DELIVERY_TIMEOUT_S, Notifier, run_until
from .otp import OtpLimits, OtpService
from .ratelimit import TokenBuckets
from .settings import Settings, parse_duration_s
from .shared_keyring import keyring_store
from .sms import make_sms_sender

log = logging.getLogger(__name__)

MAX_EVENTS: Final = 500
# A revoked app token must be refused by every worker within 2 s of the change: a check
# every second leaves the other second for the check itself and a slow event loop.
KEYRING_REFRESH_S: Final = 1.0
REVOCATIONS_REFRESH_S: Final = 2.0
SHUTDOWN_BACKGROUND_S: Final = 10.0
BACKLOG_POLL_S: Final = 0.5
METRICS_PUBLISH_S: Final = 1.0
RETRY_AFTER_UNAVAILABLE_S: Final = 1
MAX_TRACE_WINDOW_MS: Final = 24 * 3_600_000
# What storage raises when its server is gone or busy, rather than for a bad request.
STORAGE_UNAVAILABLE: Final = (
    OSError,
    TimeoutError,
    sqlite3.OperationalError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.CannotConnectNowError,
)
RETRY_AFTER_BACKLOG_S: Final = 5


class _NoRequestBytesInLogs(logging.Filter):
    """aiohttp logs a request it cannot parse with the parser's message, which quotes the
    raw bytes (a body can hold names and phone numbers). Keep the fact, drop the bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], HttpProcessingError):
            name = type(record.exc_info[1]).__name__
            record.msg, record.args = f"malformed HTTP request ({name}); bytes not logged", ()
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_NO_REQUEST_BYTES = _NoRequestBytesInLogs()


def create_app(settings: Settings, *, workers: int = 1) -> web.Application:
    """The gateway as an aiohttp application; resources open in its cleanup contexts.

    ``workers`` is how many processes share the port: a per-app rate limit is split
    between them, since each process counts only what it sees.
    """
    logging.getLogger("aiohttp.server").addFilter(_NO_REQUEST_BYTES)  # once: same object
    sealer = Sealer(load_master_key(settings.master_key, settings.data_dir))
    keyring = Keyring(keyring_store(settings), sealer)
    gateway = Gateway(
        settings=settings,
        keyring=keyring,
        sealer=sealer,
        metrics=Metrics(),
        rules=EventRules(
            clock_skew_ms=int(settings.clock_skew_s * 1000),
            late_window_ms=int(settings.late_window_s * 1000),
        ),
        rate_limits=(
            TokenBuckets(settings.rate_limit / workers, burst=max(settings.rate_limit, MAX_EVENTS))
            if settings.rate_limit
            else None
        ),
        trusted_proxies=settings.trusted_proxy_networks,
    )
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_observe_and_answer_errors])
    app[GATEWAY] = gateway
    app[TOKEN_USES] = LastUse()
    app.cleanup_ctx.append(_keyring_refresher)
    app.cleanup_ctx.append(_redis_buffer)
    app.cleanup_ctx.append(_storage)
    app.cleanup_ctx.append(_token_use_writer)
    app.cleanup_ctx.append(_registration)
    app.cleanup_ctx.append(_notifier)
    app.cleanup_ctx.append(_metrics_publisher)
    app.router.add_post("/v1/scans", post_scans, name="scans")
    app.router.add_get("/v1/trace/{person_id}", get_trace, name="trace")
    venues.add_routes(app)
    web_pages.add_routes(app)
    openapi.add_routes(app)
    declarations.add_routes(app)
    door.add_routes(app)
    claims.add_routes(app)
    cases.add_routes(app)
    reports.add_routes(app)
    audit.add_routes(app)
    app.router.add_get("/healthz", get_healthz, name="healthz")
    app.router.add_get("/readyz", get_readyz, name="readyz")
    app.router.add_get("/metrics", get_metrics, name="metrics")
    return app


# -- resources -------------------------------------------------------------------------------


async def _keyring_refresher(app: web.Application) -> AsyncIterator[None]:
    """Pick up keyring changes (a rotation, a retirement, a new app) made by the CLI."""
    keyring = app[GATEWAY].keyring

    async def refresh() -> None:
        # On an error the previous keyring keeps serving; Periodic logs it and retries.
        # The store is read off the event loop (it may be a database), then applied on it.
        store = keyring.store
        if await asyncio.to_thread(store.version) == keyring.version:
            return
        raw, version = await asyncio.to_thread(store.read)
        keyring.load(raw, version)
        log.info("keyring changed: reloaded")

    task = Periodic("keyring-refresh", refresh, KEYRING_REFRESH_S)
    yield
    await task.stop()
    await asyncio.to_thread(keyring.store.close)


async def _redis_buffer(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY]
    settings = gateway.settings
    if settings.redis_url is None:
        raise RuntimeError("create_app needs settings.redis_url (serve starts the server)")
    client = connect_redis(settings.redis_url, settings.redis_cluster)
    buffer = gateway.buffer = RedisBuffer(
        client,
        settings.shards,
        settings.retry_memory_s,
        fsync_always=settings.redis_fsync == "always",
        wait_replicas=settings.redis_wait_replicas,
    )

    async def poll_backlog() -> None:
        # The backlog, Redis's memory and readiness: Redis answering this poll stands for
        # the ping /readyz would send. Storage opens after Redis, so early polls say 0.
        metrics = gateway.metrics
        try:
            state = await buffer.poll()
        except BufferUnavailable:
            metrics.redis_errors.inc()
            metrics.set_ready(False)
            return
        metrics.set_backlog(state.lengths)
        metrics.set_redis_memory(state.memory_used_bytes, state.maxmemory_bytes)
        metrics.set_ready(gateway.storage is not None and await gateway.storage.ping())

    task = Periodic("backlog-poll", poll_backlog, BACKLOG_POLL_S)
    yield
    await task.stop()
    await client.aclose()


async def _metrics_publisher(app: web.Application) -> AsyncIterator[None]:
    """Publish the hot path's counts to Prometheus every second (and at each scrape)."""
    metrics = app[GATEWAY].metrics

    async def publish() -> None:
        metrics.publish()

    task = Periodic("metrics-publish", publish, METRICS_PUBLISH_S)
    yield
    await task.stop()
    metrics.publish()


async def _storage(app: web.Application) -> AsyncIterator[None]:
    """Storage, for readiness and tracing (the flusher writes through its own)."""
    gateway = app[GATEWAY]
    settings = gateway.settings
    gateway.storage = await connect_storage(
        settings.resolved_storage_url, timezone=settings.timezone
    )
    if settings.trace_storage_url:
        gateway.trace_storage = await connect_storage(
            settings.trace_storage_url, timezone=settings.timezone, migrate=False
        )
    yield
    if gateway.trace_storage is not None:
        await gateway.trace_storage.close()
    await gateway.storage.close()


async def _token_use_writer(app: web.Application) -> AsyncIterator[None]:
    """Write the app tokens' minutes of last use out to storage every
    ``SCANGATE_LAST_USE_FLUSH``, and what is left when the application stops."""
    uses = app[TOKEN_USES]
    storage = app[GATEWAY].need_storage()

    async def write() -> None:
        await uses.write(storage)

    task = Periodic("last-use-write", write, app[GATEWAY].settings.last_use_flush_s)
    yield
    await task.stop()
    try:
        await uses.write(storage)
    except Exception:
        log.exception("the app tokens' last use could not be written on shutdown")


async def _registration(app: web.Application) -> AsyncIterator[None]:
    """The data key (from storage), OTP state (in Redis), the SMS sender, and the set of
    revoked venues, re-read every few seconds so a revocation made anywhere (the CLI,
    another process) reaches this one's hot path."""
    gateway = app[GATEWAY]
    settings = gateway.settings
    storage = gateway.need_storage()
    assert gateway.buffer is not None
    personal = gateway.personal = await load_personal_data(storage, gateway.sealer)
    gateway.otp = OtpService(
        gateway.buffer.client,
        personal.otp_key,
        personal.session_key,
        OtpLimits.from_settings(settings),
    )
    gateway.door_limits = door.DoorLimits(gateway.buffer.client, settings)
    gateway.sms = make_sms_sender(settings)
    gateway.revoked_venues = await storage.revoked_venue_ids()

    async def refresh_revocations() -> None:
        gateway.revoked_venues = await storage.revoked_venue_ids()

    task = Periodic("revocations-refresh", refresh_revocations, REVOCATIONS_REFRESH_S)
    yield
    await task.stop()
    if gateway.background:
        await asyncio.wait(gateway.background, timeout=SHUTDOWN_BACKGROUND_S)
    await gateway.sms.close()


async def _notifier(app: web.Application) -> AsyncIterator[None]:
    """Deliver exposure notices from the outbox (gateway.notifier); every worker runs one,
    the leases keep them from sending a notice twice at once."""
    gateway = app[GATEWAY]
    assert gateway.sms is not None
    notifier = Notifier(
        gateway.need_storage(),
        gateway.keyring,
        gateway.need_personal(),
        gateway.sms,
        gateway.settings,
        gateway.metrics,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(run_until(stop, notifier, gateway.settings.notice_poll_s))
    yield
    stop.set()
    # A delivery in flight finishes (at most its timeout); an unfinished one is retried by
    # whichever worker claims it when its lease runs out.
    try:
        await asyncio.wait_for(task, DELIVERY_TIMEOUT_S + 1)
    except TimeoutError:
        log.warning("the notifier did not stop in time; its leases will run out")
    await notifier.close()


# -- middleware ------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _observe_and_answer_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn errors into JSON answers and count and time every request by route."""
    started = time.perf_counter()
    route = request.match_info.route.name or "unmatched"
    try:
        response = await handler(request)
    except ApiError as exc:
        response = error_response(exc.status, exc.code, exc.detail, exc.retry_after_s, exc.extra)
        response.headers.update(exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = HTTP_STATUS_CODES.get(exc.status, "http_error")
        detail = exc.reason
        if exc.status == 413:
            detail = f"the body is over {MAX_BODY_BYTES} bytes"
        response = error_response(exc.status, code, detail)
        if "Allow" in exc.headers:  # a 405 says which methods the route has (RFC 9110)
            response.headers["Allow"] = exc.headers["Allow"]
    except STORAGE_UNAVAILABLE as exc:
        # Storage went away mid-request (a restart, a lost connection): the same promise
        # as for Redis, a 503 the client may retry.
        log.warning("%s %s: storage unavailable (%s)", request.method, route, type(exc).__name__)
        response = error_response(
            503, "unavailable", "storage does not answer", RETRY_AFTER_UNAVAILABLE_S
        )
    except Exception:
        log.exception("%s %s failed", request.method, route)
        response = error_response(500, "internal_error", "the server failed; it is logged")
    request.app[GATEWAY].metrics.observe_request(
        route, response.status, time.perf_counter() - started
    )
    return response


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


# -- handlers --------------------------------------------------------------------------------


async def post_scans(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    app_id = authenticate(request, gateway.keyring)
    doc = await read_json(request)
    if not isinstance(doc, dict) or not isinstance(doc.get("events"), list):
        raise InvalidRequest('expected {"events": [...]}')
    raw_events: list[Any] = doc["events"]
    if not raw_events:
        raise InvalidRequest("events: send 1 to 500 events")
    if len(raw_events) > MAX_EVENTS:
        raise PayloadTooLarge(f"events: at most {MAX_EVENTS} per request")
    if gateway.rate_limits is not None:
        wait_s = gateway.rate_limits.take(app_id, len(raw_events), time.monotonic())
        if wait_s:
            raise RateLimited(
                f"over {gateway.settings.rate_limit} events per second for this app",
                retry_after_s=max(1, math.ceil(wait_s)),
            )
    buffer = gateway.buffer
    assert buffer is not None
    if sum(buffer.lengths) >= gateway.settings.backlog_high_water:
        gateway.metrics.backpressure_rejections.inc()
        raise BacklogFull(
            "the buffer is over its high-water mark; retry later",
            retry_after_s=RETRY_AFTER_BACKLOG_S,
        )

    now_ms = int(time.time() * 1000)
    verifier = gateway.keyring.verifier(app_id)
    shards = gateway.settings.shards
    revoked = gateway.revoked_venues
    # Each event's verdict, with its shard when it goes to Redis (-1 when rejected).
    checked: list[tuple[ScanEvent | Rejection, int]] = []
    by_shard: dict[int, list[tuple[bytes, bytes]]] = {}
    for raw in raw_events:
        verdict = check_event(raw, app_id, verifier, gateway.rules, now_ms, revoked)
        if isinstance(verdict, ScanEvent):
            shard = shard_of(app_id, verdict.event_id, shards)
            by_shard.setdefault(shard, []).append(
                (seen_field(app_id, verdict.event_id), encode_event(verdict))
            )
            checked.append((verdict, shard))
        else:
            checked.append((verdict, -1))

    appended: dict[int, list[bool]] = {}
    if by_shard:
        try:
            appended = await buffer.append(by_shard, now_ms)
        except BufferUnavailable as exc:
            gateway.metrics.redis_errors.inc()
            raise Unavailable(str(exc), retry_after_s=RETRY_AFTER_UNAVAILABLE_S) from exc

    return web.Response(
        body=_answer(app_id, checked, appended, gateway.metrics), headers=JSON_HEADERS
    )


def _answer(
    app_id: str,
    checked: list[tuple[ScanEvent | Rejection, int]],
    appended: dict[int, list[bool]],
    metrics: Metrics,
) -> bytes:
    """The response body, in request order, and the verdict counts for the metrics."""
    cursors = dict.fromkeys(appended, 0)
    results: list[dict[str, Any]] = []
    tally: Tally[tuple[str, str, str, str]] = Tally()
    accepted = duplicates = 0
    for verdict, shard in checked:
        if isinstance(verdict, ScanEvent):
            fresh = appended[shard][cursors[shard]]
            cursors[shard] += 1
            status = "accepted" if fresh else "duplicate"
            if fresh:
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


async def get_healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type=JSON)


async def get_readyz(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    down = None
    if gateway.buffer is None or not await gateway.buffer.ping():
        down = "Redis"
    elif gateway.storage is None or not await gateway.storage.ping():
        down = "storage"
    gateway.metrics.set_ready(down is None)
    if down is not None:
        raise Unavailable(f"{down} does not answer", retry_after_s=RETRY_AFTER_UNAVAILABLE_S)
    return web.Response(body=b'{"status":"ready","redis":"ok","storage":"ok"}', content_type=JSON)


async def get_trace(request: web.Request) -> web.Response:
    """Contacts of a person, for an admin token; every call is audit-logged."""
    gateway = request.app[GATEWAY]
    storage = gateway.need_storage()
    admin = await authenticate_admin(request, storage)
    person_id = request.match_info["person_id"]
    if not ID_PATTERN.fullmatch(person_id):
        raise InvalidRequest("person_id: 1 to 16 characters of A-Z0-9")
    try:
        query = trace_query(person_id, request.query, now_ms=int(time.time() * 1000))
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    reveal = request.query.get("reveal", "0")
    if reveal not in ("0", "1"):
        raise InvalidRequest("reveal: 0 or 1")
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise InvalidRequest("format: json or csv")
    actor = f"admin:{admin}"
    rows = await storage.trace(query, actor=actor, read_from=gateway.trace_storage)
    revealed = None
    if reveal == "1":
        revealed = await declarations.reveal_contacts(
            storage, gateway.need_personal(), [r.person_id for r in rows], actor, person_id
        )
    if fmt == "csv":
        return web.Response(
            text=rows_to_csv(rows, revealed),
            content_type="text/csv",
            charset="utf-8",
            headers={
                "Content-Disposition": f'attachment; filename="trace-{person_id}.csv"',
                "Cache-Control": "no-store",
            },
        )
    # no-store: with reveal=1 it holds names and phones; no cache may keep a copy.
    return web.Response(
        body=orjson.dumps(rows_to_json(rows, revealed)),
        headers={"Content-Type": JSON, "Cache-Control": "no-store"},
    )


def trace_query(person_id: str, params: Mapping[str, str], now_ms: int) -> TraceQuery:
    """A trace query from ``days``, ``margin``, ``min_overlap`` and ``depth`` parameters."""
    days = params.get("days", "14")
    depth = params.get("depth", "1")
    if not days.isdecimal() or not 1 <= int(days) <= 60:
        raise ValueError("days: a whole number from 1 to 60")
    if depth not in ("1", "2"):
        raise ValueError("depth: 1 or 2")
    try:
        margin_ms = int(parse_duration_s(params.get("margin", "60m")) * 1000)
        min_overlap_ms = int(parse_duration_s(params.get("min_overlap", "10m")) * 1000)
    except ValueError as exc:
        raise ValueError(f"margin/min_overlap: {exc}") from None
    if not (0 <= margin_ms <= MAX_TRACE_WINDOW_MS and 0 <= min_overlap_ms <= MAX_TRACE_WINDOW_MS):
        raise ValueError("margin/min_overlap: at most 24h each")
    return TraceQuery(
        now_ms=now_ms,
        person_id=person_id,
        days=int(days),
        margin_ms=margin_ms,
        min_overlap_ms=min_overlap_ms,
        depth=1 if depth == "1" else 2,
    )


async def get_metrics(request: web.Request) -> web.Response:
    body = request.app[GATEWAY].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
