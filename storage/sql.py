"""SQL written once for both backends: the primitives a backend supplies to run it, and
the few places where the two dialects differ.

Each concern of storage (events and visits, the registry, the outbox, the audit log)
keeps its SQL next to its interface, written with PostgreSQL's ``$1`` parameters, which
SQLite reads as numbered ``?1`` parameters after one substitution (``sqlite_params``).
It runs through three primitives (``_fetch``, ``_execute``, ``_execute_in_transaction``),
which are also where each backend turns its driver's errors into ``storage.errors``.

Times: the registry's and the outbox's tables keep epoch milliseconds on both backends;
the events, visits, admins and audit log keep them as epoch milliseconds on SQLite but as
``timestamptz`` on PostgreSQL (see ``storage.migrations``), so SQL on those columns goes
through ``_epoch_ms``, ``_time`` and ``_now``.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Sequence
from typing import Any, Final

_PARAM: Final = re.compile(r"\$(\d+)")


def sqlite_params(sql: str) -> str:
    """``$1`` -> ``?1``: SQL written for both backends as SQLite's numbered parameters."""
    return _PARAM.sub(r"?\1", sql)


class SharedSql(abc.ABC):
    """What a backend supplies for the SQL that both backends share."""

    @abc.abstractmethod
    async def _fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows of one statement (which may write: ``INSERT ... RETURNING``)."""

    @abc.abstractmethod
    async def _execute(self, sql: str, *args: Any) -> int:
        """Run one writing statement; the number of rows it changed."""

    @abc.abstractmethod
    async def _execute_in_transaction(
        self, statements: Sequence[tuple[str, Sequence[Sequence[Any]]]]
    ) -> None:
        """Run each statement once per row of its parameters, all in one transaction."""

    @abc.abstractmethod
    def _epoch_ms(self, column: str) -> str:
        """SQL for a time column (events, visits, admins, audit) as epoch milliseconds."""

    @abc.abstractmethod
    def _time(self, param: str) -> str:
        """SQL for a parameter of epoch milliseconds as such a column's value."""

    @abc.abstractmethod
    def _now(self) -> str:
        """SQL for the current time as such a column's value."""
