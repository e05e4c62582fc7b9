"""Contact tracing rules (pure): which visit pairs are contacts, and how rows are written."""

from __future__ import annotations

import csv
import io
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.models import ContactRow, Visit
from storage.times import parse_time_ms
from storage.tracing import (
    CSV_COLUMNS,
    TraceQuery,
    candidate_windows,
    contacts_of,
    depth2_persons,
    neutralise_cell,
    rows_to_csv,
    rows_to_json,
    widen,
)

MINUTE = 60_000
DAY = 86_400_000
# Noon UTC the day after the visits below: every visit on DAY0 is well inside 14 days.
NOW = parse_time_ms("2026-11-26T12:00:00Z")
CASE = "F0"


def at(hh_mm: str, day: str = "2026-11-25") -> int:
    return parse_time_ms(f"{day}T{hh_mm}:00Z")


def visit(person: str, venue: str, start: int, end: int) -> Visit:
    return Visit(person, venue, start, end, "checkout", start)


def query(**overrides: Any) -> TraceQuery:
    return TraceQuery(person_id=CASE, now_ms=NOW, **overrides)


def depth1(case_visits: list[Visit], candidates: list[Visit], q: TraceQuery) -> list[ContactRow]:
    return contacts_of(case_visits, candidates, q, depth=1, via=None, exclude=frozenset({CASE}))


# The case's visit: V1 10:00-11:00, so with the 60 min margin the widened visit is 09:00-12:00.
CASE_VISIT = visit(CASE, "V1", at("10:00"), at("11:00"))


def test_query_defaults_and_window() -> None:
    q = TraceQuery(person_id=CASE, now_ms=NOW)
    assert (q.days, q.margin_ms, q.min_overlap_ms, q.depth) == (14, 60 * MINUTE, 10 * MINUTE, 1)
    assert q.window_start_ms == NOW - 14 * DAY
    assert query(days=3).window_start_ms == NOW - 3 * DAY


@pytest.mark.parametrize(
    ("overrides", "detail"),
    [
        ({"days": 0}, "days must be at least 1"),
        ({"margin_ms": -1}, "margin must not be negative"),
        ({"min_overlap_ms": -1}, "min_overlap must not be negative"),
        ({"depth": 3}, "depth must be 1 or 2"),
    ],
)
def test_query_refuses_values_out_of_range(overrides: dict[str, int], detail: str) -> None:
    with pytest.raises(ValueError, match=detail):
        query(**overrides)


def test_widen_adds_the_margin_on_both_sides() -> None:
    assert widen(CASE_VISIT, 60 * MINUTE) == (at("09:00"), at("12:00"))
    assert widen(CASE_VISIT, 0) == (at("10:00"), at("11:00"))


def test_planted_contact_gives_one_row_with_its_overlap() -> None:
    contact = visit("B", "V1", at("10:30"), at("12:30"))
    rows = depth1([CASE_VISIT], [CASE_VISIT, contact], query())
    # Overlap of the widened 09:00-12:00 with 10:30-12:30.
    assert rows == [ContactRow("B", "V1", at("10:30"), at("12:00"), 90.0, 1, None)]


def test_contact_who_left_before_the_case_arrived_counts_within_the_margin() -> None:
    candidates = [
        visit("B", "V1", at("08:30"), at("09:15")),  # 15 min inside the margin: counted
        visit("C", "V1", at("08:30"), at("09:05")),  # 5 min inside the margin: too short
        visit("D", "V1", at("08:00"), at("08:50")),  # left more than the margin before
        visit("E", "V1", at("08:00"), at("09:00")),  # left exactly as the margin begins
    ]
    rows = depth1([CASE_VISIT], candidates, query())
    assert rows == [ContactRow("B", "V1", at("09:00"), at("09:15"), 15.0, 1, None)]


def test_contact_who_arrived_after_the_case_left_counts_within_the_margin() -> None:
    candidates = [
        visit("B", "V1", at("11:40"), at("13:00")),  # 20 min of the margin: counted
        visit("C", "V1", at("12:00"), at("13:00")),  # arrived as the margin ends
    ]
    rows = depth1([CASE_VISIT], candidates, query())
    assert rows == [ContactRow("B", "V1", at("11:40"), at("12:00"), 20.0, 1, None)]


def test_min_overlap_is_inclusive() -> None:
    candidates = [
        visit("AT", "V1", at("08:30"), at("09:10")),  # exactly 10 min
        visit("UNDER", "V1", at("08:30"), at("09:10") - 1),  # 1 ms short of 10 min
    ]
    rows = depth1([CASE_VISIT], candidates, query())
    assert rows == [ContactRow("AT", "V1", at("09:00"), at("09:10"), 10.0, 1, None)]


