"""Pairing of one person's scan events into visits: docs/design.md's worked examples, the
boundaries of every window, and properties that must hold for every order and copy count."""

from __future__ import annotations

import datetime as dt
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.models import CLOSED_BY, ClosedBy, Kind, PairingRules, ScanEvent, Visit
from storage.pairing import derive_visits, lone_visit, state_before

DAY_MS = int(dt.datetime(2026, 11, 25, tzinfo=dt.UTC).timestamp()) * 1000
MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
PERSON = "P1"
DEFAULT = PairingRules()

_ids = itertools.count()


def at(clock: str) -> int:
    """Epoch ms of "HH:MM" on 2026-11-25 UTC (hours may run past 24)."""
    hours, minutes = clock.split(":")
    return DAY_MS + int(hours) * HOUR_MS + int(minutes) * MINUTE_MS


def scan(kind: Kind, venue: str, when: str | int, person: str = PERSON) -> ScanEvent:
    """An event with a fresh identity; ``when`` is "HH:MM" or epoch ms."""
    t = at(when) if isinstance(when, str) else when
    return ScanEvent("app1", f"E{next(_ids)}", kind, venue, person, t, t + 1000, None)


def cin(venue: str, when: str | int) -> ScanEvent:
    return scan("checkin", venue, when)


def cout(venue: str, when: str | int) -> ScanEvent:
    return scan("checkout", venue, when)


def visit(venue: str, start: str | int, end: str | int, closed_by: ClosedBy) -> Visit:
    """The expected visit; its source is the check-out for an orphan, else the check-in."""
    start_ms = at(start) if isinstance(start, str) else start
    end_ms = at(end) if isinstance(end, str) else end
    source = end_ms if closed_by == "orphan" else start_ms
    return Visit(PERSON, venue, start_ms, end_ms, closed_by, source)


# docs/design.md, "Pairing": every row must hold exactly with the default rules.
WORKED_EXAMPLES = [
    pytest.param(
        [cin("V1", "10:00"), cout("V1", "11:00")],
        [visit("V1", "10:00", "11:00", "checkout")],
        id="in-out",
    ),
    pytest.param(
        [cin("V1", "10:30"), cin("V2", "12:00"), cout("V2", "13:00")],
        [
            visit("V1", "10:30", "12:00", "next_checkin"),
            visit("V2", "12:00", "13:00", "checkout"),
        ],
        id="next-checkin-elsewhere",
    ),
    pytest.param(
        [cout("V3", "09:00")],
        [visit("V3", "08:00", "09:00", "orphan")],
        id="orphan-checkout",
    ),
    pytest.param(
        [cin("V1", "08:00"), cin("V1", "08:02"), cout("V1", "08:30")],
        [visit("V1", "08:00", "08:30", "checkout")],
        id="repeat-checkin",
    ),
    pytest.param(
        [cin("V2", "06:00")],
        [visit("V2", "06:00", "10:00", "auto")],
        id="auto-end",
    ),
    pytest.param(
        [cin("V1", "10:00"), cout("V1", "15:00")],
        [visit("V1", "10:00", "14:00", "auto"), visit("V1", "14:00", "15:00", "orphan")],
        id="checkout-past-max-stay",
    ),
]


@pytest.mark.parametrize(("events", "expected"), WORKED_EXAMPLES)
def test_worked_examples(events: list[ScanEvent], expected: list[Visit]) -> None:
    assert derive_visits(events, DEFAULT) == expected


@pytest.mark.parametrize(("events", "expected"), WORKED_EXAMPLES)
def test_worked_examples_in_any_order_any_number_of_times(
    events: list[ScanEvent], expected: list[Visit]
) -> None:
    for order in itertools.permutations(events):
        assert derive_visits([*order, *reversed(order), order[0]], DEFAULT) == expected


