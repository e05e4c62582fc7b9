"""Pairing: a person's scan events into visits (docs/design.md, "Pairing").

The visits of a person are a pure function of the *set* of that person's events: no clock,
no arrival order, no count of copies. Re-derivation after a late or redelivered event is
therefore always safe, and :func:`state_before` says where it can resume from.

Boundaries (all windows in ``PairingRules``, ms; ``t`` is the later scan time):

- repeat check-in: same venue as the open visit and ``t - checkin_at <= repeat_window_ms``
  (inclusive: a re-scan at exactly 5 min is still a repeat);
- repeat check-out: same venue as the previous *effective* check-out there (one that closed
  a visit or made an orphan) and ``t - that_checkout_at <= repeat_window_ms`` (inclusive),
  and no visit open at that venue;
- open visit: still open at ``t`` while ``t - checkin_at <= max_stay_at(venue)``
  (inclusive), so a check-out at exactly the maximum stay closes it as ``checkout`` and a
  check-in elsewhere at exactly that time closes it as ``next_checkin``; from 1 ms later it
  has ended ``auto`` at ``checkin_at + max_stay``.
"""

from __future__ import annotations

from collections.abc import Iterable
from operator import attrgetter
from typing import Final, NamedTuple

from storage.models import PairingRules, ScanEvent, Visit

__all__ = ["PairingState", "derive_visits", "lone_visit", "state_before"]

# The scan order: a total order on identities, so the scan never depends on input order.
# (Events equal in time, kind and venue act as repeats of each other, so even their order is
# moot.) Check-ins sort before check-outs at the same instant, so "in V1 10:00, out V1
# 10:00" is a (zero-length) visit rather than an orphan followed by a visit left open: the
# kind's own text gives that order ("checkin" < "checkout"), which lets the key be an
# attrgetter, computed in C rather than by a Python function per event.
_SCAN_ORDER: Final = attrgetter("scanned_at_ms", "kind", "venue_id", "app_id", "event_id")
_VISIT_ORDER: Final = attrgetter("source_at_ms", "venue_id", "checkin_at_ms", "closed_by")


class _OpenVisit(NamedTuple):
    venue_id: str
    checkin_at_ms: int


class PairingState(NamedTuple):
    """All that pairing carries from a person's events before an instant to the events at
    or after it: the visit still open then, and each venue's last effective check-out (the
    start of its repeat window for check-outs). See :func:`state_before`."""

    open_visit: Visit | None
    last_checkout_at: dict[str, int]


def derive_visits(
    events: Iterable[ScanEvent], rules: PairingRules, start: PairingState | None = None
) -> list[Visit]:
    """The visits of one person, as a pure function of the set of their events.

    Copies of an event (same ``(app_id, event_id)``) count once, and any input order gives
    the same result. Every visit has an end; an ``auto`` end may lie in the future (the
    person is inside now). Visits are sorted by
    ``(source_at_ms, venue_id, checkin_at_ms, closed_by)``.

    With ``start`` (``state_before(visits, t)``) the scan resumes from that state instead
    of from nothing: given the person's events at or after ``t``, it returns the visits
    that start at or after ``t`` plus the visit open just before ``t`` with its end now.

    Raises ValueError if the events are not all of one person, or if two events share an
    identity but differ in what pairing reads (kind, venue, person, scan time).
    """
    unique = _unique_events(events)
    resumed = start.open_visit if start is not None else None
    if not unique and resumed is None:
        return []
    person_id = unique[0].person_id if unique else resumed.person_id  # type: ignore[union-attr]
    visits: list[Visit] = []
    open_visit: _OpenVisit | None = None
    # Venue -> time of the check-out there that last closed a visit or made an orphan:
    # the start of that venue's repeat window for check-outs.
    last_checkout_at: dict[str, int] = {}
    if start is not None:
        last_checkout_at.update(start.last_checkout_at)
        if resumed is not None:
            open_visit = _OpenVisit(resumed.venue_id, resumed.checkin_at_ms)

    for event in sorted(unique, key=_SCAN_ORDER):
        t = event.scanned_at_ms
        venue_id = event.venue_id
        if open_visit is not None:
            max_stay_ms = rules.max_stay_at(open_visit.venue_id)
            if t - open_visit.checkin_at_ms > max_stay_ms:
                # Ended on its own before this event; the event cannot touch it any more.
                visits.append(_auto_visit(person_id, open_visit, max_stay_ms))
                open_visit = None

        if event.kind == "checkin":
            if open_visit is not None:
                if (
                    open_visit.venue_id == venue_id
                    and t - open_visit.checkin_at_ms <= rules.repeat_window_ms
                ):
                    continue
                visits.append(
                    Visit(
                        person_id,
                        open_visit.venue_id,
                        open_visit.checkin_at_ms,
                        t,
                        "next_checkin",
                        open_visit.checkin_at_ms,
                    )
                )
            open_visit = _OpenVisit(venue_id, t)
            continue

        if open_visit is not None and open_visit.venue_id == venue_id:
            # Closes even inside the repeat window of an earlier check-out here: a visit
            # opened after that check-out is a new stay, and its own check-out ends it.
            visits.append(
                Visit(
                    person_id,
                    venue_id,
                    open_visit.checkin_at_ms,
                    t,
                    "checkout",
                    open_visit.checkin_at_ms,
                )
            )
            open_visit = None
            last_checkout_at[venue_id] = t
            continue
        previous_ms = last_checkout_at.get(venue_id)
        if previous_ms is not None and t - previous_ms <= rules.repeat_window_ms:
            continue
        # No visit open here (never checked in, checked in elsewhere — that visit stays
        # open —, or already ended "auto"): keep the stay with an assumed length.
        visits.append(Visit(person_id, venue_id, t - rules.orphan_stay_ms, t, "orphan", t))
        last_checkout_at[venue_id] = t

    if open_visit is not None:
        visits.append(_auto_visit(person_id, open_visit, rules.max_stay_at(open_visit.venue_id)))
    visits.sort(key=_VISIT_ORDER)
    return visits


