"""The aiohttp application: ``create_app(settings)``, its cleanup contexts (one per
resource, each under its own typed key of ``gateway.http.keys``), and the routes of every
resource module (the scan handler, the pipeline's source, is ``gateway.http.scans``).
Requests enter through ``gateway.http.front_door``, which also holds the middleware."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.background import BackgroundTasks, Periodic
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
    stored,
    trace,
    venues,
)
from gateway.http import web as web_pages
from gateway.http.context import MAX_BODY_BYTES, load_personal_data
from gateway.http.front_door import observe_and_answer_errors
from gateway.http.headers import answer_headers
from gateway.http.keyring_refresh import KeyringRefresh
from gateway.http.keys import (
    BACKGROUND,
    BUFFER,
    EVENT_RULES,
    KEYRING,
    KEYRING_REFRESH,
    METRICS,
    OTP,
    PERSONAL,
    POSTERS,
    RATE_LIMITS,
    REDIS,
    REVOKED_VENUES,
    SEALER,
    SETTINGS,
    SMS,
    STORAGE,
    TOKEN_USES,
    TRACE_STORAGE,
    TRUSTED_PROXIES,
    RevokedVenues,
)
from gateway.http.last_use import LastUse
from gateway.http.otp import OtpLimits, OtpService
from gateway.http.posters import Posters
from gateway.http.ratelimit import TokenBuckets
from gateway.metrics import Metrics
from gateway.outbox.notifier import DELIVERY_TIMEOUT_S, Notifier, run_until
from gateway.outbox.sms import make_sms_sender
from gateway.pipeline.buffer import BufferUnavailable, RedisBuffer
from gateway.pipeline.client import connect_redis
from gateway.pipeline.events import EventRules
from gateway.settings import Settings
from signing import Keyring, Sealer, load_master_key
from storage import connect_storage
from storage.keyring_store import keyring_store

log = logging.getLogger(__name__)

# A revoked app token must be refused by every worker within 2 s of the change: a check
# every second leaves the other second for the check itself and a slow event loop.
KEYRING_REFRESH_S: Final = 1.0
REVOCATIONS_REFRESH_S: Final = 2.0
SHUTDOWN_BACKGROUND_S: Final = 10.0
BACKLOG_POLL_S: Final = 0.5
METRICS_PUBLISH_S: Final = 1.0


class _NoRequestBytesInLogs(logging.Filter):
    """aiohttp logs a request it cannot parse with the parser's message, which quotes the
    raw bytes (a body can hold names and phone numbers). Keep the fact, drop the bytes.
    Its other errors name the client's address (personal data): keep the error, drop that."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], HttpProcessingError):
            name = type(record.exc_info[1]).__name__
            record.msg, record.args = f"malformed HTTP request ({name}); bytes not logged", ()
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        elif isinstance(record.msg, str) and record.msg.startswith("Error handling request"):
            record.msg, record.args = "error handling a request", ()
        return True


_NO_REQUEST_BYTES = _NoRequestBytesInLogs()


def create_app(settings: Settings, *, workers: int = 1) -> web.Application:
    """The gateway as an aiohttp application; resources open in its cleanup contexts.

    ``workers`` is how many processes share the port: a per-app rate limit is split
    between them, since each process counts only what it sees.

    What never changes while the application runs is set here, each under its own key
    (``gateway.http.keys``); every resource that opens and closes is set by a cleanup
    context of its own, below, in the order they are appended.
    """
    logging.getLogger("aiohttp.server").addFilter(_NO_REQUEST_BYTES)  # once: same object
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[observe_and_answer_errors])
    app.on_response_prepare.append(answer_headers)
    sealer = Sealer(load_master_key(settings.master_key, settings.data_dir))
    app[SETTINGS] = settings
    app[SEALER] = sealer
    app[KEYRING] = Keyring(
        keyring_store(settings.resolved_storage_url, settings.keyring_path), sealer
    )
    app[KEYRING_REFRESH] = KeyringRefresh(app[KEYRING])
    app[METRICS] = Metrics()
    app[EVENT_RULES] = EventRules(
        clock_skew_ms=int(settings.clock_skew_s * 1000),
        late_window_ms=int(settings.late_window_s * 1000),
    )
    app[RATE_LIMITS] = (
        TokenBuckets(
            settings.rate_limit / workers, burst=max(settings.rate_limit, scans.MAX_EVENTS)
        )
        if settings.rate_limit
        else None
    )
    app[TRUSTED_PROXIES] = settings.trusted_proxy_networks
    app[TOKEN_USES] = LastUse()
    app.cleanup_ctx.extend(
        [
            _keyring_refresher,
            _redis,
            _buffer,
            _storage,
            _trace_storage,
            _readiness_poll,
            _token_use_writer,
            _personal_data,
            _otp,
            _door_limits,
            _sms,
            _background,
            _revoked_venues,
            _posters,
            _notifier,
            _metrics_publisher,
        ]
    )
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
    stored.add_routes(app)
    health.add_routes(app)
    return app