EDGE_CASES = [
    pytest.param(
        [cin("V1", "09:00"), cout("V1", "10:00"), cout("V1", "10:05")],
        [visit("V1", "09:00", "10:00", "checkout")],
        id="repeat-checkout-at-window-inclusive",
    ),
    pytest.param(
        [cin("V1", "09:00"), cout("V1", "10:00"), cout("V1", "10:06")],
        [visit("V1", "09:00", "10:00", "checkout"), visit("V1", "09:06", "10:06", "orphan")],
        id="repeat-checkout-after-window-is-orphan",
    ),
    pytest.param(
        [cout("V1", "10:00"), cout("V1", "10:04"), cout("V1", "10:08")],
        [visit("V1", "09:00", "10:00", "orphan"), visit("V1", "09:08", "10:08", "orphan")],
        id="checkout-window-counts-from-effective-checkout",
    ),
    pytest.param(
        [cout("V1", "10:00"), cout("V2", "10:01")],
        [visit("V1", "09:00", "10:00", "orphan"), visit("V2", "09:01", "10:01", "orphan")],
        id="checkout-window-is-per-venue",
    ),
    pytest.param(
        [cin("V1", "10:00"), cout("V2", "10:30"), cout("V1", "11:00")],
        [visit("V1", "10:00", "11:00", "checkout"), visit("V2", "09:30", "10:30", "orphan")],
        id="checkout-elsewhere-leaves-visit-open",
    ),
    pytest.param(
        [cin("V1", "10:00"), cin("V2", "11:00"), cout("V1", "11:10")],
        [
            visit("V1", "10:00", "11:00", "next_checkin"),
            visit("V2", "11:00", "15:00", "auto"),
            visit("V1", "10:10", "11:10", "orphan"),
        ],
        id="checkout-at-venue-left-by-next-checkin",
    ),
    pytest.param(
        [cin("V1", "10:00"), cin("V1", "10:05")],
        [visit("V1", "10:00", "14:00", "auto")],
        id="repeat-checkin-at-window-inclusive",
    ),
    pytest.param(
        [cin("V1", "10:00"), cin("V1", at("10:05") + 1)],
        [
            visit("V1", "10:00", at("10:05") + 1, "next_checkin"),
            visit("V1", at("10:05") + 1, at("14:05") + 1, "auto"),
        ],
        id="same-venue-checkin-after-window-opens-new-visit",
    ),
    pytest.param(
        [cin("V1", "10:00"), cin("V1", "10:04"), cin("V1", "10:08"), cout("V1", "10:30")],
        [
            visit("V1", "10:00", "10:08", "next_checkin"),
            visit("V1", "10:08", "10:30", "checkout"),
        ],
        id="checkin-window-counts-from-open-visit-not-from-repeat",
    ),
    pytest.param(
        [cin("V1", "10:00"), cout("V1", "10:30"), cin("V1", "10:31"), cout("V1", "10:33")],
        [visit("V1", "10:00", "10:30", "checkout"), visit("V1", "10:31", "10:33", "checkout")],
        id="new-visit-closes-inside-previous-checkout-window",
    ),
    pytest.param(
        [cin("V1", "10:00"), cout("V1", "14:00")],
        [visit("V1", "10:00", "14:00", "checkout")],
        id="checkout-at-exactly-max-stay-closes",
    ),
    pytest.param(
        [cin("V1", "10:00"), cout("V1", at("14:00") + 1)],
        [
            visit("V1", "10:00", "14:00", "auto"),
            visit("V1", at("13:00") + 1, at("14:00") + 1, "orphan"),
        ],
        id="checkout-1ms-past-max-stay-is-orphan",
    ),
    pytest.param(
        [cin("V1", "10:00"), cin("V2", "14:00")],
        [visit("V1", "10:00", "14:00", "next_checkin"), visit("V2", "14:00", "18:00", "auto")],
        id="checkin-at-exactly-max-stay-is-next-checkin",
    ),
    pytest.param(
        [cin("V1", "10:00"), cin("V2", at("14:00") + 1)],
        [
            visit("V1", "10:00", "14:00", "auto"),
            visit("V2", at("14:00") + 1, at("18:00") + 1, "auto"),
        ],
        id="checkin-1ms-past-max-stay-after-auto",
    ),
    pytest.param(
        [cin("V1", "10:00"), cout("V1", "10:00")],
        [visit("V1", "10:00", "10:00", "checkout")],
        id="checkin-sorts-before-checkout-at-same-instant",
    ),
    pytest.param(
        [cin("V2", "10:00"), cin("V1", "10:00")],
        [visit("V1", "10:00", "10:00", "next_checkin"), visit("V2", "10:00", "14:00", "auto")],
        id="simultaneous-checkins-ordered-by-venue",
    ),
    pytest.param(
        [cin("V1", "10:00"), cin("V1", "10:00"), cout("V1", "11:00"), cout("V1", "11:00")],
        [visit("V1", "10:00", "11:00", "checkout")],
        id="distinct-identities-same-scan-act-as-repeats",
    ),
    pytest.param([], [], id="no-events"),
]


@pytest.mark.parametrize(("events", "expected"), EDGE_CASES)
def test_edge_cases(events: list[ScanEvent], expected: list[Visit]) -> None:
    assert derive_visits(events, DEFAULT) == expected


