"""Events and visits: what a batch stores, how the visits it touches are re-derived, the
reads of both, and retention.

A backend stores batches of scan events and keeps each touched person's visits equal to
``derive_visits`` of that person's stored events. It re-derives only from the person's
earliest new event on, resuming from the state that the visits just before it record
(``rederive_changes``): a batch reads the persons' events from that instant and their
visits from a few hours before it, never their older history, so its work stays the same
however many events are stored and however densely a person scans. Redelivery,
reordering and concurrent flushers converge on the same rows.

Writing a batch and purging are each backend's own (PostgreSQL copies into staging tables
and drops day partitions; SQLite writes under one lock); the pure steps they share are
here, and so are the reads, written once for both backends (``storage.sql``).
"""

from __future__ import annotations

import abc
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Final, Generic, NamedTuple, TypeVar

from .models import PairingRules, ScanEvent, Visit
from .pairing import derive_visits, lone_visit, state_before
from .sql import SharedSql

K = TypeVar("K")
# The order every list of visits is read in (the visits' own sort order, first by person).
_VISIT_ORDER: Final = "ORDER BY person_id, source_at, venue_id, checkin_at, closed_by"
# Tables estimated to hold at least this many rows are not counted (see stored_counts).
EXACT_COUNT_BELOW: Final = 1_000_000


class BatchResult(NamedTuple):
    inserted: int
    duplicates: int
    persons: int  # persons whose visits were re-derived


class PurgeResult(NamedTuple):
    events: int
    visits: int
    partitions_dropped: int


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