# -- resources, in the order they open -------------------------------------------------------


async def _keyring_refresher(app: web.Application) -> AsyncIterator[None]:
    """Pick up keyring changes (a rotation, a retirement, a new app) made by the CLI: every
    second here, and at once for a token not known (``gateway.http.keyring_refresh``)."""
    task = Periodic("keyring-refresh", app[KEYRING_REFRESH].now, KEYRING_REFRESH_S)
    yield
    await task.stop()
    await asyncio.to_thread(app[KEYRING].store.close)


async def _redis(app: web.Application) -> AsyncIterator[None]:
    """The process's one Redis client. The buffer, the one-time codes and the door's limits
    share its pool: one set of connections per process, each under the same bounds."""
    settings = app[SETTINGS]
    if settings.redis_url is None:
        raise RuntimeError("create_app needs settings.redis_url (serve starts the server)")
    client = app[REDIS] = connect_redis(settings.redis_url, settings.redis_cluster)
    yield
    await client.aclose()


async def _buffer(app: web.Application) -> AsyncIterator[None]:
    """The buffer accepted events are appended to, on the process's Redis client (which its
    own context closes)."""
    settings = app[SETTINGS]
    app[BUFFER] = RedisBuffer(
        app[REDIS],
        settings.shards,
        settings.retry_memory_s,
        fsync_always=settings.redis_fsync == "always",
        wait_replicas=settings.redis_wait_replicas,
    )
    yield
    app[BUFFER].close()


async def _storage(app: web.Application) -> AsyncIterator[None]:
    """Storage, for readiness, registration and tracing (the flusher writes through its
    own)."""
    settings = app[SETTINGS]
    storage = app[STORAGE] = await connect_storage(
        settings.resolved_storage_url, timezone=settings.timezone
    )
    yield
    await storage.close()


async def _trace_storage(app: web.Application) -> AsyncIterator[None]:
    """The replica traces read from (``SCANGATE_TRACE_STORAGE_URL``); without one, traces
    read from storage itself."""
    settings = app[SETTINGS]
    if not settings.trace_storage_url:
        app[TRACE_STORAGE] = app[STORAGE]
        yield
        return
    replica = app[TRACE_STORAGE] = await connect_storage(
        settings.trace_storage_url, timezone=settings.timezone, migrate=False
    )
    yield
    await replica.close()


async def _readiness_poll(app: web.Application) -> AsyncIterator[None]:
    """The backlog, Redis's memory and readiness, every ``BACKLOG_POLL_S``: Redis answering
    this poll stands for the ping /readyz would send."""
    buffer, storage, metrics = app[BUFFER], app[STORAGE], app[METRICS]

    async def poll() -> None:
        try:
            state = await buffer.poll()
        except BufferUnavailable:
            metrics.redis_errors.inc()
            metrics.set_ready(False)
            return
        metrics.set_backlog(state.lengths)
        metrics.set_redis_memory(state.memory_used_bytes, state.maxmemory_bytes)
        metrics.set_ready(await storage.ping())

    task = Periodic("backlog-poll", poll, BACKLOG_POLL_S)
    yield
    await task.stop()


