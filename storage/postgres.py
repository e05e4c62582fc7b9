"""PostgreSQL storage through asyncpg, tables partitioned by day.

Here: the pool and the primitives that run the SQL both backends share (``storage.sql``),
where asyncpg's errors become ``storage.errors``; migrating and day partitions; storing
batches; retention. The reads, the registry, the outbox and the audit log are the shared
SQL of their own modules.

Days are days in the configured time zone (``SCANGATE_TIMEZONE``): a UTC day would cut
Vietnam's morning rush in two, and retention drops whole days. Partitions are created as
days come (a cache of known ones avoids asking each batch), under an advisory lock so
concurrent flushers do not race on the DDL.

A batch of 1,000 events or more is four transactions, one per quarter of the person lock
stripes; a smaller one is one. Each copies its events into a staging table, inserts their
identities into ``scan_event_ids`` (the unique key; ``ON CONFLICT DO NOTHING`` tells new
from already stored), locks the persons with new events (advisory transaction locks on
stripes of persons, in a sorted order so two flushers never deadlock), reads what pairing
resumes from, inserts the new events and writes the visits that change. Times cross the
wire as epoch milliseconds and are converted in SQL, which saves building a datetime per
value in Python.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, Final, NamedTuple
from zoneinfo import ZoneInfo

import asyncpg

from . import migrations
from .base import Storage
from .errors import StorageError, StorageUnavailable, is_unavailable, translated_errors
from .events import (
    BatchResult,
    PurgeResult,
    VisitChanges,
    earliest_scans,
    kept_visits_end_ms,
    rederive_changes,
    with_new,
)
from .models import FUTURE_SCAN_LIMIT_MS, PairingRules, ScanEvent, Visit

BACKEND: Final = "PostgreSQL"
PARTITION_LOCK: Final = 0x5C4A_0002
POOL_MAX: Final = 8
COMMAND_TIMEOUT_S: Final = 60.0
ACQUIRE_TIMEOUT_S: Final = 10.0
# Persons are locked by stripe (the two-key advisory locks of class PERSON_LOCKS), not one
# by one: a batch of 2,000 persons would otherwise take 2,000 locks, and a few flushers
# exhaust PostgreSQL's shared lock table (max_locks_per_transaction x max_connections,
# 6,400 by default: "out of shared memory"). Locking a stripe locks all its persons, so it
# is still correct; two big batches share some person anyway, so little concurrency is lost.
PERSON_LOCKS: Final = 0x5C4A_0003
PERSON_LOCK_STRIPES: Final = 1024
# A batch commits in this many transactions, each holding the locks of one range of
# stripes (see store_batch).
STRIPE_GROUPS: Final = 4
SPLIT_BATCH_FROM: Final = 1000  # events; smaller batches commit at once

_MS: Final = "(extract(epoch from {}) * 1000)::bigint"
_EVENT_SELECT: Final = (
    "SELECT e.app_id, e.event_id, e.kind, e.venue_id, e.person_id, "
    + _MS.format("e.scanned_at")
    + " AS s, "
    + _MS.format("e.received_at")
    + " AS r, e.device_id FROM scan_events e"
)
# A visit with its row's address: (partition, ctid), then the visit's columns.
_VISIT_ROW_SELECT: Final = (
    "SELECT v.tableoid::regclass::text AS part, v.ctid, v.person_id, v.venue_id, "
    + ", ".join(_MS.format(f"v.{c}") + f" AS {c}" for c in ("checkin_at", "checkout_at"))
    + ", v.closed_by, "
    + _MS.format("v.source_at")
    + " AS source_at FROM visits v"
)


# A batch's staging tables: this session's own, emptied at every commit (and rollback).
# Made on first use rather than when a connection opens, since a pool on a read-only
# replica (tracing) may not create tables.
_STAGING: Final = """
CREATE TEMP TABLE IF NOT EXISTS batch_events (
    app_id text, event_id text, kind text, venue_id text, person_id text,
    scanned_at bigint, received_at bigint, device_id text
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS batch_visits (
    person_id text, venue_id text, checkin_at bigint, checkout_at bigint, closed_by text,
    source_at bigint
) ON COMMIT DELETE ROWS
"""


def _ts(param: str) -> str:
    """SQL for a bigint[] parameter of epoch ms as timestamptz values."""
    return f"to_timestamp({param}::float8 / 1000)"


class PostgresStorage(Storage):
    kind = "postgresql"
    _claim_lock = " FOR UPDATE SKIP LOCKED"  # see Outbox.claim_notices

    def __init__(self, pool: asyncpg.Pool, timezone: str) -> None:
        self._pool = pool
        self._tz = ZoneInfo(timezone)
        self._known_days: set[tuple[str, dt.date]] = set()
        self._first_group = random.randrange(STRIPE_GROUPS)

    @classmethod
    async def connect(
        cls, url: str, *, timezone: str, search_path: str | None = None
    ) -> PostgresStorage:
        """A pool on ``url``; ``search_path`` puts the tables in another schema (tests)."""
        # No JIT: the batch statements join an unnest() whose row estimate the planner
        # cannot know, their estimated cost crosses jit_above_cost, and compiling then
        # costs more (tens of ms per statement) than the index lookups it would speed up.
        settings = {"jit": "off"}
        if search_path:
            settings["search_path"] = search_path
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=1,
                max_size=POOL_MAX,
                timeout=10,
                # No statement waits forever on a server that went away mid-answer.
                command_timeout=COMMAND_TIMEOUT_S,
                server_settings=settings,
            )
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            error = StorageUnavailable if is_unavailable(exc) else StorageError
            raise error(f"cannot connect to PostgreSQL: {exc}") from exc
        return cls(pool, timezone)

    # -- reaching the server: every call of this backend comes through _transaction, _fetch
    # or _execute (the primitives of storage.sql), so they are where a lost connection, a
    # timeout or a server shutting down become StorageUnavailable.

    @contextlib.asynccontextmanager
    async def _transaction(
        self, acquire_timeout_s: float | None = None
    ) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection (waited for up to ``acquire_timeout_s``) in a transaction."""
        with translated_errors(BACKEND):
            async with (
                self._pool.acquire(timeout=acquire_timeout_s) as conn,
                conn.transaction(),
            ):
                yield conn

    async def _fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with translated_errors(BACKEND):
            return [tuple(r) for r in await self._pool.fetch(sql, *args)]

    async def _execute(self, sql: str, *args: Any) -> int:
        with translated_errors(BACKEND):
            status = await self._pool.execute(sql, *args)
        return int(status.split()[-1])  # "UPDATE 1", "INSERT 0 1"

    async def _execute_in_transaction(
        self, statements: Sequence[tuple[str, Sequence[Sequence[Any]]]]
    ) -> None:
        async with self._transaction() as conn:
            for sql, rows in statements:
                if rows:
                    await conn.executemany(sql, rows)

    # Events, visits, admins and the audit log keep timestamptz here (see storage.sql).

    def _epoch_ms(self, column: str) -> str:
        return _MS.format(column)

    def _time(self, param: str) -> str:
        return _ts(param)

    def _now(self) -> str:
        return "now()"

    # -- schema ----------------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        async with self._transaction() as conn:
            applied = await migrations.apply_postgres(conn)
        # Today and the next days exist before their first scan arrives; the flusher
        # keeps a week ahead from then on.
        await self.prepare_days(2)
        return applied

    async def prepare_days(self, days_ahead: int) -> None:
        today = dt.datetime.now(self._tz).date()
        await self.ensure_days([today + dt.timedelta(days=i) for i in range(days_ahead + 1)])

    def day_of(self, ms: int) -> dt.date:
        return dt.datetime.fromtimestamp(ms / 1000, self._tz).date()

    def _day_start(self, day: dt.date) -> dt.datetime:
        return dt.datetime(day.year, day.month, day.day, tzinfo=self._tz)

    async def ensure_days(self, days: Sequence[dt.date]) -> None:
        """Create the day partitions of every partitioned table that do not exist yet."""
        missing = [
            (table, options, day)
            for table, _column, options in migrations.POSTGRES_DAY_PARTITIONED
            for day in sorted(set(days))
            if (table, day) not in self._known_days
        ]
        if not missing:
            return
        async with self._transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", PARTITION_LOCK)
            for table, options, day in missing:
                name = f"{table}_p{day:%Y%m%d}"
                start = self._day_start(day)
                end = self._day_start(day + dt.timedelta(days=1))
                # Identifiers come from our own constants and a date, never from input.
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} "
                    f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
                    f"{options}"
                )
        self._known_days.update((table, day) for table, _c, day in missing)

    # -- batches ---------------------------------------------------------------------------

    async def store_batch(self, events: Sequence[ScanEvent], rules: PairingRules) -> BatchResult:
        if not events:
            return BatchResult(0, 0, 0)
        # Visits are partitioned by their source event's time: a late event's visits may
        # land on any day back to its own. (A day is a monotonic function of the time, so
        # the earliest and latest scans give the span without a date per event.)
        scanned = [e.scanned_at_ms for e in events]
        lo_day, hi_day = self.day_of(min(scanned)), self.day_of(max(scanned))
        span = [lo_day + dt.timedelta(days=i) for i in range((hi_day - lo_day).days + 2)]
        await self.ensure_days(span)
        # One event per identity: the first occurrence, as the unique key would keep it.
        first: dict[tuple[str, str], ScanEvent] = {}
        for e in events:
            first.setdefault((e.app_id, e.event_id), e)
        # One transaction per group of person stripes, each group's events with their
        # persons' visits: two flushers then wait for each other only on the group both
        # are in at that moment, not for a whole batch (a batch of thousands of persons
        # holds nearly every stripe). Each flusher starts at its own group.
        # A small batch is one transaction: its few persons seldom meet another flusher's,
        # and each transaction costs a commit and a few round trips whatever its size.
        n = STRIPE_GROUPS if len(first) >= SPLIT_BATCH_FROM else 1
        groups: list[list[ScanEvent]] = [[] for _ in range(n)]
        stripes = _lock_stripes(e.person_id for e in first.values())
        for e in first.values():
            groups[stripes[e.person_id] * n // PERSON_LOCK_STRIPES].append(e)
        self._first_group = (self._first_group + 1) % n
        order = groups[self._first_group :] + groups[: self._first_group]
        inserted = persons = 0
        try:
            for group in order:
                if group:
                    result = await self._store(group, len(group), stripes, rules)
                    inserted += result.inserted
                    persons += result.persons
        except StorageUnavailable as exc:
            if isinstance(exc.__cause__, _CONNECTION_LOST):
                # The server went away under us (asyncpg can then keep a connection whose
                # protocol state is confused, MagicStack/asyncpg#784): replace every pooled
                # connection rather than trust one of them again.
                await self._pool.expire_connections()
            raise
        return BatchResult(inserted, len(events) - inserted, persons)

    async def _store(
        self,
        unique: list[ScanEvent],
        received: int,
        stripes: Mapping[str, int],
        rules: PairingRules,
    ) -> BatchResult:
        async with self._transaction(ACQUIRE_TIMEOUT_S) as conn:
            # The batch goes in by binary COPY into a staging table of this session, then by
            # set-based statements from there: far less client work per event than arrays
            # of parameters, and the times stay epoch ms until PostgreSQL converts them.
            await conn.execute(_STAGING)
            await conn.copy_records_to_table("batch_events", records=unique)
            new_ids = await conn.fetch(
                "INSERT INTO scan_event_ids (app_id, event_id, scanned_at) "
                f"SELECT app_id, event_id, {_ts('scanned_at')} FROM batch_events "
                "ON CONFLICT DO NOTHING RETURNING app_id, event_id"
            )
            fresh = {(r[0], r[1]) for r in new_ids}
            new = [e for e in unique if (e.app_id, e.event_id) in fresh]
            earliest: dict[str, int] = {}
            if new:
                if len(new) < len(unique):  # redelivered events: keep only the new ones
                    stale = [e for e in unique if (e.app_id, e.event_id) not in fresh]
                    await conn.execute(
                        "DELETE FROM batch_events b USING unnest($1::text[], $2::text[]) "
                        "AS d(a, e) WHERE b.app_id = d.a AND b.event_id = d.e",
                        [e.app_id for e in stale],
                        [e.event_id for e in stale],
                    )
                boundary = await conn.fetchval("SELECT purged_before FROM retention_boundary")
                earliest = earliest_scans(new, boundary)
                # The persons are locked before what is stored of them is read: under READ
                # COMMITTED, whoever takes a person's lock last sees every event and visit
                # that the holders before it committed, so its re-derivation is complete.
                await conn.execute(
                    "SELECT pg_advisory_xact_lock($1, k) FROM unnest($2::int[]) AS k ORDER BY k",
                    PERSON_LOCKS,
                    sorted({stripes[p] for p in earliest}),
                )
                # Read before inserting: the batch's own events are in hand already.
                received_ms = max(max(e.received_at_ms for e in new), int(time.time() * 1000))
                until = received_ms + FUTURE_SCAN_LIMIT_MS
                events, stored = await self._tails(conn, earliest, until, rules)
                await conn.execute(
                    "INSERT INTO scan_events (app_id, event_id, kind, venue_id, person_id, "
                    "scanned_at, received_at, device_id, stored_at) "
                    f"SELECT app_id, event_id, kind, venue_id, person_id, {_ts('scanned_at')}, "
                    f"{_ts('received_at')}, device_id, now() FROM batch_events"
                )
                changes = rederive_changes(earliest, with_new(events, new, earliest), stored, rules)
                await self._write_visits(conn, changes)
        return BatchResult(len(new), received - len(new), len(earliest))

    async def _tails(
        self,
        conn: asyncpg.Connection,
        earliest: dict[str, int],
        until_ms: int,
        rules: PairingRules,
    ) -> tuple[dict[str, list[ScanEvent]], dict[str, list[tuple[_RowAddress, Visit]]]]:
        """What ``rederive_changes`` needs of each person from the store: their events
        scanned at or after their earliest new scan ``t``, and their visits near ``t``.

        Nothing stored lies at or after ``until_ms`` (``FUTURE_SCAN_LIMIT_MS``): saying so
        keeps each person's look-up out of the empty partitions made for the days ahead,
        which it would otherwise probe one by one."""
        persons = list(earliest)
        los = [earliest[p] for p in persons]
        # One index range scan per person whatever the statistics say (a plain join was
        # planned as a merge join over the whole person index): OFFSET 0 keeps the planner
        # from flattening the LATERAL subquery back into such a join.
        rows = await conn.fetch(
            f"SELECT x.* FROM unnest($1::text[], $2::bigint[]) AS d(p, since) "
            f"CROSS JOIN LATERAL ({_EVENT_SELECT} WHERE e.person_id = d.p "
            f"AND e.scanned_at >= {_ts('d.since')} AND e.scanned_at < {_ts('$3')} "
            "OFFSET 0) AS x",
            persons,
            los,
            until_ms,
        )
        events: dict[str, list[ScanEvent]] = defaultdict(list)
        for r in rows:
            events[r[4]].append(ScanEvent._make(r))
        stored_rows = await conn.fetch(
            "SELECT x.* FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS d(p, since, e) "
            f"CROSS JOIN LATERAL ({_VISIT_ROW_SELECT} WHERE v.person_id = d.p "
            f"AND v.source_at >= {_ts('d.since')} AND v.source_at < {_ts('$4')} "
            f"AND v.checkout_at >= {_ts('d.e')} OFFSET 0) AS x",
            persons,
            [t - rules.reach_ms for t in los],
            [t - rules.repeat_window_ms for t in los],
            until_ms,
        )
        stored: dict[str, list[tuple[_RowAddress, Visit]]] = defaultdict(list)
        for r in stored_rows:
            stored[r[2]].append((_RowAddress(r[0], r[1], r[2], r[7]), Visit._make(r[2:])))
        return events, stored

    async def _write_visits(
        self, conn: asyncpg.Connection, changes: VisitChanges[_RowAddress]
    ) -> None:
        # A row is found through the person index (person, source time) and then picked by
        # its ctid, in the partition it lives in: the persons are locked, so no other
        # transaction moves it before the commit. (A join on ctid alone is planned as a
        # scan of the whole partition.) Partition names come from the catalog, never from
        # input.
        deleted: dict[str, list[_RowAddress]] = defaultdict(list)
        for address in changes.deleted:
            deleted[address.partition].append(address)
        for partition, addresses in deleted.items():
            await conn.execute(
                f"DELETE FROM {partition} AS v "
                "USING unnest($1::text[], $2::bigint[], $3::tid[]) AS d(p, s, t) "
                f"WHERE v.person_id = d.p AND v.source_at = {_ts('d.s')} AND v.ctid = d.t",
                [a.person_id for a in addresses],
                [a.source_at_ms for a in addresses],
                [a.ctid for a in addresses],
            )
        updated: dict[str, list[tuple[_RowAddress, Visit]]] = defaultdict(list)
        for address, visit in changes.updated:
            updated[address.partition].append((address, visit))
        for partition, rows_ in updated.items():
            await conn.execute(
                f"UPDATE {partition} AS v SET checkout_at = {_ts('d.o')}, closed_by = d.c "
                "FROM unnest($1::text[], $2::bigint[], $3::tid[], $4::bigint[], $5::text[]) "
                f"AS d(p, s, t, o, c) "
                f"WHERE v.person_id = d.p AND v.source_at = {_ts('d.s')} AND v.ctid = d.t",
                [a.person_id for a, _v in rows_],
                [a.source_at_ms for a, _v in rows_],
                [a.ctid for a, _v in rows_],
                [v.checkout_at_ms for _a, v in rows_],
                [v.closed_by for _a, v in rows_],
            )
        if changes.inserted:
            await conn.copy_records_to_table("batch_visits", records=changes.inserted)
            await conn.execute(
                "INSERT INTO visits (person_id, venue_id, checkin_at, checkout_at, closed_by, "
                f"source_at) SELECT person_id, venue_id, {_ts('checkin_at')}, "
                f"{_ts('checkout_at')}, closed_by, {_ts('source_at')} FROM batch_visits"
            )

    async def _estimated_rows(self, tables: Sequence[str]) -> list[int] | None:
        # reltuples is -1 for a partition never vacuumed or analyzed: counted as 0, so a
        # young table is counted exactly (EXACT_COUNT_BELOW).
        rows = await self._fetch(
            "SELECT p.relname, coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint "
            "FROM pg_class p JOIN pg_inherits i ON i.inhparent = p.oid "
            "JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE p.relname = ANY($1::text[]) AND pg_table_is_visible(p.oid) GROUP BY p.relname",
            list(tables),
        )
        found = {str(r[0]): int(r[1]) for r in rows}
        return [found.get(t, 0) for t in tables]

    # -- retention -------------------------------------------------------------------------

    async def purge(self, cutoff_ms: int, rules: PairingRules) -> PurgeResult:
        """Drop the day partitions wholly before the cutoff (for visits, those whose every
        visit ended before ``kept_visits_end_ms``), then delete what remains before it."""
        keep_end_ms = kept_visits_end_ms(cutoff_ms, rules)
        # A visit ends at most the horizon after its source: a day partition of visits holds
        # none that retention keeps once the horizon after the day's end is before that.
        drop_before = {
            "scan_events": self.day_of(cutoff_ms),
            "visits": self.day_of(keep_end_ms - rules.horizon_ms),
        }
        dropped = events = visits = 0
        async with self._transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", PARTITION_LOCK)
            for table, _column, _options in migrations.POSTGRES_DAY_PARTITIONED:
                children = await conn.fetch(
                    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                    "WHERE i.inhparent = $1::regclass",
                    table,
                )
                for (name,) in children:
                    day = dt.datetime.strptime(name.rsplit("_p", 1)[1], "%Y%m%d").date()
                    # The whole day must lie before the cutoff: a day ends where the next begins.
                    if day + dt.timedelta(days=1) <= drop_before[table]:
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
                f"DELETE FROM visits WHERE source_at < {_ts('$1')} AND checkout_at < {_ts('$2')}",
                cutoff_ms,
                keep_end_ms,
            )
            visits += int(status.split()[-1])
            await conn.execute(
                f"DELETE FROM scan_event_ids WHERE scanned_at < {_ts('$1')}", cutoff_ms
            )
            await conn.execute(
                "INSERT INTO retention_boundary (id, purged_before) VALUES (1, $1) "
                "ON CONFLICT (id) DO UPDATE "
                "SET purged_before = greatest(retention_boundary.purged_before, "
                "excluded.purged_before)",
                cutoff_ms,
            )
        return PurgeResult(events, visits, dropped)

    async def ping(self) -> bool:
        try:
            await self._pool.fetchval("SELECT 1", timeout=2)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            return False  # a probe: whatever the reason, the answer is "not ready"
        return True

    async def close(self) -> None:
        await self._pool.close()

    async def drop_everything(self) -> None:
        """For tests on a shared database: remove every table this backend made."""
        async with self._transaction() as conn:
            await conn.execute(
                "DROP TABLE IF EXISTS scan_events, visits, scan_event_ids, admins, audit_log, "
                "declarations, person_phones, persons, staff_tokens, venues, data_keys, "
                "keyring_document, retention_boundary, app_token_use, "
                "schema_migrations CASCADE"
            )
        self._known_days.clear()


# What a lost connection raises, unlike a timeout or a server that refuses new work.
_CONNECTION_LOST: Final = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
)


class _RowAddress(NamedTuple):
    """Where a stored visit's row is: its partition and ctid, with the person and source
    time that lead to it through the person index."""

    partition: str
    ctid: Any  # asyncpg's (block, offset) for tid
    person_id: str
    source_at_ms: int


def _lock_stripe(person_id: str) -> int:
    """A person's lock stripe, stable across processes (``hash()`` is salted). Every
    flusher must compute the same one, old and new alike during an upgrade: never change
    it without stopping them all."""
    digest = hashlib.blake2b(person_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % PERSON_LOCK_STRIPES


def _lock_stripes(person_ids: Iterable[str]) -> dict[str, int]:
    """Each person's lock stripe, hashed once per person (a batch holds each person's
    events several times over)."""
    return {p: _lock_stripe(p) for p in set(person_ids)}
