"""PostgreSQL storage through asyncpg, tables partitioned by day.

Days are days in the configured time zone (``SCANGATE_TIMEZONE``): a UTC day would cut
Vietnam's morning rush in two, and retention drops whole days. Partitions are created as
days come (a cache of known ones avoids asking each batch), under an advisory lock so
concurrent flushers do not race on the DDL.

A batch is one transaction: lock the persons it touches (advisory transaction locks, in a
sorted order so two flushers never deadlock), insert identities into ``scan_event_ids``
(the unique key; ``ON CONFLICT DO NOTHING`` tells new from already stored), insert the new
events, then re-derive those persons' visits. Times cross the wire as epoch milliseconds
and are converted in SQL, which saves building a datetime per value in Python.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Final
from zoneinfo import ZoneInfo

import asyncpg

from . import migrations
from .base import (
    AuditEntry,
    BatchResult,
    PurgeResult,
    Storage,
    StorageError,
    first_lookback_ms,
    hash_admin_token,
    new_admin_token,
    rederive,
)
from .models import PairingRules, ScanEvent, Visit

MIGRATION_LOCK: Final = 0x5C4A_0001
PARTITION_LOCK: Final = 0x5C4A_0002
POOL_MAX: Final = 8

_MS: Final = "(extract(epoch from {}) * 1000)::bigint"
_VISIT_SELECT: Final = (
    "SELECT person_id, venue_id, "
    + ", ".join(_MS.format(c) for c in ("checkin_at", "checkout_at"))
    + ", closed_by, "
    + _MS.format("source_at")
    + " FROM visits"
)
_EVENT_SELECT: Final = (
    "SELECT e.app_id, e.event_id, e.kind, e.venue_id, e.person_id, "
    + _MS.format("e.scanned_at")
    + ", "
    + _MS.format("e.received_at")
    + ", e.device_id FROM scan_events e"
)


def _ts(param: str) -> str:
    """SQL for a bigint[] parameter of epoch ms as timestamptz values."""
    return f"to_timestamp({param}::float8 / 1000)"


class PostgresStorage(Storage):
    kind = "postgresql"

    def __init__(self, pool: asyncpg.Pool, timezone: str) -> None:
        self._pool = pool
        self._tz = ZoneInfo(timezone)
        self._known_days: set[tuple[str, dt.date]] = set()

    @classmethod
    async def connect(
        cls, url: str, *, timezone: str, search_path: str | None = None
    ) -> PostgresStorage:
        """A pool on ``url``; ``search_path`` puts the tables in another schema (tests)."""
        settings = {"search_path": search_path} if search_path else None
        try:
            pool = await asyncpg.create_pool(
                url, min_size=1, max_size=POOL_MAX, timeout=10, server_settings=settings
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise StorageError(f"cannot connect to PostgreSQL: {exc}") from exc
        return cls(pool, timezone)

    # -- schema ----------------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL)"
            )
            done = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            applied = []
            for version, statements in migrations.POSTGRES:
                if version in done:
                    continue
                for statement in statements:
                    await conn.execute(statement)
                await conn.execute("INSERT INTO schema_migrations VALUES ($1, now())", version)
                applied.append(version)
        # Today and the next two days exist before the first scan of the day arrives.
        today = dt.datetime.now(self._tz).date()
        await self.ensure_days([today + dt.timedelta(days=i) for i in range(3)])
        return applied

    def day_of(self, ms: int) -> dt.date:
        return dt.datetime.fromtimestamp(ms / 1000, self._tz).date()

    def _day_start(self, day: dt.date) -> dt.datetime:
        return dt.datetime(day.year, day.month, day.day, tzinfo=self._tz)

    async def ensure_days(self, days: Sequence[dt.date]) -> None:
        """Create the day partitions of every partitioned table that do not exist yet."""
        missing = [
            (table, column, day)
            for table, column in migrations.POSTGRES_DAY_PARTITIONED
            for day in sorted(set(days))
            if (table, day) not in self._known_days
        ]
        if not missing:
            return
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", PARTITION_LOCK)
            for table, _column, day in missing:
                name = f"{table}_p{day:%Y%m%d}"
                start = self._day_start(day)
                end = self._day_start(day + dt.timedelta(days=1))
                # Identifiers come from our own constants and a date, never from input.
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} "
                    f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
                )
        self._known_days.update((table, day) for table, _c, day in missing)

    # -- batches ---------------------------------------------------------------------------

    async def store_batch(self, events: Sequence[ScanEvent], rules: PairingRules) -> BatchResult:
        if not events:
            return BatchResult(0, 0, 0)
        days = {self.day_of(e.scanned_at_ms) for e in events}
        # Visits are partitioned by their source event's time: a late event's visits may
        # land on any day back to its own.
        lo_day, hi_day = min(days), max(days)
        span = [lo_day + dt.timedelta(days=i) for i in range((hi_day - lo_day).days + 2)]
        await self.ensure_days(span)
        async with self._pool.acquire() as conn, conn.transaction():
            persons = sorted({e.person_id for e in events})
            await conn.execute(
                "SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) AS k ORDER BY k",
                sorted({_lock_key(p) for p in persons}),
            )
            new_ids = await conn.fetch(
                "INSERT INTO scan_event_ids (app_id, event_id, scanned_at) "
                f"SELECT a, e, {_ts('s')} FROM unnest($1::text[], $2::text[], $3::bigint[]) "
                "AS t(a, e, s) ON CONFLICT DO NOTHING RETURNING app_id, event_id",
                [e.app_id for e in events],
                [e.event_id for e in events],
                [e.scanned_at_ms for e in events],
            )
            fresh = {(r[0], r[1]) for r in new_ids}
            new_events = [e for e in events if (e.app_id, e.event_id) in fresh]
            # The same identity twice in one batch: the first occurrence is the event.
            seen: set[tuple[str, str]] = set()
            unique_new = []
            for e in new_events:
                if (e.app_id, e.event_id) not in seen:
                    seen.add((e.app_id, e.event_id))
                    unique_new.append(e)
            if unique_new:
                await self._insert_events(conn, unique_new)
                earliest: dict[str, int] = {}
                for e in unique_new:
                    p = e.person_id
                    earliest[p] = min(earliest.get(p, e.scanned_at_ms), e.scanned_at_ms)
                await self._rederive(conn, earliest, rules)
            else:
                earliest = {}
        return BatchResult(len(unique_new), len(events) - len(unique_new), len(earliest))

    async def _insert_events(self, conn: asyncpg.Connection, events: list[ScanEvent]) -> None:
        await conn.execute(
            "INSERT INTO scan_events (app_id, event_id, kind, venue_id, person_id, scanned_at, "
            "received_at, device_id, stored_at) "
            f"SELECT a, e, k, v, p, {_ts('s')}, {_ts('r')}, d, now() FROM unnest("
            "$1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], "
            "$7::bigint[], $8::text[]) AS t(a, e, k, v, p, s, r, d)",
            *(list(column) for column in zip(*events, strict=True)),
        )

    async def _rederive(
        self, conn: asyncpg.Connection, earliest: dict[str, int], rules: PairingRules
    ) -> None:
        """Replace each person's visits from their quiet point on, in a few statements."""
        pending = dict(earliest)
        lookback = first_lookback_ms(rules)
        quiet: dict[str, int] = {}
        visits: list[Visit] = []
        while pending:
            persons = list(pending)
            sinces = [pending[p] - lookback for p in persons]
            rows = await conn.fetch(
                f"{_EVENT_SELECT} JOIN unnest($1::text[], $2::bigint[]) AS d(p, since) "
                f"ON e.person_id = d.p AND e.scanned_at >= {_ts('d.since')} "
                "ORDER BY e.person_id, e.scanned_at",
                persons,
                sinces,
            )
            by_person: dict[str, list[ScanEvent]] = defaultdict(list)
            for r in rows:
                by_person[r[4]].append(ScanEvent(*r))
            still: dict[str, int] = {}
            for p, since in zip(persons, sinces, strict=True):
                result = rederive(by_person[p], pending[p], since, rules)
                if result is None:
                    still[p] = pending[p]
                else:
                    quiet[p], person_visits = result
                    visits += person_visits
            pending, lookback = still, lookback * 2
        await conn.execute(
            "DELETE FROM visits v USING unnest($1::text[], $2::bigint[]) AS d(p, q) "
            f"WHERE v.person_id = d.p AND v.source_at >= {_ts('d.q')}",
            list(quiet),
            list(quiet.values()),
        )
        if visits:
            await conn.execute(
                "INSERT INTO visits (person_id, venue_id, checkin_at, checkout_at, closed_by, "
                f"source_at) SELECT p, v, {_ts('i')}, {_ts('o')}, c, {_ts('s')} FROM unnest("
                "$1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[], $6::bigint[]) "
                "AS t(p, v, i, o, c, s)",
                *(list(column) for column in zip(*visits, strict=True)),
            )

    # -- reading ---------------------------------------------------------------------------

    async def person_visits(self, person_id: str, start_ms: int, end_ms: int) -> list[Visit]:
        return await self._visits(
            f"person_id = $1 AND checkout_at >= {_ts('$2')} AND checkin_at <= {_ts('$3')}",
            person_id,
            start_ms,
            end_ms,
        )

    async def venue_visits(self, venue_id: str, start_ms: int, end_ms: int) -> list[Visit]:
        return await self._visits(
            f"venue_id = $1 AND checkin_at <= {_ts('$3')} AND checkout_at >= {_ts('$2')}",
            venue_id,
            start_ms,
            end_ms,
        )

    async def all_visits(self) -> list[Visit]:
        return await self._visits("true")

    async def _visits(self, where: str, *params: Any) -> list[Visit]:
        rows = await self._pool.fetch(
            f"{_VISIT_SELECT} WHERE {where} "
            "ORDER BY person_id, source_at, venue_id, checkin_at, closed_by",
            *params,
        )
        return [Visit(*r) for r in rows]

    async def count_events(self) -> int:
        return int(await self._pool.fetchval("SELECT count(*) FROM scan_events"))

    async def event_identities(self) -> list[tuple[str, str]]:
        rows = await self._pool.fetch("SELECT app_id, event_id FROM scan_events")
        return [(r[0], r[1]) for r in rows]

    # -- retention -------------------------------------------------------------------------

    async def purge(self, cutoff_ms: int) -> PurgeResult:
        """Drop the day partitions wholly before the cutoff, then delete what remains
        before it in the cutoff's own day."""
        cutoff_day = self.day_of(cutoff_ms)
        dropped = events = visits = 0
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", PARTITION_LOCK)
            for table, _column in migrations.POSTGRES_DAY_PARTITIONED:
                children = await conn.fetch(
                    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                    "WHERE i.inhparent = $1::regclass",
                    table,
                )
                for (name,) in children:
                    day = dt.datetime.strptime(name.rsplit("_p", 1)[1], "%Y%m%d").date()
                    if day < cutoff_day:
                        count = int(await conn.fetchval(f"SELECT count(*) FROM {name}"))
                        await conn.execute(f"DROP TABLE {name}")
                        self._known_days.discard((table, day))
                        dropped += 1
                        if table == "scan_events":
                            events += count
                        else:
                            visits += count
            status = await conn.execute(
                f"DELETE FROM scan_events WHERE scanned_at < {_ts('$1')}", cutoff_ms
            )
            events += int(status.split()[-1])
            status = await conn.execute(
                f"DELETE FROM visits WHERE source_at < {_ts('$1')}", cutoff_ms
            )
            visits += int(status.split()[-1])
            await conn.execute(
                f"DELETE FROM scan_event_ids WHERE scanned_at < {_ts('$1')}", cutoff_ms
            )
        return PurgeResult(events, visits, dropped)

    # -- admins and audit ------------------------------------------------------------------

    async def add_admin(self, name: str) -> str:
        token = new_admin_token()
        try:
            await self._pool.execute(
                "INSERT INTO admins (name, token_sha256, created_at) VALUES ($1, $2, now())",
                name,
                hash_admin_token(token),
            )
        except asyncpg.UniqueViolationError:
            raise StorageError(f"admin {name!r} already exists") from None
        return token

    async def admin_for_token(self, token: str) -> str | None:
        name = await self._pool.fetchval(
            "SELECT name FROM admins WHERE token_sha256 = $1", hash_admin_token(token)
        )
        return None if name is None else str(name)

    async def audit(self, actor: str, action: str, subject: str, detail: str = "") -> None:
        await self._pool.execute(
            "INSERT INTO audit_log (at, actor, action, subject, detail) "
            "VALUES (now(), $1, $2, $3, $4)",
            actor,
            action,
            subject,
            detail,
        )

    async def audit_entries(self) -> list[AuditEntry]:
        rows = await self._pool.fetch(
            f"SELECT {_MS.format('at')}, actor, action, subject, detail FROM audit_log ORDER BY id"
        )
        return [AuditEntry(*r) for r in rows]

    async def ping(self) -> bool:
        try:
            await self._pool.fetchval("SELECT 1", timeout=2)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            return False
        return True

    async def close(self) -> None:
        await self._pool.close()

    async def drop_everything(self) -> None:
        """For tests on a shared database: remove every table this backend made."""
        async with self._pool.acquire() as conn:
            await conn.execute(
                "DROP TABLE IF EXISTS scan_events, visits, scan_event_ids, admins, audit_log, "
                "schema_migrations CASCADE"
            )
        self._known_days.clear()


def _lock_key(person_id: str) -> int:
    """A stable signed 64-bit advisory lock key for a person (``hash()`` is salted)."""
    digest = hashlib.blake2b(person_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _now_ms() -> int:
    return int(time.time() * 1000)