VENUE_RULES = PairingRules(venue_max_stay_ms={"V2": 90 * MINUTE_MS, "V3": 8 * HOUR_MS})


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        pytest.param(
            [cin("V2", "10:00")], [visit("V2", "10:00", "11:30", "auto")], id="short-venue-auto"
        ),
        pytest.param(
            [cin("V2", "10:00"), cout("V2", "11:30")],
            [visit("V2", "10:00", "11:30", "checkout")],
            id="short-venue-checkout-at-its-max",
        ),
        pytest.param(
            [cin("V2", "10:00"), cout("V2", "11:31")],
            [visit("V2", "10:00", "11:30", "auto"), visit("V2", "10:31", "11:31", "orphan")],
            id="short-venue-checkout-past-its-max",
        ),
        pytest.param(
            [cin("V3", "10:00"), cout("V3", "17:00")],
            [visit("V3", "10:00", "17:00", "checkout")],
            id="long-venue-outlasts-default",
        ),
        pytest.param(
            [cin("V1", "10:00"), cout("V1", "13:00")],
            [visit("V1", "10:00", "13:00", "checkout")],
            id="other-venues-keep-default",
        ),
        pytest.param(
            # The open visit's own venue decides, not the venue of the next event.
            [cin("V2", "10:00"), cin("V3", "12:00")],
            [visit("V2", "10:00", "11:30", "auto"), visit("V3", "12:00", "20:00", "auto")],
            id="max-stay-of-the-open-visits-venue",
        ),
    ],
)
def test_per_venue_max_stay(events: list[ScanEvent], expected: list[Visit]) -> None:
    assert derive_visits(events, VENUE_RULES) == expected


def test_events_of_two_people_are_refused() -> None:
    with pytest.raises(ValueError, match="one person"):
        derive_visits([cin("V1", "10:00"), scan("checkout", "V1", "11:00", person="P2")], DEFAULT)


def test_one_identity_with_two_contents_is_refused() -> None:
    first = cin("V1", "10:00")
    with pytest.raises(ValueError, match="different contents"):
        derive_visits([first, first._replace(scanned_at_ms=at("10:01"))], DEFAULT)


def test_redelivery_with_other_receipt_details_counts_once() -> None:
    first = cin("V1", "10:00")
    again = first._replace(received_at_ms=first.received_at_ms + 5000, device_id="D9")
    assert derive_visits(iter([first, again]), DEFAULT) == [visit("V1", "10:00", "14:00", "auto")]


# --- properties ---------------------------------------------------------------------------

VENUES = ("V1", "V2", "V3")
RULE_SETS = (
    DEFAULT,
    VENUE_RULES,
    PairingRules(repeat_window_ms=3 * MINUTE_MS, max_stay_ms=2 * HOUR_MS, orphan_stay_ms=0),
)

# Minutes in one day, on grids that land on the window edges (3 and 5 min, 1-8 h) often.
minutes = st.one_of(
    st.integers(0, 24 * 60),
    st.integers(0, 8 * 60).map(lambda m: 3 * m),
    st.integers(0, 24 * 12).map(lambda m: 5 * m),
    st.integers(0, 24).map(lambda h: 60 * h),
)


