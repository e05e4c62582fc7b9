"""SQLite storage: the embedded default, one file in the data dir, WAL mode.

sqlite3 is blocking, so every call runs on one worker thread (one connection, used by one
thread at a time under a lock). Writers from several processes serialise on SQLite's own
write lock (``BEGIN IMMEDIATE`` with a busy timeout); a batch is one transaction with
``synchronous=FULL``, so a committed batch survives a power cut before the flusher acks it.

Here: the connection and the primitives that run the SQL both backends share
(``storage.sql``), where sqlite3's errors become ``storage.errors``; storing batches;
retention. The reads, the registry, the outbox and the audit log are the shared SQL of
their own modules.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

from . import migrations
from .base import Storage
from .errors import StorageError, StorageUnavailable, translated_errors
from .events import (
    BatchResult,
    PurgeResult,
    VisitChanges,
    earliest_scans,
    kept_visits_end_ms,
    rederive_changes,
    with_new,
)
from .models import PairingRules, ScanEvent, Visit
from .sql import sqlite_params

T = TypeVar("T")
BACKEND: Final = "SQLite"
BUSY_TIMEOUT_MS: Final = 30_000
_EVENT_COLUMNS: Final = (
    "app_id, event_id, kind, venue_id, person_id, scanned_at, received_at, device_id"
)
_VISIT_COLUMNS: Final = "person_id, venue_id, checkin_at, checkout_at, closed_by, source_at"
_EVENT_COLUMNS_OF_S: Final = ", ".join(f"s.{c.strip()}" for c in _EVENT_COLUMNS.split(","))
_VISIT_COLUMNS_OF_V: Final = ", ".join(f"v.{c.strip()}" for c in _VISIT_COLUMNS.split(","))
# Rows per lookup statement, at two bound values a row: under the 999 variables that
# SQLite before 3.32 allows a statement.
CHUNK_ROWS: Final = 400


def _enter_wal_mode(db: sqlite3.Connection) -> None:
    """Switch a new database file to WAL mode, waiting out the other processes that open it
    at the same moment (a server's workers all start at once).

    Switching needs the file's exclusive lock, and SQLite answers "database is locked" at
    once, without calling the busy handler, when a connection that already reads the
    file would have to wait for it (waiting could deadlock). So the wait is here, bounded
    by the busy timeout. Once the file is in WAL mode the pragma needs no such lock.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            # By result code, as storage.errors reads them (the low byte is the primary).
            busy = exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


class SqliteStorage(Storage):
    kind = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # The file holds personal data: made readable by its owner only. SQLite gives
            # its -wal and -shm files the database file's mode.
            os.close(os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30
            )
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cannot open SQLite database {self.path}: {exc}") from exc
        self._lock = threading.Lock()
        with translated_errors(BACKEND):
            _enter_wal_mode(self._db)
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            # 64 MiB of page cache rather than the default 2 MiB: a batch touches the person
            # and venue indexes at random places, and re-reading those pages from the OS on
            # every batch cost a fifth of the SQLite flush rate at 100,000 stored events.
            self._db.execute("PRAGMA cache_size=-65536")

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the connection, on the worker thread: every call of this backend
        comes through here, so this is where a locked or unreadable database becomes
        ``StorageUnavailable``."""

        def locked() -> T:
            with self._lock:
                return fn(self._db)

        with translated_errors(BACKEND):
            return await asyncio.to_thread(locked)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one write transaction."""

        def transaction(db: sqlite3.Connection) -> T:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

        return await self._run(transaction)

    # -- schema ----------------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        return await self._write(migrations.apply_sqlite)

    # -- batches ---------------------------------------------------------------------------

    async def store_batch(self, events: Sequence[ScanEvent], rules: PairingRules) -> BatchResult:
        return await self._write(lambda db: self._store(db, events, rules))

    def _store(
        self, db: sqlite3.Connection, events: Sequence[ScanEvent], rules: PairingRules
    ) -> BatchResult:
        stored_at = _now_ms()
        # One event per identity: the first occurrence, as the unique key would keep it.
        first: dict[tuple[str, str], ScanEvent] = {}
        for e in events:
            first.setdefault((e.app_id, e.event_id), e)
        # Under BEGIN IMMEDIATE no other connection writes, so what is stored now stays so
        # until the commit: one lookup per chunk tells new identities from stored ones, and
        # the new ones go in with one executemany instead of a statement per event.
        stored = _stored_identities(db, list(first))
        new = [e for identity, e in first.items() if identity not in stored]
        boundary = db.execute("SELECT purged_before FROM retention_boundary").fetchone()
        earliest = earliest_scans(new, None if boundary is None else boundary[0])
        # Read before inserting: the batch's own events are in hand already.
        tails = _events_since(db, earliest)
        visits = _visits_near(db, earliest, rules)
        db.executemany(
            f"INSERT INTO scan_events ({_EVENT_COLUMNS}, stored_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(*e, stored_at) for e in new],
        )
        if earliest:
            _write_visits(
                db, rederive_changes(earliest, with_new(tails, new, earliest), visits, rules)
            )
        return BatchResult(len(new), len(events) - len(new), len(earliest))

    # -- the primitives of the SQL both backends share (storage.sql) -----------------------

    async def _fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        statement = sqlite_params(sql)
        if statement.lstrip().upper().startswith("SELECT"):
            return await self._run(lambda db: db.execute(statement, args).fetchall())
        return await self._write(lambda db: db.execute(statement, args).fetchall())

    async def _execute(self, sql: str, *args: Any) -> int:
        statement = sqlite_params(sql)
        return await self._write(lambda db: db.execute(statement, args).rowcount)

    async def _execute_in_transaction(
        self, statements: Sequence[tuple[str, Sequence[Sequence[Any]]]]
    ) -> None:
        def run(db: sqlite3.Connection) -> None:
            for sql, rows in statements:
                if rows:
                    db.executemany(sqlite_params(sql), rows)

        await self._write(run)

    # Times are epoch milliseconds in every table here.

    def _epoch_ms(self, column: str) -> str:
        return column

    def _time(self, param: str) -> str:
        return param

    def _now(self) -> str:
        # SQLite's clock, read once per statement, in whole milliseconds (its resolution).
        return "CAST(round((julianday('now') - 2440587.5) * 86400000) AS INTEGER)"

    # -- retention -------------------------------------------------------------------------

    async def purge(self, cutoff_ms: int, rules: PairingRules) -> PurgeResult:
        def delete(db: sqlite3.Connection) -> PurgeResult:
            events = db.execute("DELETE FROM scan_events WHERE scanned_at < ?", (cutoff_ms,))
            visits = db.execute(
                "DELETE FROM visits WHERE source_at < ? AND checkout_at < ?",
                (cutoff_ms, kept_visits_end_ms(cutoff_ms, rules)),
            )
            db.execute(
                "INSERT INTO retention_boundary (id, purged_before) VALUES (1, ?) "
                "ON CONFLICT (id) DO UPDATE "
                "SET purged_before = max(purged_before, excluded.purged_before)",
                (cutoff_ms,),
            )
            return PurgeResult(events.rowcount, visits.rowcount, 0)

        return await self._write(delete)

    async def ping(self) -> bool:
        try:
            await self._run(lambda db: db.execute("SELECT 1").fetchone())
        except (StorageUnavailable, sqlite3.Error):
            return False
        return True

    async def close(self) -> None:
        await self._run(lambda db: db.close())


def _write_visits(db: sqlite3.Connection, changes: VisitChanges[int]) -> None:
    """Only the visits that changed are written: most re-derived visits are the same as the
    stored ones, and every row rewritten dirties pages of four B-trees (the table and three
    indexes) that the commit must write to the WAL; a visit whose end moved is updated in
    place, which touches the table's page only."""
    db.executemany("DELETE FROM visits WHERE rowid = ?", [(rowid,) for rowid in changes.deleted])
    db.executemany(
        "UPDATE visits SET checkout_at = ?, closed_by = ? WHERE rowid = ?",
        [(v.checkout_at_ms, v.closed_by, rowid) for rowid, v in changes.updated],
    )
    db.executemany(
        f"INSERT INTO visits ({_VISIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", changes.inserted
    )


def _stored_identities(
    db: sqlite3.Connection, identities: Sequence[tuple[str, str]]
) -> set[tuple[str, str]]:
    """Which of ``identities`` are already stored."""
    found: set[tuple[str, str]] = set()
    for chunk in _chunks(identities):
        rows = db.execute(
            f"WITH d(a, e) AS (VALUES {_placeholders(len(chunk), 2)}) "
            "SELECT s.app_id, s.event_id FROM d CROSS JOIN scan_events s "
            "ON s.app_id = d.a AND s.event_id = d.e",
            [v for identity in chunk for v in identity],
        )
        found.update(rows)
    return found


def _events_since(db: sqlite3.Connection, sinces: dict[str, int]) -> dict[str, list[ScanEvent]]:
    """Each person's stored events scanned at or after their own ``since``, by scan time."""
    by_person: dict[str, list[ScanEvent]] = {p: [] for p in sinces}
    for chunk in _chunks(list(sinces.items())):
        # CROSS JOIN keeps the persons as the outer loop: one index range per person.
        rows = db.execute(
            f"WITH d(p, since) AS (VALUES {_placeholders(len(chunk), 2)}) "
            f"SELECT {_EVENT_COLUMNS_OF_S} FROM d CROSS JOIN scan_events s "
            "ON s.person_id = d.p AND s.scanned_at >= d.since "
            "ORDER BY s.person_id, s.scanned_at",
            [v for item in chunk for v in item],
        )
        for row in rows:
            by_person[row[4]].append(ScanEvent._make(row))
    return by_person


def _visits_near(
    db: sqlite3.Connection, earliest: dict[str, int], rules: PairingRules
) -> dict[str, list[tuple[int, Visit]]]:
    """(rowid, visit) of each person's stored visits that ``rederive_changes`` needs for
    their earliest new scan time ``t``: produced since ``t - reach`` and ending no earlier
    than the repeat window before ``t`` (those that end earlier carry no state across it)."""
    by_person: dict[str, list[tuple[int, Visit]]] = {}
    rows_of = [(p, t - rules.reach_ms, t - rules.repeat_window_ms) for p, t in earliest.items()]
    for chunk in _chunks(rows_of, CHUNK_ROWS * 2 // 3):
        rows = db.execute(
            f"WITH d(p, since, e) AS (VALUES {_placeholders(len(chunk), 3)}) "
            f"SELECT v.rowid, {_VISIT_COLUMNS_OF_V} FROM d CROSS JOIN visits v "
            "ON v.person_id = d.p AND v.source_at >= d.since AND v.checkout_at >= d.e",
            [v for item in chunk for v in item],
        )
        for row in rows:
            by_person.setdefault(row[1], []).append((row[0], Visit._make(row[1:])))
    return by_person


def _chunks(items: Sequence[T], size: int = CHUNK_ROWS) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _placeholders(rows: int, columns: int) -> str:
    one = "(" + ", ".join("?" * columns) + ")"
    return ", ".join([one] * rows)


def _now_ms() -> int:
    return int(time.time() * 1000)
