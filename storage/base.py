"""The storage interface, what both backends share, and ``connect_storage``.

A backend stores batches of scan events and keeps each touched person's visits equal to
``derive_visits`` of that person's stored events. It re-derives only from the person's
earliest new event on, resuming from the state that the visits just before it record
(``rederive_changes``): a batch reads the persons' events from that instant and their
visits from a few hours before it, never their older history, so its work stays the same
however many events are stored and however densely a person scans. Redelivery,
reordering and concurrent flushers converge on the same rows.
"""

from __future__ import annotations

import abc
import hashlib
import secrets
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Final, Generic, NamedTuple, TypeVar

from .models import ContactRow, PairingRules, ScanEvent, Visit
from .outbox import Outbox
from .pairing import derive_visits, lone_visit, state_before
from .tracing import TraceQuery, candidate_windows, contacts_of, depth2_persons

K = TypeVar("K")
ADMIN_TOKEN_PREFIX: Final = "sgadm_"  # noqa: S105 - a label, not a secret


class BatchResult(NamedTuple):
    inserted: int
    duplicates: int
    persons: int  # persons whose visits were re-derived


class PurgeResult(NamedTuple):
    events: int
    visits: int
    partitions_dropped: int


class AuditEntry(NamedTuple):
    at_ms: int
    actor: str
    action: str
    subject: str
    detail: str


class AuditRecord(NamedTuple):
    """An audit entry as read back, with its id (the order entries were written in)."""

    id: int
    at_ms: int
    actor: str
    action: str
    subject: str
    detail: str


class AuditQuery(NamedTuple):
    """Which audit entries to read: written at or after ``since_ms``, by ``actor`` and of
    ``action`` when given, with an id above ``after_id``; at most ``limit``, by id."""

    since_ms: int
    actor: str | None = None
    action: str | None = None
    after_id: int = 0
    limit: int = 100


class AdminRecord(NamedTuple):
    """An admin as listed: never the token."""

    name: str
    created_at_ms: int
    revoked_at_ms: int | None


def kept_visits_end_ms(cutoff_ms: int, rules: PairingRules) -> int:
    """Retention keeps the visits produced before its cutoff that end at or after this:
    the visit open at the cutoff, and check-outs whose repeat window reaches past it
    (what ``storage.pairing.state_before`` reads). They go at a later purge."""
    return cutoff_ms - rules.repeat_window_ms


def earliest_scans(events: Sequence[ScanEvent], boundary_ms: int | None) -> dict[str, int]:
    """Each person's earliest scan time among the new ``events``, counting only those at
    or after the retention boundary: an event scanned before it is stored (and goes at the
    next purge) but not paired, since the events it would pair with are gone."""
    floor = -(2**63) if boundary_ms is None else boundary_ms
    earliest: dict[str, int] = {}
    for e in events:
        t = e.scanned_at_ms
        if t >= floor and t < earliest.get(e.person_id, t + 1):
            earliest[e.person_id] = t
    return earliest


def hash_admin_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_admin_token() -> str:
    return ADMIN_TOKEN_PREFIX + secrets.token_urlsafe(32)


class VisitChanges(NamedTuple, Generic[K]):
    """How to turn a person's stored visits into re-derived ones, row by row."""

    deleted: list[K]  # keys of rows no re-derived visit matches
    updated: list[tuple[K, Visit]]  # rows that only change their end (checkout_at, closed_by)
    inserted: list[Visit]


def visit_changes(stored: Sequence[tuple[K, Visit]], derived: Sequence[Visit]) -> VisitChanges[K]:
    """The row changes that make the ``stored`` visits (each with its row key) equal to the
    ``derived`` ones, as a multiset.

    Equal visits stay in place, and a visit whose end moved (an ``auto`` end closed by a
    check-out or the next check-in: the usual change) is updated where it is rather than
    deleted and inserted: its indexed columns do not change, so no index is touched.
    """
    if not stored:  # the usual case for a person's first scans of the day
        return VisitChanges([], [], list(derived))
    wanted = Counter(derived)
    leftover: dict[tuple[str, str, int, int], list[K]] = {}
    for key, visit in stored:
        if wanted[visit] > 0:
            wanted[visit] -= 1
        else:
            leftover.setdefault(_visit_start(visit), []).append(key)
    updated: list[tuple[K, Visit]] = []
    inserted: list[Visit] = []
    for visit in derived:
        if wanted[visit] > 0:
            wanted[visit] -= 1
            keys = leftover.get(_visit_start(visit))
            if keys:
                updated.append((keys.pop(), visit))
            else:
                inserted.append(visit)
    deleted = [key for keys in leftover.values() for key in keys]
    return VisitChanges(deleted, updated, inserted)


def _visit_start(visit: Visit) -> tuple[str, str, int, int]:
    """What a visit keeps when its end moves: all the columns the visit indexes hold."""
    return (visit.person_id, visit.venue_id, visit.checkin_at_ms, visit.source_at_ms)


def with_new(
    stored: Mapping[str, list[ScanEvent]], new: Sequence[ScanEvent], earliest: Mapping[str, int]
) -> dict[str, list[ScanEvent]]:
    """Each person's stored events from their earliest new scan on (read before the batch's
    own were inserted), with the batch's new events from then on added."""
    events = {p: list(stored.get(p, ())) for p in earliest}
    for e in new:
        t = earliest.get(e.person_id)
        if t is not None and e.scanned_at_ms >= t:
            events[e.person_id].append(e)
    return events