class EventStore(SharedSql):
    """Events and visits, of ``Storage``."""

    @abc.abstractmethod
    async def store_batch(self, events: Sequence[ScanEvent], rules: PairingRules) -> BatchResult:
        """In one transaction: insert the events (ignoring identities already stored) and
        re-derive the visits of every person with a new event."""

    @abc.abstractmethod
    async def purge(self, cutoff_ms: int, rules: PairingRules) -> PurgeResult:
        """Delete events scanned and visits produced before ``cutoff_ms``, but for the
        visits that still carry pairing's state across it (``kept_visits_end_ms``), and
        record the cutoff as the retention boundary: from then on a batch pairs only its
        events at or after the boundary, resuming from the state those visits record, so
        visits at the boundary stay what they were."""

    async def prepare_days(self, days_ahead: int) -> None:
        """Make what the next ``days_ahead`` days need before their first scan (PostgreSQL:
        their partitions), so no batch at midnight waits on DDL. Nothing to do by default."""

    # -- visits ----------------------------------------------------------------------------

    async def person_visits(self, person_id: str, start_ms: int, end_ms: int) -> list[Visit]:
        """A person's visits overlapping [start, end]."""
        return await self._visits(
            f"person_id = $1 AND checkout_at >= {self._time('$2')} "
            f"AND checkin_at <= {self._time('$3')}",
            person_id,
            start_ms,
            end_ms,
        )

    async def venue_visits(self, venue_id: str, start_ms: int, end_ms: int) -> list[Visit]:
        """Everyone's visits at a venue overlapping [start, end]."""
        return await self._visits(
            f"venue_id = $1 AND checkin_at <= {self._time('$3')} "
            f"AND checkout_at >= {self._time('$2')}",
            venue_id,
            start_ms,
            end_ms,
        )

    async def visits_between(self, start_ms: int, end_ms: int) -> list[Visit]:
        """Every visit in progress at some instant of [start, end): ``checkin_at < end`` and
        ``checkout_at > start``."""
        return await self._visits(
            f"checkin_at < {self._time('$2')} AND checkout_at > {self._time('$1')}",
            start_ms,
            end_ms,
        )

    async def all_visits(self) -> list[Visit]:
        """Every visit, sorted (for checks and small exports)."""
        return await self._visits("1 = 1")

    async def _visits(self, where: str, *params: Any) -> list[Visit]:
        ms = self._epoch_ms
        rows = await self._fetch(
            f"SELECT person_id, venue_id, {ms('checkin_at')}, {ms('checkout_at')}, closed_by, "
            f"{ms('source_at')} FROM visits WHERE {where} {_VISIT_ORDER}",
            *params,
        )
        return [Visit(*r) for r in rows]

    # -- events ----------------------------------------------------------------------------

    async def scan_counts(self, start_ms: int, end_ms: int) -> list[tuple[str, str, str, int]]:
        """(venue_id, person_id, kind, n): the stored scan events scanned in [start, end),
        counted by venue, person and kind (what daily reports aggregate)."""
        # The bounds are on scanned_at itself, so only the range's day partitions are read.
        rows = await self._fetch(
            "SELECT venue_id, person_id, kind, count(*) FROM scan_events "
            f"WHERE scanned_at >= {self._time('$1')} AND scanned_at < {self._time('$2')} "
            "GROUP BY venue_id, person_id, kind",
            start_ms,
            end_ms,
        )
        return [(str(r[0]), str(r[1]), str(r[2]), int(r[3])) for r in rows]

    async def person_known(self, person_id: str) -> bool:
        """Whether anything is stored of this person: a declaration, a scan or a visit."""
        for table in ("persons", "scan_events", "visits"):
            if await self._fetch(f"SELECT 1 FROM {table} WHERE person_id = $1 LIMIT 1", person_id):
                return True
        return False

    async def person_events(self, person_id: str) -> list[ScanEvent]:
        """Every stored scan event of a person, in scan order (what ``scangate visits``
        shows; retention keeps it to a few weeks)."""
        ms = self._epoch_ms
        rows = await self._fetch(
            f"SELECT app_id, event_id, kind, venue_id, person_id, {ms('scanned_at')}, "
            f"{ms('received_at')}, device_id FROM scan_events WHERE person_id = $1 "
            "ORDER BY scanned_at, app_id, event_id",
            person_id,
        )
        return [ScanEvent(*r) for r in rows]

    async def stored_counts(self) -> tuple[int, int, bool]:
        """(events, visits, exact): exact counts, or PostgreSQL's own estimates (from its
        statistics, at no cost) once a table holds millions of rows, where counting would
        read the whole table."""
        estimated = await self._estimated_rows(("scan_events", "visits"))
        if estimated is not None and min(estimated) >= EXACT_COUNT_BELOW:
            return estimated[0], estimated[1], False
        events = await self._fetch("SELECT count(*) FROM scan_events")
        visits = await self._fetch("SELECT count(*) FROM visits")
        return int(events[0][0]), int(visits[0][0]), True

    async def _estimated_rows(self, tables: Sequence[str]) -> list[int] | None:
        """The backend's estimate of each table's rows; None where it has none (SQLite)."""
        return None

    async def count_events(self) -> int:
        rows = await self._fetch("SELECT count(*) FROM scan_events")
        return int(rows[0][0])

    async def event_identities(self) -> list[tuple[str, str]]:
        """Every stored (app id, event id), for exactly-once checks."""
        rows = await self._fetch("SELECT app_id, event_id FROM scan_events")
        return [(r[0], r[1]) for r in rows]

    async def apps_of_person(self, person_id: str, start_ms: int, end_ms: int) -> list[str]:
        """The apps that posted this person's scans between the two times (inclusive)."""
        rows = await self._fetch(
            "SELECT DISTINCT app_id FROM scan_events WHERE person_id = $1 "
            f"AND scanned_at >= {self._time('$2')} AND scanned_at <= {self._time('$3')} "
            "ORDER BY app_id",
            person_id,
            start_ms,
            end_ms,
        )
        return [str(r[0]) for r in rows]

    async def app_event_ids(
        self, app_id: str, person_id: str, venue_id: str, start_ms: int, end_ms: int
    ) -> list[str]:
        """The ids of the events this app posted for this person at this venue, scanned
        between the two times (inclusive), in scan order: what an exposure notice to the
        app may name, since the app holds them already."""
        rows = await self._fetch(
            "SELECT event_id FROM scan_events WHERE person_id = $1 "
            f"AND scanned_at >= {self._time('$2')} AND scanned_at <= {self._time('$3')} "
            "AND app_id = $4 AND venue_id = $5 ORDER BY scanned_at, event_id",
            person_id,
            start_ms,
            end_ms,
            app_id,
            venue_id,
        )
        return [str(r[0]) for r in rows]