def window_gaps(rules: PairingRules) -> st.SearchStrategy[int]:
    """Gaps in minutes between consecutive events: often exactly one of the windows of
    ``rules``, or a minute off, since that is where "<" and "<=" part ways."""
    windows = {
        rules.repeat_window_ms,
        rules.orphan_stay_ms,
        rules.horizon_ms,
        *(rules.max_stay_at(v) for v in VENUES),
    }
    exact = sorted(w // MINUTE_MS for w in windows)
    near = sorted({max(0, m + d) for m in exact for d in (-1, 1)})
    return st.one_of(st.sampled_from(exact), st.sampled_from(near), st.integers(0, 5 * 60))


@st.composite
def cases(draw: st.DrawFn) -> tuple[PairingRules, list[ScanEvent]]:
    """Rules, and distinct events of one person at V1..V3 (equal scans under different
    identities included), timed on the day's grid or chained by gaps of window lengths."""
    rules = draw(st.sampled_from(RULE_SETS))
    if draw(st.booleans()):
        times = draw(st.lists(minutes, max_size=20))
    else:
        times = list(itertools.accumulate(draw(st.lists(window_gaps(rules), max_size=20))))
    kinds: tuple[Kind, ...] = ("checkin", "checkout")
    events = [
        ScanEvent(
            draw(st.sampled_from(("app1", "app2"))),
            f"E{i}",
            draw(st.sampled_from(kinds)),
            draw(st.sampled_from(VENUES)),
            PERSON,
            DAY_MS + minute * MINUTE_MS,
            DAY_MS + minute * MINUTE_MS,
            None,
        )
        for i, minute in enumerate(times)
    ]
    return rules, events


@settings(max_examples=200, deadline=None)
@given(case=cases(), data=st.data())
def test_any_order_and_any_copies_give_the_same_visits(
    case: tuple[PairingRules, list[ScanEvent]], data: st.DataObject
) -> None:
    rules, events = case
    expected = derive_visits(events, rules)
    copies = data.draw(st.lists(st.sampled_from(events), max_size=10)) if events else []
    shuffled = data.draw(st.permutations([*events, *copies]))
    assert derive_visits(shuffled, rules) == expected
    assert derive_visits(reversed(events), rules) == expected


@settings(max_examples=200, deadline=None)
@given(case=cases())
def test_every_visit_is_well_formed(case: tuple[PairingRules, list[ScanEvent]]) -> None:
    rules, events = case
    visits = derive_visits(events, rules)
    assert visits == sorted(
        visits, key=lambda v: (v.source_at_ms, v.venue_id, v.checkin_at_ms, v.closed_by)
    )
    scanned = {(e.kind, e.venue_id, e.scanned_at_ms) for e in events}
    for v in visits:
        assert v.person_id == PERSON
        assert v.checkin_at_ms <= v.checkout_at_ms
        assert v.closed_by in CLOSED_BY
        length = v.checkout_at_ms - v.checkin_at_ms
        if v.closed_by == "orphan":
            assert length == rules.orphan_stay_ms
            assert v.source_at_ms == v.checkout_at_ms
            assert ("checkout", v.venue_id, v.checkout_at_ms) in scanned
        else:
            assert length <= rules.max_stay_at(v.venue_id)
            assert v.source_at_ms == v.checkin_at_ms
            assert ("checkin", v.venue_id, v.checkin_at_ms) in scanned
        if v.closed_by == "auto":
            assert length == rules.max_stay_at(v.venue_id)
        if v.closed_by == "checkout":
            assert ("checkout", v.venue_id, v.checkout_at_ms) in scanned
    # A person is in one place at a time: stays that are not orphans never overlap.
    stays = sorted((v.checkin_at_ms, v.checkout_at_ms) for v in visits if v.closed_by != "orphan")
    for (_, end), (start, _) in itertools.pairwise(stays):
        assert end <= start


# --- resuming from the state read back from visits ------------------------------------


@settings(max_examples=400, deadline=None)
@given(case=cases(), data=st.data())
def test_resuming_from_the_stored_visits_matches_the_full_derivation(
    case: tuple[PairingRules, list[ScanEvent]], data: st.DataObject
) -> None:
    """What storage does with every batch: the events split into those stored before and
    the new ones (all at or after the earliest new one, ``t``); the visits from ``t`` on are
    derived from the state read back from the stored visits, never from older events."""
    rules, events = case
    if not events:
        return
    t = data.draw(st.sampled_from(sorted({e.scanned_at_ms for e in events})))
    new = [e for e in events if e.scanned_at_ms >= t and data.draw(st.booleans())]
    if not new:
        return
    t = min(e.scanned_at_ms for e in new)
    old = [e for e in events if e not in new]
    stored = derive_visits(old, rules)
    # What storage reads: visits from the reach before t that end within the repeat window
    # before it or later.
    near = [
        v
        for v in stored
        if v.source_at_ms >= t - rules.reach_ms and v.checkout_at_ms >= t - rules.repeat_window_ms
    ]
    state = state_before(near, t)
    resumed = derive_visits([e for e in events if e.scanned_at_ms >= t], rules, state)
    kept = [v for v in stored if v.source_at_ms < t and v != state.open_visit]
    assert sorted(kept + resumed) == sorted(derive_visits(events, rules))
    # And the resumed visits are exactly those that start at or after t, plus the open one.
    assert all(
        v.source_at_ms >= t or v.source_at_ms == state.open_visit.source_at_ms
        for v in resumed
        if state.open_visit is not None
    )


def test_resuming_closes_the_open_visit_and_honours_the_repeat_windows() -> None:
    stored = derive_visits([cin("V1", "10:00"), cout("V2", "10:30")], DEFAULT)
    state = state_before(stored, at("10:33"))
    assert state.open_visit == visit("V1", "10:00", "14:00", "auto")
    assert state.last_checkout_at == {"V2": at("10:30")}
    later = [cout("V2", "10:33"), cout("V1", "11:00")]
    assert derive_visits(later, DEFAULT, state) == [visit("V1", "10:00", "11:00", "checkout")]


@settings(max_examples=100, deadline=None)
@given(case=cases())
def test_a_lone_event_makes_the_visit_the_full_derivation_makes(
    case: tuple[PairingRules, list[ScanEvent]],
) -> None:
    rules, events = case
    for e in events:
        assert [lone_visit(e, rules)] == derive_visits([e], rules)
