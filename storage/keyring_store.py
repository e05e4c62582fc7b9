"""The keyring kept in a shared PostgreSQL database, so every host sees one set of apps,
keys and app tokens.

``Keyring`` reads and writes through the synchronous ``KeyringStore`` protocol (the CLI
is synchronous, and a keyring must load before a server starts). This store runs one
asyncpg connection on an event loop of its own thread and waits for each call, bounded
by a timeout. The document is the same sealed JSON as the file's: its keys stay sealed
under the master key in the database too. A change bumps ``version``, which every
gateway polls (off its event loop) every 2 seconds.

Its table, ``keyring_document``, is made by the PostgreSQL migrations (migration 8), and
the store applies pending migrations itself when it opens. The keyring opens before
storage does, or without it: ``scangate serve`` loads it once before any worker connects
storage, ``create_app`` opens it before its storage cleanup context runs, and the CLI's
keyring commands never open storage at all. Migrating here makes the table exist
whichever comes first; the migration lock makes the other one find the work done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, Final, TypeVar

import asyncpg

from signing import FileKeyringStore, KeyringStore

from . import migrations
from .errors import translated_errors

log = logging.getLogger(__name__)
T = TypeVar("T")

KEYRING_LOCK: Final = 0x5C4A_0004
CALL_TIMEOUT_S: Final = 10.0
# Migrating a large database, or waiting for another process that migrates it, can take
# minutes: a call's usual bound would abandon the migration halfway.
MIGRATE_TIMEOUT_S: Final = 600.0


class DatabaseKeyringStore:
    """``KeyringStore`` on a PostgreSQL table of one row."""

    def __init__(self, url: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="keyring-store", daemon=True
        )
        self._thread.start()
        self._lock = threading.Lock()  # one call at a time on the one connection
        try:
            self._conn: asyncpg.Connection = self._call(
                asyncpg.connect(url, timeout=CALL_TIMEOUT_S, server_settings={"jit": "off"})
            )
            self._call(self._migrate(), MIGRATE_TIMEOUT_S)
        except BaseException:
            conn = getattr(self, "_conn", None)
            if conn is not None:
                # Terminated, not closed: a migration that timed out may still run on it,
                # and the server rolls that back when the connection goes.
                self._loop.call_soon_threadsafe(conn.terminate)
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise

    def _call(self, work: Coroutine[Any, Any, T], timeout_s: float = CALL_TIMEOUT_S) -> T:
        """Run ``work`` on the store's loop and wait for it: a lost connection or a timeout
        comes out as ``StorageUnavailable``, as from the rest of storage."""
        with self._lock, translated_errors("PostgreSQL"):
            return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout_s)

    async def _migrate(self) -> None:
        async with self._conn.transaction():
            await migrations.apply_postgres(self._conn)

    def version(self) -> str:
        found = self._call(self._conn.fetchval("SELECT version FROM keyring_document"))
        return "absent" if found is None else str(found)

    def read(self) -> tuple[bytes | None, str]:
        row = self._call(self._conn.fetchrow("SELECT document, version FROM keyring_document"))
        return (None, "absent") if row is None else (bytes(row[0]), str(row[1]))

    def write(self, document: bytes) -> None:
        self._call(
            self._conn.execute(
                "INSERT INTO keyring_document (id, document, version) VALUES (1, $1, 1) "
                "ON CONFLICT (id) DO UPDATE SET document = EXCLUDED.document, "
                "version = keyring_document.version + 1",
                document,
            )
        )

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """A session advisory lock around read-modify-write: CLI runs on several hosts
        serialise their changes."""
        self._call(self._conn.execute("SELECT pg_advisory_lock($1)", KEYRING_LOCK))
        try:
            yield
        finally:
            self._call(self._conn.execute("SELECT pg_advisory_unlock($1)", KEYRING_LOCK))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._conn.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            # Its self-pipe is a socket pair: left open, it leaks two descriptors per store.
            self._loop.close()


def keyring_store(storage_url: str, keyring_path: Path) -> KeyringStore:
    """The keyring's store: the shared database when storage is PostgreSQL (imported once
    from the data dir's file if the database has none yet), else the data dir's file."""
    url = storage_url
    file_store = FileKeyringStore(keyring_path)
    if not url.startswith(("postgresql://", "postgres://")):
        return file_store
    store = DatabaseKeyringStore(url)
    raw, _version = file_store.read()
    if raw is not None and store.version() == "absent":
        with store.exclusive():
            if store.version() == "absent":
                store.write(raw)
                log.warning(
                    "keyring imported from %s into the database; the database's copy is "
                    "the one used from now on",
                    keyring_path,
                )
    return store
