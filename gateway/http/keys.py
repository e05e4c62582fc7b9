"""The application's keys: one per resource, each with the type it holds.

A handler reads what it needs from its own key (``request.app[STORAGE]``); nothing is
shared through one object whose fields fill in as the application starts.

- ``create_app`` sets what never changes while the application runs: the settings and
  what is made from them alone (the sealer, the keyring, the metrics, the event rules, the
  rate limits, the trusted proxies) and the token-use notes. Each has a key of its own
  rather than a field of one frozen config object: a handler's look-ups then say what it
  uses, and the keyring and the metrics are live objects, not configuration.
- Each resource that must be opened (and closed) is set by a cleanup context of its own in
  ``gateway.http.app``, in the order below: a resource takes the ones it needs from their
  keys, which the earlier contexts have set (aiohttp runs the contexts in order at startup,
  before the application freezes, and closes them in the reverse order).
- The door's look-up limits live beside their class: ``gateway.http.door.DOOR_LIMITS``.

Every key is set once, before the first request; what changes while the application runs
(the keyring's contents, the revoked venues, the tasks in flight) changes inside the object
its key holds.
"""

from __future__ import annotations

from typing import Final

import redis.asyncio as aioredis
from aiohttp import web

from gateway.background import BackgroundTasks
from gateway.http.keyring_refresh import KeyringRefresh
from gateway.http.last_use import LastUse
from gateway.http.otp import OtpService
from gateway.http.posters import Posters
from gateway.http.ratelimit import TokenBuckets
from gateway.metrics import Metrics
from gateway.outbox.sms import SmsSender
from gateway.pipeline.buffer import RedisBuffer
from gateway.pipeline.events import EventRules
from gateway.settings import Network, Settings
from signing import Keyring, Sealer
from signing.personal import PersonalData
from storage import Storage

# -- set by create_app -------------------------------------------------------------------------

SETTINGS: Final = web.AppKey("settings", Settings)
"""The settings the application was made with."""

SEALER: Final = web.AppKey("sealer", Sealer)
"""The master key (``SCANGATE_MASTER_KEY`` or the data dir's file): it seals the data key
in storage and the keyring's keys."""

KEYRING: Final = web.AppKey("keyring", Keyring)
"""The apps, their signing keys and app tokens. Reloaded in place when the CLI changes the
store (the keyring refresher), so holders of this object see every change."""

KEYRING_REFRESH: Final = web.AppKey("keyring_refresh", KeyringRefresh)
"""Checks the keyring's store for changes: every second, and at once (rate-limited) for a
token the keyring does not know."""

METRICS: Final = web.AppKey("metrics", Metrics)
"""This process's Prometheus metrics (a registry of the application's own)."""

EVENT_RULES: Final = web.AppKey("event_rules", EventRules)
"""The time limits a scan's ``scanned_at`` must meet (``SCANGATE_CLOCK_SKEW``,
``SCANGATE_LATE_WINDOW``)."""

RATE_LIMITS: Final = web.AppKey[TokenBuckets | None]("rate_limits")
"""The per-app token buckets of ``POST /v1/scans``, holding this process's share of
``SCANGATE_RATE_LIMIT``; None when that setting is 0, which turns the limit off."""

TRUSTED_PROXIES: Final = web.AppKey[tuple[Network, ...]]("trusted_proxies")
"""``SCANGATE_TRUSTED_PROXIES`` parsed: the peers whose forwarding headers name the client
(``gateway.http.addresses``)."""

TOKEN_USES: Final = web.AppKey("token_uses", LastUse)
"""Each app token's minute of last use in this process (``gateway.http.last_use``), noted
by ``authenticate`` and written out to storage by the token-use writer."""

# -- set by a cleanup context each, in the order they open ------------------------------------

REDIS: Final = web.AppKey[aioredis.Redis]("redis")
"""The process's Redis client (a bounded pool, fail-fast: ``connect_redis``). The buffer,
the one-time codes and the door's look-up limits all take it from here."""

BUFFER: Final = web.AppKey("buffer", RedisBuffer)
"""The Redis buffer accepted events are appended to (``gateway.pipeline.buffer``)."""

STORAGE: Final = web.AppKey[Storage]("storage")
"""Storage (SQLite or PostgreSQL), migrated; the flusher writes through its own."""

TRACE_STORAGE: Final = web.AppKey[Storage]("trace_storage")
"""Where traces read visits from: the replica ``SCANGATE_TRACE_STORAGE_URL`` names, or the
same object as ``STORAGE`` when it is unset. Audit entries are always written to
``STORAGE``."""

PERSONAL: Final = web.AppKey("personal", PersonalData)
"""The data key (kept sealed in storage, made on first use) and the keys derived from it:
encryption of personal data, blind indexes, OTP and session keys, CSRF tokens."""

OTP: Final = web.AppKey("otp", OtpService)
"""One-time codes and phone sessions (``gateway.http.otp``); its state is in Redis."""

SMS: Final = web.AppKey[SmsSender]("sms")
"""The SMS sender ``SCANGATE_SMS_URL`` picks (the log file's when unset)."""

BACKGROUND: Final = web.AppKey("background", BackgroundTasks)
"""Work a request starts that outlives it (an OTP's SMS being sent), awaited on shutdown
before the SMS sender closes."""


class RevokedVenues:
    """The registered venues whose codes are refused: read from storage at startup and
    again every 2 s, so a revocation made anywhere (the CLI, another process) reaches this
    one's hot path; one made through this process counts here at once."""

    def __init__(self, ids: frozenset[str]) -> None:
        # Replaced whole, never changed in place: a reader holds a set that stays as read.
        self.ids = ids

    def add(self, venue_id: str) -> None:
        self.ids = self.ids | {venue_id}


POSTERS: Final = web.AppKey("posters", Posters)
"""Rendered venue posters and the threads that render them (``gateway.http.posters``)."""

REVOKED_VENUES: Final = web.AppKey("revoked_venues", RevokedVenues)
"""The revoked venues, as this process last read them."""
