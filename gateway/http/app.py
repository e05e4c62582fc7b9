"""The aiohttp application: ``create_app(settings)`` and its handlers.

The scan handler is the pipeline's source: authenticate the app, parse the batch, check
every event (``gateway.pipeline.events``), append the accepted ones to the Redis buffer
(``gateway.pipeline.buffer``), and answer each event's verdict in request order. A 2xx is sent only
after Redis has taken every accepted event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Final

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.background import Periodic
from gateway.http import (
    audit,
    cases,
    claims,
    declarations,
    door,
    health,
    openapi,
    reports,
    scans,
    trace,
    venues,
)
from gateway.http import web as web_pages
from gateway.http.context import (
    GATEWAY,
    JSON,
    MAX_BODY_BYTES,
    TOKEN_USES,
    Gateway,
    load_personal_data,
)
from gateway.http.errors import (
    HTTP_STATUS_CODES,
    ApiError,
)
from gateway.http.last_use import LastUse
from gateway.http.otp import OtpLimits, OtpService
from gateway.http.ratelimit import TokenBuckets
from gateway.metrics import Metrics
from gateway.outbox.notifier import DELIVERY_TIMEOUT_S, Notifier, run_until
from gateway.outbox.sms import make_sms_sender
from gateway.pipeline.buffer import BufferUnavailable, RedisBuffer, connect_redis
from gateway.pipeline.events import EventRules
from gateway.settings import Settings
from signing import Keyring, Sealer, load_master_key
from storage import StorageUnavailable, connect_storage
from storage.keyring_store import keyring_store

log = logging.getLogger(__name__)

# A revoked app token must be refused by every worker within 2 s of the change: a check
# every second leaves the other second for the check itself and a slow event loop.
KEYRING_REFRESH_S: Final = 1.0
REVOCATIONS_REFRESH_S: Final = 2.0
SHUTDOWN_BACKGROUND_S: Final = 10.0
BACKLOG_POLL_S: Final = 0.5
METRICS_PUBLISH_S: Final = 1.0
RETRY_AFTER_UNAVAILABLE_S: Final = 1
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
    keyring = Keyring(keyring_store(settings.resolved_storage_url, settings.keyring_path), sealer)
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
            TokenBuckets(
                settings.rate_limit / workers, burst=max(settings.rate_limit, scans.MAX_EVENTS)
            )
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
    scans.add_routes(app)
    trace.add_routes(app)
    venues.add_routes(app)
    web_pages.add_routes(app)
    openapi.add_routes(app)
    declarations.add_routes(app)
    door.add_routes(app)
    claims.add_routes(app)
    cases.add_routes(app)
    reports.add_routes(app)
    audit.add_routes(app)
    health.add_routes(app)
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
    app[door.DOOR_LIMITS] = door.DoorLimits(gateway.buffer.client, settings)
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
    """Deliver exposure notices from the outbox (gateway.outbox.notifier); every worker runs one,
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
    except StorageUnavailable as exc:
        # Storage went away mid-request (a restart, a lost connection): the same promise
        # as for Redis, a 503 the client may retry. The driver's error names what happened.
        cause = type(exc.__cause__ or exc).__name__
        log.warning("%s %s: storage unavailable (%s)", request.method, route, cause)
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
