"""The storage interface: ``Storage``, composed of one part per concern, each in its own
module next to the SQL it shares between the backends.

- ``storage.events``: scan events and visits (storing batches, re-deriving visits, reads,
  retention);
- ``storage.registry``: venues, door staff, people, declarations, the data key;
- ``storage.outbox``: confirmed cases and the notices' outbox;
- ``storage.audit``: admins and the audit log.

Here is what belongs to no single concern: opening and closing, migrating, and tracing,
which reads visits and writes the audit log. The backends (``storage.sqlite``,
``storage.postgres``) implement it; ``storage.connect`` picks one.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator

from .audit import AuditLog
from .events import EventStore
from .models import ContactRow, Visit
from .outbox import Outbox
from .registry import Registry
from .tracing import (
    TracePosition,
    TraceQuery,
    candidate_windows,
    case_visits_in_order,
    contacts_of,
)


class Storage(EventStore, Registry, Outbox, AuditLog):
    """What the flusher, tracing, retention and the admin commands need from a backend."""

    kind: str

    @abc.abstractmethod
    async def migrate(self) -> list[int]:
        """Apply pending migrations; the versions applied now."""

    @abc.abstractmethod
    async def ping(self) -> bool: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def trace(
        self, query: TraceQuery, actor: str, read_from: Storage | None = None
    ) -> list[ContactRow]:
        """Contacts of a person (docs/design.md, "Contact tracing"), every row, audit-logged
        here; the visits are read from ``read_from`` when given (a read-only replica)."""
        return [row async for rows in self.trace_stream(query, actor, read_from) for row in rows]

    async def trace_stream(
        self, query: TraceQuery, actor: str, read_from: Storage | None = None
    ) -> AsyncIterator[list[ContactRow]]:
        """Every row of the trace, a unit at a time (for CSV and the CLI, which write as
        they go); audit-logged once, as ``trace`` is."""
        await self._audit_trace(actor, query, None)
        async for _, rows in (read_from or self).trace_units(query):
            yield rows

    async def trace_page(
        self,
        query: TraceQuery,
        actor: str,
        limit: int,
        start: TracePosition | None = None,
        read_from: Storage | None = None,
    ) -> tuple[list[ContactRow], TracePosition | None]:
        """At most ``limit`` rows of the trace from ``start``, and where the next page
        starts (None after the last row); audit-logged like a whole trace."""
        start = start or TracePosition()
        await self._audit_trace(actor, query, start)
        page: list[ContactRow] = []
        units = (read_from or self).trace_units(query, start)
        async for position, rows in units:
            skip = start.offset if position.unit() == start.unit() else 0
            room = limit - len(page)
            if skip + room < len(rows):
                page += rows[skip : skip + room]
                await units.aclose()
                return page, dataclasses.replace(position, offset=skip + room)
            page += rows[skip:]
            if len(page) == limit:
                # Full at the end of a unit: the next page starts at the next unit with rows.
                async for later, more in units:
                    if more:
                        await units.aclose()
                        return page, later
                return page, None
        return page, None

    async def _audit_trace(
        self, actor: str, query: TraceQuery, start: TracePosition | None
    ) -> None:
        detail = (
            f"days={query.days} margin_ms={query.margin_ms} "
            f"min_overlap_ms={query.min_overlap_ms} depth={query.depth}"
        )
        if start is not None and start != TracePosition():
            detail += f" from={start.depth}.{start.via_index}.{start.visit_index}.{start.offset}"
        await self.audit(actor, "trace", query.person_id, detail)

    async def trace_units(
        self, query: TraceQuery, start: TracePosition | None = None
    ) -> AsyncGenerator[tuple[TracePosition, list[ContactRow]], None]:
        """The trace unit by unit, from the unit of ``start`` on: each case visit (depth 1),
        then each visit of each depth-2 person in turn, with its contacts (the whole unit:
        the caller skips ``start.offset`` rows). Not audit-logged: ``trace`` and
        ``trace_page`` are. Between units the event loop runs other work, so a trace of
        hundreds of thousands of rows never holds it for long."""
        start = start or TracePosition()
        case = query.person_id
        persons: set[str] = set()
        for index, visit in enumerate(await self._case_visits(case, query)):
            position = TracePosition(1, 0, index)
            if position.unit() < start.unit() and query.depth == 1:
                continue
            rows = await self._unit(query, visit, 1, None, frozenset({case}))
            persons.update(row.person_id for row in rows)
            if position.unit() >= start.unit():
                yield position, rows
            await asyncio.sleep(0)
        if query.depth == 1:
            return
        for via_index, contact in enumerate(sorted(persons)):
            if (2, via_index) < start.unit()[:2]:
                continue
            for index, visit in enumerate(await self._case_visits(contact, query)):
                position = TracePosition(2, via_index, index)
                if position.unit() < start.unit():
                    continue
                yield (
                    position,
                    await self._unit(query, visit, 2, contact, frozenset({case, contact})),
                )
                await asyncio.sleep(0)

    async def _case_visits(self, person_id: str, query: TraceQuery) -> list[Visit]:
        visits = await self.person_visits(person_id, query.window_start_ms, query.now_ms)
        return case_visits_in_order(visits, query)

    async def _unit(
        self,
        query: TraceQuery,
        visit: Visit,
        depth: int,
        via: str | None,
        exclude: frozenset[str],
    ) -> list[ContactRow]:
        candidates: list[Visit] = []
        for venue_id, start, end in candidate_windows([visit], query):
            candidates += await self.venue_visits(venue_id, start, end)
        return contacts_of([visit], candidates, query, depth, via, exclude)
