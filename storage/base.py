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

from .audit import AuditLog
from .events import EventStore
from .models import ContactRow, Visit
from .outbox import Outbox
from .registry import Registry
from .tracing import TraceQuery, candidate_windows, contacts_of, depth2_persons


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
        """Contacts of a person (DESIGN.md, "Contact tracing"), audit-logged here; the
        visits are read from ``read_from`` when given (a read-only replica)."""
        reader = read_from or self
        await self.audit(
            actor,
            "trace",
            query.person_id,
            f"days={query.days} margin_ms={query.margin_ms} "
            f"min_overlap_ms={query.min_overlap_ms} depth={query.depth}",
        )
        rows = await reader._contacts(query, query.person_id, 1, None, frozenset({query.person_id}))
        if query.depth == 2:
            for contact in depth2_persons(rows):
                rows += await reader._contacts(
                    query, contact, 2, contact, frozenset({query.person_id, contact})
                )
        return rows

    async def _contacts(
        self,
        query: TraceQuery,
        person_id: str,
        depth: int,
        via: str | None,
        exclude: frozenset[str],
    ) -> list[ContactRow]:
        case_visits = await self.person_visits(person_id, query.window_start_ms, query.now_ms)
        candidates: list[Visit] = []
        for venue_id, start, end in candidate_windows(case_visits, query):
            candidates += await self.venue_visits(venue_id, start, end)
        return contacts_of(case_visits, candidates, query, depth, via, exclude)