def lone_visit(event: ScanEvent, rules: PairingRules) -> Visit:
    """``derive_visits([event], rules)[0]``, without the scan's set-up: the visit of a
    person's only event (the usual case for a person new to a batch with nothing open)."""
    t = event.scanned_at_ms
    if event.kind == "checkin":
        return _auto_visit(
            event.person_id, _OpenVisit(event.venue_id, t), rules.max_stay_at(event.venue_id)
        )
    return Visit(event.person_id, event.venue_id, t - rules.orphan_stay_ms, t, "orphan", t)


def state_before(visits: Iterable[Visit], at_ms: int) -> PairingState:
    """The state of pairing just before ``at_ms``, read from a person's visits.

    ``visits`` must include every visit of the person derived from *all* their events (old
    and new) that has ``source_at_ms`` in ``[at_ms - reach, at_ms)``, where reach is
    ``rules.horizon_ms + rules.repeat_window_ms``; more are ignored. Then, for the person's
    events ``E`` and visits ``derive_visits(E)``, and any events ``N`` all at or after
    ``at_ms``::

        derive_visits(E + N) == [v for v in derive_visits(E) if v.source_at_ms < at_ms
                                 and v != state.open_visit]
                                + derive_visits(events of E + N at or after at_ms,
                                                start=state)

    It holds because the scan reaches ``at_ms`` in the same state either way (no event of
    ``N`` comes before it), and that state can be read back from what the scan emitted
    before it:

    - the visit open just before ``at_ms`` is the one that started before it and ends at or
      after it, unless it is an orphan (an orphan is made by its check-out and never open).
      A visit closed by a check-out or a next check-in ends at the event that closed it; an
      ``auto`` one ends at check-in plus the maximum stay, so if that end is before
      ``at_ms`` the visit has expired and the next event would only close it as it is.
      A visit that ended before ``at_ms`` was closed by an earlier event, so at most one
      visit qualifies. It began within the maximum stay (at most the horizon) of ``at_ms``.
    - a venue's last effective check-out is the latest end among its ``checkout`` and
      ``orphan`` visits that end before ``at_ms``; only one within the repeat window can
      matter, and the visit it closed began at most the horizon before that.
    """
    open_visit: Visit | None = None
    last_checkout_at: dict[str, int] = {}
    for v in visits:
        if v.source_at_ms >= at_ms:
            continue
        if v.checkout_at_ms >= at_ms and v.closed_by != "orphan":
            if open_visit is None or v.source_at_ms > open_visit.source_at_ms:
                open_visit = v
        elif v.closed_by in ("checkout", "orphan") and v.checkout_at_ms < at_ms:
            previous = last_checkout_at.get(v.venue_id)
            if previous is None or v.checkout_at_ms > previous:
                last_checkout_at[v.venue_id] = v.checkout_at_ms
    return PairingState(open_visit, last_checkout_at)


def _unique_events(events: Iterable[ScanEvent]) -> list[ScanEvent]:
    """One event per identity, all of one person; raises ValueError otherwise."""
    by_identity: dict[tuple[str, str], ScanEvent] = {}
    person_id: str | None = None
    for event in events:
        if person_id is None:
            person_id = event.person_id
        elif event.person_id != person_id:
            raise ValueError("derive_visits takes the events of one person only")
        identity = (event.app_id, event.event_id)
        seen = by_identity.setdefault(identity, event)
        # received_at_ms and device_id may differ between deliveries; pairing ignores them.
        # (The usual case, an identity seen once, is the same object: nothing to compare.)
        if seen is not event and _pairing_fields(seen) != _pairing_fields(event):
            raise ValueError(f"event {identity!r} given twice with different contents")
    return list(by_identity.values())


def _pairing_fields(event: ScanEvent) -> tuple[str, str, str, int]:
    return (event.kind, event.venue_id, event.person_id, event.scanned_at_ms)


def _auto_visit(person_id: str, open_visit: _OpenVisit, max_stay_ms: int) -> Visit:
    return Visit(
        person_id,
        open_visit.venue_id,
        open_visit.checkin_at_ms,
        open_visit.checkin_at_ms + max_stay_ms,
        "auto",
        open_visit.checkin_at_ms,
    )