def test_zero_min_overlap_still_needs_time_together() -> None:
    touching = visit("B", "V1", at("08:00"), at("09:00"))
    one_ms = visit("C", "V1", at("08:00"), at("09:00") + 1)
    rows = depth1([CASE_VISIT], [touching, one_ms], query(min_overlap_ms=0))
    assert [(r.person_id, r.overlap_minutes) for r in rows] == [("C", 0.0)]


def test_overlap_minutes_are_rounded_to_two_decimals() -> None:
    contact = visit("B", "V1", at("08:00"), at("09:12") + 20_500)  # 12 min 20.5 s
    [row] = depth1([CASE_VISIT], [contact], query())
    assert row.overlap_minutes == 12.34


def test_other_venue_and_the_case_own_visits_are_not_contacts() -> None:
    candidates = [
        visit("B", "V2", at("10:00"), at("11:00")),  # same time, another venue
        visit(CASE, "V1", at("11:30"), at("12:30")),  # the case's own later visit there
        visit(CASE, "V1", at("10:00"), at("11:00")),  # the case visit itself
    ]
    assert depth1([CASE_VISIT], candidates, query()) == []


def test_visits_outside_the_days_window_are_not_traced() -> None:
    q = query(days=14)
    old_case = visit(CASE, "V1", q.window_start_ms - 2 * 60 * MINUTE, q.window_start_ms - 1)
    old_contact = visit("B", "V1", old_case.checkin_at_ms, old_case.checkout_at_ms)
    future_case = visit(CASE, "V1", NOW + 1, NOW + 60 * MINUTE)
    future_contact = visit("C", "V1", future_case.checkin_at_ms, future_case.checkout_at_ms)
    case_visits = [old_case, future_case]
    candidates = [old_contact, future_contact]
    assert depth1(case_visits, candidates, q) == []
    assert candidate_windows(case_visits, q) == []


def test_window_ends_are_inclusive() -> None:
    q = query(days=14, margin_ms=0)
    ends_at_start = visit(CASE, "V1", q.window_start_ms - 30 * MINUTE, q.window_start_ms)
    starts_at_now = visit(CASE, "V2", NOW, NOW + 30 * MINUTE)
    candidates = [
        visit("B", "V1", q.window_start_ms - 30 * MINUTE, q.window_start_ms),
        visit("C", "V2", NOW, NOW + 30 * MINUTE),
    ]
    # Both case visits are in the window; the one starting now has had no time yet with
    # anyone (nothing after the moment traced counts).
    assert [w[0] for w in candidate_windows([ends_at_start, starts_at_now], q)] == ["V1", "V2"]
    rows = depth1([ends_at_start, starts_at_now], candidates, q)
    assert [(r.person_id, r.overlap_minutes) for r in rows] == [("B", 30.0)]


def open_visit(person: str, venue: str, start: int) -> Visit:
    """A check-in with no check-out yet: stored with its assumed end, four hours on."""
    return Visit(person, venue, start, start + 240 * MINUTE, "auto", start)


def test_a_visit_with_no_check_out_counts_up_to_the_moment_traced_not_its_assumed_end() -> None:
    """Someone who checked in 3 minutes ago showed overlap_minutes 240, ending four hours
    ahead (issue 19)."""
    q = query(min_overlap_ms=0)
    case = visit(CASE, "V1", NOW - 60 * MINUTE, NOW - 30 * MINUTE)
    rows = depth1([case], [open_visit("B", "V1", NOW - 3 * MINUTE)], q)
    assert [(r.overlap_end_ms, r.overlap_minutes, r.checkout_recorded) for r in rows] == [
        (NOW, 3.0, False)
    ]
    # The case's own visit open: the contact's check-out bounds the overlap, but it rests
    # on the case's assumed stay, so it is not "recorded" either.
    rows = depth1([open_visit(CASE, "V1", NOW - 20 * MINUTE)], [case_at("B")], q)
    assert [(r.overlap_end_ms, r.checkout_recorded) for r in rows] == [(NOW - 10 * MINUTE, False)]
    # Both ends scanned: recorded, and still never past now.
    rows = depth1([case], [visit("B", "V1", NOW - 50 * MINUTE, NOW - 40 * MINUTE)], q)
    assert [r.checkout_recorded for r in rows] == [True]


def case_at(person: str) -> Visit:
    return visit(person, "V1", NOW - 30 * MINUTE, NOW - 10 * MINUTE)