async def _token_use_writer(app: web.Application) -> AsyncIterator[None]:
    """Write the app tokens' minutes of last use out to storage every
    ``SCANGATE_LAST_USE_FLUSH``, and what is left when the application stops."""
    uses, storage = app[TOKEN_USES], app[STORAGE]

    async def write() -> None:
        await uses.write(storage)

    task = Periodic("last-use-write", write, app[SETTINGS].last_use_flush_s)
    yield
    await task.stop()
    try:
        await uses.write(storage)
    except Exception:
        log.exception("the app tokens' last use could not be written on shutdown")


async def _personal_data(app: web.Application) -> AsyncIterator[None]:
    """The data key, from storage (made there on first use), opened with the master key."""
    app[PERSONAL] = await load_personal_data(app[STORAGE], app[SEALER])
    yield


async def _otp(app: web.Application) -> AsyncIterator[None]:
    """One-time codes: their state in Redis (the process's client), their HMACs and
    sessions under keys derived from the data key."""
    personal = app[PERSONAL]
    app[OTP] = OtpService(
        app[REDIS],
        personal.otp_key,
        personal.session_key,
        OtpLimits.from_settings(app[SETTINGS]),
    )
    yield


async def _door_limits(app: web.Application) -> AsyncIterator[None]:
    """The door's person look-up limits, counted in Redis (the process's client)."""
    app[door.DOOR_LIMITS] = door.DoorLimits(app[REDIS], app[SETTINGS])
    yield


async def _sms(app: web.Application) -> AsyncIterator[None]:
    """The SMS sender (one-time codes, exposure notices)."""
    sms = app[SMS] = make_sms_sender(app[SETTINGS])
    yield
    await sms.close()


async def _background(app: web.Application) -> AsyncIterator[None]:
    """Work requests leave running (an OTP's SMS). Opened after the SMS sender, so on
    shutdown it is awaited before the sender closes."""
    tasks = app[BACKGROUND] = BackgroundTasks()
    yield
    await tasks.wait(SHUTDOWN_BACKGROUND_S)


async def _posters(app: web.Application) -> AsyncIterator[None]:
    """Rendered posters, emptied whenever the keyring changes (a key rotated or retired,
    an app renamed: each changes what a poster shows)."""
    posters = app[POSTERS] = Posters()
    app[KEYRING_REFRESH].on_change.append(posters.clear)
    yield
    await asyncio.to_thread(posters.close)


async def _revoked_venues(app: web.Application) -> AsyncIterator[None]:
    """The set of revoked venues, re-read every few seconds so a revocation made anywhere
    (the CLI, another process) reaches this one's hot path."""
    storage = app[STORAGE]
    revoked = app[REVOKED_VENUES] = RevokedVenues(await storage.revoked_venue_ids())

    async def refresh() -> None:
        revoked.ids = await storage.revoked_venue_ids()

    task = Periodic("revocations-refresh", refresh, REVOCATIONS_REFRESH_S)
    yield
    await task.stop()


async def _notifier(app: web.Application) -> AsyncIterator[None]:
    """Deliver exposure notices from the outbox (gateway.outbox.notifier); every worker runs
    one, the leases keep them from sending a notice twice at once."""
    settings = app[SETTINGS]
    notifier = Notifier(app[STORAGE], app[KEYRING], app[PERSONAL], app[SMS], settings, app[METRICS])
    stop = asyncio.Event()
    task = asyncio.create_task(run_until(stop, notifier, settings.notice_poll_s))
    yield
    stop.set()
    # A delivery in flight finishes (at most its timeout); an unfinished one is retried by
    # whichever worker claims it when its lease runs out.
    try:
        await asyncio.wait_for(task, DELIVERY_TIMEOUT_S + 1)
    except TimeoutError:
        log.warning("the notifier did not stop in time; its leases will run out")
    await notifier.close()


async def _metrics_publisher(app: web.Application) -> AsyncIterator[None]:
    """Publish the hot path's counts to Prometheus every second (and at each scrape)."""
    metrics = app[METRICS]

    async def publish() -> None:
        metrics.publish()

    task = Periodic("metrics-publish", publish, METRICS_PUBLISH_S)
    yield
    await task.stop()
    metrics.publish()