def rederive_changes(
    earliest: Mapping[str, int],
    events: Mapping[str, Sequence[ScanEvent]],
    stored: Mapping[str, Sequence[tuple[K, Visit]]],
    rules: PairingRules,
) -> VisitChanges[K]:
    """The row changes that bring the visits of every person with new events up to date.

    ``earliest`` is each such person's earliest new scan time ``t``; ``events`` their stored
    events (new ones included) scanned at or after ``t``; ``stored`` their stored visits
    (with row keys) whose source is at or after ``t - rules.reach_ms`` and that end at or
    after ``t - rules.repeat_window_ms`` (an earlier end carries no state across ``t``).
    Visits that started before ``t`` keep what they are, but for the one open just before
    ``t``, whose end the new events may move: pairing resumes from the state those visits
    record (``state_before``), so no older event is read however dense the history.
    """
    affected: list[tuple[K, Visit]] = []
    derived: list[Visit] = []
    # Persons with nothing stored near their new events (most of a rush): their visits are
    # all new rows, with no stored ones to compare them with.
    fresh: list[Visit] = []
    for person_id, t in earliest.items():
        near = stored.get(person_id)
        person_events = events[person_id]
        if not near:
            if len(person_events) == 1:
                fresh.append(lone_visit(person_events[0], rules))
            else:
                fresh += derive_visits(person_events, rules)
            continue
        state = state_before((v for _k, v in near), t)
        derived += derive_visits(person_events, rules, state)
        affected += [(k, v) for k, v in near if v.source_at_ms >= t or v is state.open_visit]
    changes = visit_changes(affected, derived)
    changes.inserted.extend(fresh)
    return changes


class Storage(Outbox, abc.ABC):
    """What the flusher, tracing, retention and the admin commands need from a backend."""

    kind: str

    @abc.abstractmethod
    async def migrate(self) -> list[int]:
        """Apply pending migrations; the versions applied now."""

    @abc.abstractmethod
    async def store_batch(self, events: Sequence[ScanEvent], rules: PairingRules) -> BatchResult:
        """In one transaction: insert the events (ignoring identities already stored) and
        re-derive the visits of every person with a new event."""

    @abc.abstractmethod
    async def person_visits(self, person_id: str, start_ms: int, end_ms: int) -> list[Visit]:
        """A person's visits overlapping [start, end]."""

    @abc.abstractmethod
    async def venue_visits(self, venue_id: str, start_ms: int, end_ms: int) -> list[Visit]:
        """Everyone's visits at a venue overlapping [start, end]."""

    @abc.abstractmethod
    async def scan_counts(self, start_ms: int, end_ms: int) -> list[tuple[str, str, str, int]]:
        """(venue_id, person_id, kind, n): the stored scan events scanned in [start, end),
        counted by venue, person and kind (what daily reports aggregate)."""

    @abc.abstractmethod
    async def visits_between(self, start_ms: int, end_ms: int) -> list[Visit]:
        """Every visit in progress at some instant of [start, end): ``checkin_at < end`` and
        ``checkout_at > start``."""

    @abc.abstractmethod
    async def all_visits(self) -> list[Visit]:
        """Every visit, sorted (for checks and small exports)."""

    @abc.abstractmethod
    async def count_events(self) -> int: ...

    @abc.abstractmethod
    async def event_identities(self) -> list[tuple[str, str]]:
        """Every stored (app id, event id), for exactly-once checks."""

    @abc.abstractmethod
    async def purge(self, cutoff_ms: int, rules: PairingRules) -> PurgeResult:
        """Delete events scanned and visits produced before ``cutoff_ms``, but for the
        visits that still carry pairing's state across it (``kept_visits_end_ms``), and
        record the cutoff as the retention boundary: from then on a batch pairs only its
        events at or after the boundary, resuming from the state those visits record, so
        visits at the boundary stay what they were."""

    @abc.abstractmethod
    async def add_admin(self, name: str) -> str:
        """Register an admin; its token (shown once, stored hashed). A revoked admin's name
        may be added again: it gets a new token (the audit log tells the two apart by
        time). StorageError when the name has a live token."""

    @abc.abstractmethod
    async def admin_for_token(self, token: str) -> str | None:
        """The name of a live (not revoked) admin token, read from storage on every call:
        a revocation holds at once."""

    @abc.abstractmethod
    async def admins(self) -> list[AdminRecord]:
        """Every admin, revoked ones too, by name."""

    @abc.abstractmethod
    async def revoke_admin(self, name: str) -> bool | None:
        """Refuse the admin's token from now on: True when revoked now, False when it was
        already, None when there is no such admin."""

    @abc.abstractmethod
    async def audit(self, actor: str, action: str, subject: str, detail: str = "") -> None: ...

    @abc.abstractmethod
    async def audit_entries(self) -> list[AuditEntry]: ...

    @abc.abstractmethod
    async def read_audit(self, query: AuditQuery) -> list[AuditRecord]:
        """A page of the audit log (``AuditQuery``), oldest first."""

    @abc.abstractmethod
    async def purge_audit(self, cutoff_ms: int) -> int:
        """Delete audit entries written before ``cutoff_ms``; how many."""

    async def prepare_days(self, days_ahead: int) -> None:
        """Make what the next ``days_ahead`` days need before their first scan (PostgreSQL:
        their partitions), so no batch at midnight waits on DDL. Nothing to do by default."""

    @abc.abstractmethod
    async def ping(self) -> bool: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def apps_of_person(self, person_id: str, start_ms: int, end_ms: int) -> list[str]:
        """The apps that posted this person's scans between the two times (inclusive)."""

    @abc.abstractmethod
    async def app_event_ids(
        self, app_id: str, person_id: str, venue_id: str, start_ms: int, end_ms: int
    ) -> list[str]:
        """The ids of the events this app posted for this person at this venue, scanned
        between the two times (inclusive), in scan order: what an exposure notice to the
        app may name, since the app holds them already."""

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