def test_a_case_is_traced_no_further_than_its_confirmation() -> None:
    confirmed = NOW - 60 * MINUTE
    q = TraceQuery(person_id=CASE, now_ms=confirmed, min_overlap_ms=0)
    case = open_visit(CASE, "V1", confirmed - 30 * MINUTE)
    rows = depth1([case], [open_visit("B", "V1", confirmed - 20 * MINUTE)], q)
    assert [(r.overlap_end_ms, r.overlap_minutes) for r in rows] == [(confirmed, 20.0)]


def test_two_case_visits_overlapping_one_contact_visit_give_two_rows() -> None:
    first = visit(CASE, "V1", at("10:00"), at("10:30"))
    second = visit(CASE, "V1", at("11:00"), at("11:30"))
    contact = visit("B", "V1", at("08:00"), at("14:00"))
    # The backend may fetch the contact once per case window: each pair still counts once.
    rows = depth1([second, first], [contact, contact], query())
    assert rows == [
        ContactRow("B", "V1", at("09:00"), at("11:30"), 150.0, 1, None),
        ContactRow("B", "V1", at("10:00"), at("12:30"), 150.0, 1, None),
    ]


def test_rows_are_sorted_by_overlap_start_then_venue_then_person() -> None:
    case_visits = [CASE_VISIT, visit(CASE, "V0", at("13:00"), at("14:00"))]
    candidates = [
        visit("Z", "V1", at("10:00"), at("10:30")),
        visit("A", "V1", at("10:00"), at("10:30")),
        visit("M", "V1", at("09:30"), at("10:30")),
        visit("A", "V0", at("12:00"), at("13:00")),  # 12:00: the V0 widened start
    ]
    rows = depth1(case_visits, candidates, query())
    assert [(r.overlap_start_ms, r.venue_id, r.person_id) for r in rows] == [
        (at("09:30"), "V1", "M"),
        (at("10:00"), "V1", "A"),
        (at("10:00"), "V1", "Z"),
        (at("12:00"), "V0", "A"),
    ]


def test_candidate_windows_are_the_widened_case_visits_in_the_window() -> None:
    q = query()
    old = visit(CASE, "V9", q.window_start_ms - 2 * DAY, q.window_start_ms - DAY)
    later = visit(CASE, "V0", at("13:00"), at("14:00"))
    assert candidate_windows([CASE_VISIT, old, later, CASE_VISIT], q) == [
        ("V0", at("12:00"), at("15:00")),
        ("V1", at("09:00"), at("12:00")),
    ]


def test_depth2_rows_name_the_via_person_and_skip_the_case() -> None:
    depth1_rows = depth1([CASE_VISIT], [visit("B", "V1", at("10:30"), at("12:30"))], query())
    assert depth2_persons(depth1_rows) == ["B"]
    b_visit = visit("B", "V2", at("15:00"), at("16:00"))
    candidates = [
        visit("C", "V2", at("15:30"), at("17:30")),
        visit(CASE, "V2", at("15:00"), at("16:00")),  # the case again: already traced
        visit("B", "V2", at("16:30"), at("17:00")),  # B's own visit
    ]
    rows = contacts_of(
        [b_visit], candidates, query(), depth=2, via="B", exclude=frozenset({CASE, "B"})
    )
    assert rows == [ContactRow("C", "V2", at("15:30"), at("17:00"), 90.0, 2, "B")]


def test_depth2_persons_are_distinct_sorted_and_from_depth1_rows_only() -> None:
    rows = [
        ContactRow("C", "V1", 0, 1, 0.0, 1, None),
        ContactRow("A", "V1", 0, 1, 0.0, 1, None),
        ContactRow("C", "V2", 0, 1, 0.0, 1, None),
        ContactRow("Q", "V3", 0, 1, 0.0, 2, "A"),
    ]
    assert depth2_persons(rows) == ["A", "C"]


def test_depth_and_via_must_agree() -> None:
    with pytest.raises(ValueError, match="depth must be 1 or 2"):
        contacts_of([], [], query(), depth=3, via="B", exclude=frozenset({CASE}))
    with pytest.raises(ValueError, match="via"):
        contacts_of([], [], query(), depth=1, via="B", exclude=frozenset({CASE}))
    with pytest.raises(ValueError, match="via"):
        contacts_of([], [], query(), depth=2, via=None, exclude=frozenset({CASE}))


# -- formatting ---------------------------------------------------------------------------

ROW1 = ContactRow("B", "V1", parse_time_ms("2026-11-25T09:00:00.250Z"), at("10:15"), 74.75, 1, None)
ROW2 = ContactRow("C", "V2", at("15:30"), at("17:00"), 90.0, 2, "B", checkout_recorded=False)


