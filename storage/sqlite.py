"""SQLite storage: the embedded default, one file in the data dir, WAL mode.

sqlite3 is blocking, so every call runs on one worker thread (one connection, used by one
thread at a time under a lock). Writers from several processes serialise on SQLite's own
write lock (``BEGIN IMMEDIATE`` with a busy timeout); a batch is one transaction with
``synchronous=FULL``, so a committed batch survives a power cut before the flusher acks it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

from . import migrations
from .base import (
    AdminRecord,
    AuditEntry,
    AuditQuery,
    AuditRecord,
    BatchResult,
    PurgeResult,
    Storage,
    VisitChanges,
    earliest_scans,
    hash_admin_token,
    kept_visits_end_ms,
    new_admin_token,
    rederive_changes,
    with_new,
)
from .errors import StorageError, StorageUnavailable, translated_errors
from .models import PairingRules, ScanEvent, Visit
from .registry import sqlite_params

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


class SqliteStorage(Storage):
    kind = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30
            )
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cannot open SQLite database {self.path}: {exc}") from exc
        self._lock = threading.Lock()
        # Another process may hold the file's write lock while WAL mode is set.
        with translated_errors(BACKEND):
            self._db.execute("PRAGMA journal_mode=WAL")
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

    # -- the registry's primitives ----------------------------------------------------------

    async def _registry_fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        statement = sqlite_params(sql)
        if statement.lstrip().upper().startswith("SELECT"):
            return await self._run(lambda db: db.execute(statement, args).fetchall())
        return await self._write(lambda db: db.execute(statement, args).fetchall())

    async def _registry_execute(self, sql: str, *args: Any) -> int:
        statement = sqlite_params(sql)
        return await self._write(lambda db: db.execute(statement, args).rowcount)

    async def _registry_transaction(
        self, statements: Sequence[tuple[str, Sequence[Sequence[Any]]]]
    ) -> None:
        def run(db: sqlite3.Connection) -> None:
            for sql, rows in statements:
                if rows:
                    db.executemany(sqlite_params(sql), rows)

        await self._write(run)

    async def app_event_ids(
        self, app_id: str, person_id: str, venue_id: str, start_ms: int, end_ms: int
    ) -> list[str]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT event_id FROM scan_events WHERE person_id = ? AND scanned_at >= ? "
                "AND scanned_at <= ? AND app_id = ? AND venue_id = ? "
                "ORDER BY scanned_at, event_id",
                (person_id, start_ms, end_ms, app_id, venue_id),
            ).fetchall()
        )
        return [str(r[0]) for r in rows]

    async def apps_of_person(self, person_id: str, start_ms: int, end_ms: int) -> list[str]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT DISTINCT app_id FROM scan_events "
                "WHERE person_id = ? AND scanned_at >= ? AND scanned_at <= ? ORDER BY app_id",
                (person_id, start_ms, end_ms),
            ).fetchall()
        )
        return [str(r[0]) for r in rows]

    # -- reading ---------------------------------------------------------------------------

    async def person_visits(self, person_id: str, start_ms: int, end_ms: int) -> list[Visit]:
        return await self._visits(
            "person_id = ? AND checkout_at >= ? AND checkin_at <= ?", (person_id, start_ms, end_ms)
        )

    async def venue_visits(self, venue_id: str, start_ms: int, end_ms: int) -> list[Visit]:
        return await self._visits(
            "venue_id = ? AND checkin_at <= ? AND checkout_at >= ?", (venue_id, end_ms, start_ms)
        )

    async def scan_counts(self, start_ms: int, end_ms: int) -> list[tuple[str, str, str, int]]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT venue_id, person_id, kind, count(*) FROM scan_events "
                "WHERE scanned_at >= ? AND scanned_at < ? GROUP BY venue_id, person_id, kind",
                (start_ms, end_ms),
            ).fetchall()
        )
        return [(str(v), str(p), str(k), int(n)) for v, p, k, n in rows]

    async def visits_between(self, start_ms: int, end_ms: int) -> list[Visit]:
        return await self._visits("checkin_at < ? AND checkout_at > ?", (end_ms, start_ms))

    async def all_visits(self) -> list[Visit]:
        return await self._visits("1 = 1", ())

    async def _visits(self, where: str, params: tuple[Any, ...]) -> list[Visit]:
        sql = (
            f"SELECT {_VISIT_COLUMNS} FROM visits WHERE {where} "
            "ORDER BY person_id, source_at, venue_id, checkin_at, closed_by"
        )
        rows = await self._run(lambda db: db.execute(sql, params).fetchall())
        return [Visit(*r) for r in rows]

    async def count_events(self) -> int:
        row = await self._run(lambda db: db.execute("SELECT count(*) FROM scan_events").fetchone())
        return int(row[0])

    async def event_identities(self) -> list[tuple[str, str]]:
        rows = await self._run(
            lambda db: db.execute("SELECT app_id, event_id FROM scan_events").fetchall()
        )
        return [(a, e) for a, e in rows]

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

    # -- admins and audit ------------------------------------------------------------------

    async def add_admin(self, name: str) -> str:
        token = new_admin_token()

        def insert(db: sqlite3.Connection) -> int:
            # A revoked name is taken over by the new token; a live one is left alone.
            return db.execute(
                "INSERT INTO admins (name, token_sha256, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET token_sha256 = excluded.token_sha256, "
                "created_at = excluded.created_at, revoked_at = NULL "
                "WHERE admins.revoked_at IS NOT NULL",
                (name, hash_admin_token(token), _now_ms()),
            ).rowcount

        if await self._write(insert) == 0:
            raise StorageError(f"admin {name!r} already exists")
        return token

    async def admin_for_token(self, token: str) -> str | None:
        digest = hash_admin_token(token)
        row = await self._run(
            lambda db: db.execute(
                "SELECT name FROM admins WHERE token_sha256 = ? AND revoked_at IS NULL", (digest,)
            ).fetchone()
        )
        return None if row is None else str(row[0])

    async def admins(self) -> list[AdminRecord]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT name, created_at, revoked_at FROM admins ORDER BY name"
            ).fetchall()
        )
        return [AdminRecord(*r) for r in rows]

    async def revoke_admin(self, name: str) -> bool | None:
        def revoke(db: sqlite3.Connection) -> bool | None:
            changed = db.execute(
                "UPDATE admins SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                (_now_ms(), name),
            ).rowcount
            if changed:
                return True
            known = db.execute("SELECT 1 FROM admins WHERE name = ?", (name,)).fetchone()
            return None if known is None else False

        return await self._write(revoke)

    async def audit(self, actor: str, action: str, subject: str, detail: str = "") -> None:
        await self._write(
            lambda db: db.execute(
                "INSERT INTO audit_log (at, actor, action, subject, detail) VALUES (?, ?, ?, ?, ?)",
                (_now_ms(), actor, action, subject, detail),
            )
        )

    async def audit_entries(self) -> list[AuditEntry]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT at, actor, action, subject, detail FROM audit_log ORDER BY id"
            ).fetchall()
        )
        return [AuditEntry(*r) for r in rows]

    async def read_audit(self, query: AuditQuery) -> list[AuditRecord]:
        sql = (
            "SELECT id, at, actor, action, subject, detail FROM audit_log "
            "WHERE at >= ? AND id > ?"
            + (" AND actor = ?" if query.actor is not None else "")
            + (" AND action = ?" if query.action is not None else "")
            + " ORDER BY id LIMIT ?"
        )
        params: list[object] = [query.since_ms, query.after_id]
        params += [v for v in (query.actor, query.action) if v is not None]
        rows = await self._run(lambda db: db.execute(sql, (*params, query.limit)).fetchall())
        return [AuditRecord(*r) for r in rows]

    async def purge_audit(self, cutoff_ms: int) -> int:
        return await self._write(
            lambda db: db.execute("DELETE FROM audit_log WHERE at < ?", (cutoff_ms,)).rowcount
        )

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
