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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

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

T = TypeVar("T")
BUSY_TIMEOUT_MS: Final = 30_000
_EVENT_COLUMNS: Final = (
    "app_id, event_id, kind, venue_id, person_id, scanned_at, received_at, device_id"
)
_VISIT_COLUMNS: Final = "person_id, venue_id, checkin_at, checkout_at, closed_by, source_at"


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
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                return fn(self._db)

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
        def apply(db: sqlite3.Connection) -> list[int]:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)"
            )
            done = {row[0] for row in db.execute("SELECT version FROM schema_migrations")}
            applied = []
            for version, statements in migrations.SQLITE:
                if version in done:
                    continue
                for statement in statements:
                    db.execute(statement)
                db.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, _now_ms()))
                applied.append(version)
            return applied

        return await self._write(apply)

    # -- batches ---------------------------------------------------------------------------

    async def store_batch(self, events: Sequence[ScanEvent], rules: PairingRules) -> BatchResult:
        return await self._write(lambda db: self._store(db, events, rules))

    def _store(
        self, db: sqlite3.Connection, events: Sequence[ScanEvent], rules: PairingRules
    ) -> BatchResult:
        stored_at = _now_ms()
        earliest_new: dict[str, int] = {}
        inserted = 0
        insert = db.cursor()
        for e in events:
            insert.execute(
                f"INSERT OR IGNORE INTO scan_events ({_EVENT_COLUMNS}, stored_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*e, stored_at),
            )
            if insert.rowcount == 1:
                inserted += 1
                p = e.person_id
                earliest_new[p] = min(earliest_new.get(p, e.scanned_at_ms), e.scanned_at_ms)
        for person_id, lo in earliest_new.items():
            self._rederive_person(db, person_id, lo, rules)
        return BatchResult(inserted, len(events) - inserted, len(earliest_new))

    def _rederive_person(
        self, db: sqlite3.Connection, person_id: str, lo: int, rules: PairingRules
    ) -> None:
        lookback = first_lookback_ms(rules)
        while True:
            since = lo - lookback
            rows = db.execute(
                f"SELECT {_EVENT_COLUMNS} FROM scan_events WHERE person_id = ? "
                "AND scanned_at >= ? ORDER BY scanned_at",
                (person_id, since),
            ).fetchall()
            result = rederive([ScanEvent(*r) for r in rows], lo, since, rules)
            if result is not None:
                break
            lookback *= 2
        q, visits = result
        db.execute("DELETE FROM visits WHERE person_id = ? AND source_at >= ?", (person_id, q))
        db.executemany(f"INSERT INTO visits ({_VISIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", visits)

    # -- reading ---------------------------------------------------------------------------

    async def person_visits(self, person_id: str, start_ms: int, end_ms: int) -> list[Visit]:
        return await self._visits(
            "person_id = ? AND checkout_at >= ? AND checkin_at <= ?", (person_id, start_ms, end_ms)
        )

    async def venue_visits(self, venue_id: str, start_ms: int, end_ms: int) -> list[Visit]:
        return await self._visits(
            "venue_id = ? AND checkin_at <= ? AND checkout_at >= ?", (venue_id, end_ms, start_ms)
        )

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

    async def purge(self, cutoff_ms: int) -> PurgeResult:
        def delete(db: sqlite3.Connection) -> PurgeResult:
            events = db.execute("DELETE FROM scan_events WHERE scanned_at < ?", (cutoff_ms,))
            visits = db.execute("DELETE FROM visits WHERE source_at < ?", (cutoff_ms,))
            return PurgeResult(events.rowcount, visits.rowcount, 0)

        return await self._write(delete)

    # -- admins and audit ------------------------------------------------------------------

    async def add_admin(self, name: str) -> str:
        token = new_admin_token()

        def insert(db: sqlite3.Connection) -> None:
            try:
                db.execute(
                    "INSERT INTO admins (name, token_sha256, created_at) VALUES (?, ?, ?)",
                    (name, hash_admin_token(token), _now_ms()),
                )
            except sqlite3.IntegrityError:
                raise StorageError(f"admin {name!r} already exists") from None

        await self._write(insert)
        return token

    async def admin_for_token(self, token: str) -> str | None:
        digest = hash_admin_token(token)
        row = await self._run(
            lambda db: db.execute(
                "SELECT name FROM admins WHERE token_sha256 = ?", (digest,)
            ).fetchone()
        )
        return None if row is None else str(row[0])

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

    async def ping(self) -> bool:
        try:
            await self._run(lambda db: db.execute("SELECT 1").fetchone())
        except sqlite3.Error:
            return False
        return True

    async def close(self) -> None:
        await self._run(lambda db: db.close())


def _now_ms() -> int:
    return int(time.time() * 1000)
