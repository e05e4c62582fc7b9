"""The records storage keeps and computes: scan events, visits, pairing rules, contacts.

Times are integer epoch milliseconds (UTC) everywhere inside scangate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal, NamedTuple

Kind = Literal["checkin", "checkout"]
ClosedBy = Literal["checkout", "next_checkin", "auto", "orphan"]
CLOSED_BY: Final[tuple[ClosedBy, ...]] = ("checkout", "next_checkin", "auto", "orphan")


# What a venue is; each kind may have its own maximum stay (SCANGATE_KIND_MAX_STAY).
VENUE_KINDS: Final = (
    "office",
    "hospital",
    "school",
    "market",
    "shop",
    "restaurant",
    "lodging",
    "transport",
    "residential",
    "other",
)


# No stored scan is scanned more than this after it was received: the gateway refuses scans
# further ahead than its clock skew (SCANGATE_CLOCK_SKEW, at most an hour), and the second
# hour is for the clocks of the gateways' hosts and the flusher's to differ. So a person's
# stored events and visits all lie before (the latest receive time) + this, and storage
# need not look past it: on PostgreSQL, the day partitions made ahead are not read.
FUTURE_SCAN_LIMIT_MS: Final = 2 * 3_600_000


class ScanEvent(NamedTuple):
    """An accepted scan. ``app_id`` and ``received_at_ms`` come from the server, never the body.

    Its identity is (app_id, event_id).

    It is both the pipeline's stream record and a row of ``scan_events``: storage builds it
    from rows and pairs it, and storage imports nothing of the gateway, so the type is
    defined here. ``gateway.pipeline.events`` exports it beside its stream format
    (``encode_event``/``decode_event``), and the pipeline takes it from there.
    """

    app_id: str
    event_id: str
    kind: Kind
    venue_id: str
    person_id: str
    scanned_at_ms: int
    received_at_ms: int
    device_id: str | None


class Visit(NamedTuple):
    """A person's stay at a venue, always with an end.

    ``source_at_ms`` is the time of the event that produced the visit: the opening check-in,
    or, for an ``orphan``, the check-out. Re-derivation replaces a person's visits by it.
    """

    person_id: str
    venue_id: str
    checkin_at_ms: int
    checkout_at_ms: int
    closed_by: ClosedBy
    source_at_ms: int


@dataclass(frozen=True, slots=True)
class PairingRules:
    """The windows of pairing (docs/design.md, "Pairing"), in milliseconds."""

    repeat_window_ms: int = 5 * 60_000
    max_stay_ms: int = 4 * 3_600_000
    orphan_stay_ms: int = 60 * 60_000
    # A venue may set its own maximum stay (venue id -> ms).
    venue_max_stay_ms: Mapping[str, int] = field(default_factory=dict)

    def max_stay_at(self, venue_id: str) -> int:
        return self.venue_max_stay_ms.get(venue_id, self.max_stay_ms)

    @property
    def horizon_ms(self) -> int:
        """How far back an event can influence pairing: after a gap this long with no event
        of a person, nothing earlier changes any of that person's later visits."""
        return max(self.repeat_window_ms, self.max_stay_ms, *self.venue_max_stay_ms.values())

    @property
    def reach_ms(self) -> int:
        """How far before an instant a visit can start and still carry pairing's state
        across it (``storage.pairing.state_before``): the open visit began at most a
        maximum stay before, and a check-out within the repeat window closed a visit that
        began at most a maximum stay before that."""
        return self.horizon_ms + self.repeat_window_ms


class ContactRow(NamedTuple):
    """One pair of overlapping visits found by tracing."""

    person_id: str
    venue_id: str
    overlap_start_ms: int
    overlap_end_ms: int
    overlap_minutes: float
    depth: int
    via: str | None
    # False when the overlap rests on an end that was assumed rather than scanned: the
    # case's or the contact's visit had no check-out (DESIGN's assumed end, or the next
    # check-in). The overlap never runs past the moment traced either way.
    checkout_recorded: bool = True