def test_rows_to_json() -> None:
    assert rows_to_json([ROW1, ROW2]) == [
        {
            "person_id": "B",
            "venue_id": "V1",
            "overlap_start": "2026-11-25T09:00:00.250Z",
            "overlap_end": "2026-11-25T10:15:00.000Z",
            "overlap_minutes": 74.75,
            "depth": 1,
            "checkout_recorded": True,
        },
        {
            "person_id": "C",
            "venue_id": "V2",
            "overlap_start": "2026-11-25T15:30:00.000Z",
            "overlap_end": "2026-11-25T17:00:00.000Z",
            "overlap_minutes": 90.0,
            "depth": 2,
            "via": "B",
            "checkout_recorded": False,
        },
    ]
    assert rows_to_json([]) == []


def test_rows_to_csv() -> None:
    assert rows_to_csv([ROW1, ROW2]) == (
        "person_id,venue_id,overlap_start,overlap_end,overlap_minutes,depth,via,checkout_recorded\r\n"
        "B,V1,2026-11-25T09:00:00.250Z,2026-11-25T10:15:00.000Z,74.75,1,,true\r\n"
        "C,V2,2026-11-25T15:30:00.000Z,2026-11-25T17:00:00.000Z,90.00,2,B,false\r\n"
    )
    assert rows_to_csv([]) == ",".join(CSV_COLUMNS) + "\r\n"


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r"])
def test_neutralise_cell_prefixes_formula_starts(start: str) -> None:
    text = start + "HYPERLINK(1)"
    assert neutralise_cell(text) == "'" + text


@pytest.mark.parametrize("text", ["", "B7K2", "V1", "2026-11-25T09:00:00.000Z", "a=b", " =1", "'x"])
def test_neutralise_cell_leaves_other_text_alone(text: str) -> None:
    assert neutralise_cell(text) == text


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r"])
def test_rows_to_csv_neutralises_every_cell(start: str) -> None:
    row = ContactRow(start + "P", start + "V", 0, MINUTE, 1.0, 2, start + "VIA")
    [header, cells] = list(csv.reader(io.StringIO(rows_to_csv([row]), newline="")))
    assert header == list(CSV_COLUMNS)
    assert cells[0] == "'" + start + "P"
    assert cells[1] == "'" + start + "V"
    assert cells[6] == "'" + start + "VIA"
    assert cells[2:6] == ["1970-01-01T00:00:00.000Z", "1970-01-01T00:01:00.000Z", "1.00", "2"]


def test_rows_to_csv_quoting_survives_commas_quotes_and_newlines() -> None:
    row = ContactRow('a,"b"', "x\ny", 0, MINUTE, 1.0, 2, "=c,d")
    text = rows_to_csv([row])
    [_, cells] = list(csv.reader(io.StringIO(text, newline="")))
    assert cells[0] == 'a,"b"'
    assert cells[1] == "x\ny"
    assert cells[6] == "'=c,d"


# -- properties ---------------------------------------------------------------------------

persons = st.sampled_from([CASE, "A", "B", "C"])
venues = st.sampled_from(["V1", "V2"])


@st.composite
def visits(draw: st.DrawFn) -> Visit:
    start = draw(st.integers(at("06:00"), at("18:00")))
    length = draw(st.integers(1, 4 * 60 * MINUTE))
    return visit(draw(persons), draw(venues), start, start + length)


@given(
    case_visits=st.lists(visits(), max_size=4),
    candidates=st.lists(visits(), max_size=12),
    order=st.randoms(use_true_random=False),
)
def test_every_row_is_a_qualifying_pair_in_any_order(
    case_visits: list[Visit], candidates: list[Visit], order: random.Random
) -> None:
    cases = [v._replace(person_id=CASE) for v in case_visits]
    q = query()
    rows = depth1(cases, candidates, q)
    shuffled_cases, shuffled_candidates = list(cases), list(candidates)
    order.shuffle(shuffled_cases)
    order.shuffle(shuffled_candidates)
    assert depth1(shuffled_cases, shuffled_candidates, q) == rows

    # The rule, checked pair by pair against a plain reading of it.
    expected = sorted(
        (max(c.checkin_at_ms - q.margin_ms, k.checkin_at_ms), c.venue_id, k.person_id)
        for c in set(cases)
        for k in set(candidates)
        if k.venue_id == c.venue_id
        and k.person_id != CASE
        and min(c.checkout_at_ms + q.margin_ms, k.checkout_at_ms)
        - max(c.checkin_at_ms - q.margin_ms, k.checkin_at_ms)
        >= q.min_overlap_ms
    )
    assert [(r.overlap_start_ms, r.venue_id, r.person_id) for r in rows] == expected
    for row in rows:
        assert row.overlap_end_ms - row.overlap_start_ms >= q.min_overlap_ms
        assert row.overlap_minutes == round((row.overlap_end_ms - row.overlap_start_ms) / MINUTE, 2)
