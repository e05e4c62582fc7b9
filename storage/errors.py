"""Storage's errors, and the one place that tells which drivers' errors mean "unavailable".

``StorageError``: storage cannot do what was asked (a bad URL, a name taken); the message
says why. ``StorageUnavailable``, one of them: the server is gone or busy (a lost
connection, a timeout, a database that is locked, starting or shutting down), so the same
call may well work a moment later.

Both backends raise ``StorageUnavailable`` in place of their driver's errors of that kind
(``translated_errors`` around every call that reaches the driver), so no caller needs to
know sqlite3 or asyncpg: the gateway answers it with a 503, the flusher retries. Every
other driver error (a bug, a broken constraint) goes through as it is.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from typing import Final

import asyncpg


class StorageError(Exception):
    """Storage cannot do what was asked (unreachable, bad URL, ...); the message says why."""


class StorageUnavailable(StorageError):
    """The storage server is gone or busy; the same call may work a moment later. The
    driver's own error is the ``__cause__``."""


# SQLite's primary result codes of a database another writer holds, or a file that cannot
# be read or written just now (SQLITE_BUSY: "database is locked"). Their extended codes
# (SQLITE_BUSY_SNAPSHOT, SQLITE_IOERR_*) carry the primary code in the low byte.
_SQLITE_UNAVAILABLE: Final = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)
_POSTGRES_UNAVAILABLE: Final = (
    asyncpg.PostgresConnectionError,  # class 08: the connection failed or was lost
    asyncpg.OperatorInterventionError,  # class 57: shutting down, starting up, cancelled
    asyncpg.TooManyConnectionsError,  # 53300: no connection slot free
    asyncpg.InterfaceError,  # the client's side of a lost connection, a closing pool
    asyncpg.InternalClientError,  # a protocol state confused by a connection lost mid-answer
)


def is_unavailable(exc: BaseException) -> bool:
    """Whether a driver's error means the server is gone or busy."""
    if isinstance(exc, OSError | TimeoutError):  # refused, reset; a command or pool timeout
        return True
    if isinstance(exc, sqlite3.OperationalError):
        return exc.sqlite_errorcode & 0xFF in _SQLITE_UNAVAILABLE
    return isinstance(exc, _POSTGRES_UNAVAILABLE)


@contextlib.contextmanager
def translated_errors(backend: str) -> Iterator[None]:
    """Raise ``StorageUnavailable`` for a driver error that ``is_unavailable``; let every
    other error through. Works around an ``await`` too."""
    try:
        yield
    except Exception as exc:
        if not is_unavailable(exc):
            raise
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise StorageUnavailable(f"{backend} is unavailable ({why})") from exc
