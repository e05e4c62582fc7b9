"""Daily reports for health steering committees, the pure part: no I/O but the storage
object passed in, no clock.

A report has one row per local day and group (a province, a kind of venue, or a venue):
scans, check-ins, distinct persons, visits begun, the median stay of the visits that
really ended, and the most visits in progress at once. Days are days in the time zone the
caller passes (the committee's), from local midnight to the next, so a DST day has 23 or
25 hours. Storage is read one day at a time, so memory stays bounded by one day's rows.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Final, Literal, NamedTuple
from zoneinfo import ZoneInfo

from storage.events import EventStore
from storage.models import Visit
from storage.tracing import neutralise_cell

ReportBy = Literal["province", "venue_kind", "venue"]
REPORT_BY: Final[tuple[ReportBy, ...]] = ("province", "venue_kind", "venue")
MAX_REPORT_DAYS: Final = 92
UNKNOWN_GROUP: Final = "unknown"
# A stay that really ended: the person checked out or checked in elsewhere. "auto" and
# "orphan" lengths are assumed by the pairing rules, so they would only echo the rules.
REAL_ENDS: Final = frozenset({"checkout", "next_checkin"})


class ReportRow(NamedTuple):
    """One day (``YYYY-MM-DD``, local) and group of a daily report."""

    day: str
    group: str
    scans: int
    checkins: int
    unique_persons: int
    visits: int
    median_stay_minutes: float | None
    peak_occupancy: int


CSV_COLUMNS: Final = ReportRow._fields


def day_bounds_ms(day: dt.date, tz: ZoneInfo) -> tuple[int, int]:
    """[start, end) of a local day in epoch ms: local midnight to the next local midnight.

    Each midnight is placed on its own, so a day across a DST change has its true length.
    (Where a zone skips midnight, fold 0 gives the instant the day starts.)
    """
    return _midnight_ms(day, tz), _midnight_ms(day + dt.timedelta(days=1), tz)


def _midnight_ms(day: dt.date, tz: ZoneInfo) -> int:
    # Offsets are whole seconds, so the timestamp is exact.
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=tz).timestamp()) * 1000


async def daily_report(
    storage: EventStore,
    first_day: dt.date,
    last_day: dt.date,
    by: ReportBy,
    tz: ZoneInfo,
    places: Mapping[str, tuple[str, str]],
) -> list[ReportRow]:
    """The report's rows for the days ``first_day`` to ``last_day`` (inclusive) in ``tz``,
    sorted by day then group.

    ``places`` maps a registered venue id to (province, kind); other venues group under
    ``"unknown"`` (by venue, the group is the venue id). A (day, group) has a row when it
    has an event or a visit in progress that day. Raises ValueError for a range that ends
    before it starts or spans more than :data:`MAX_REPORT_DAYS` days.
    """
    if by not in REPORT_BY:
        raise ValueError(f"cannot group a report by {by!r}")
    if last_day < first_day:
        raise ValueError("the last day is before the first day")
    days = (last_day - first_day).days + 1
    if days > MAX_REPORT_DAYS:
        raise ValueError(f"a report covers at most {MAX_REPORT_DAYS} days (asked for {days})")
    rows: list[ReportRow] = []
    for i in range(days):
        day = first_day + dt.timedelta(days=i)
        start_ms, end_ms = day_bounds_ms(day, tz)
        counts = await storage.scan_counts(start_ms, end_ms)
        # From 1 ms before the day: a zero-length visit at exactly midnight has
        # checkout_at == start and still begins this day; _day_rows drops what only
        # touches the day's start.
        visits = await storage.visits_between(start_ms - 1, end_ms)
        rows += _day_rows(day, start_ms, end_ms, counts, visits, by, places)
    return rows


def _day_rows(
    day: dt.date,
    start_ms: int,
    end_ms: int,
    counts: Iterable[tuple[str, str, str, int]],
    visits: Iterable[Visit],
    by: ReportBy,
    places: Mapping[str, tuple[str, str]],
) -> list[ReportRow]:
    scans: dict[str, int] = defaultdict(int)
    checkins: dict[str, int] = defaultdict(int)
    persons: dict[str, set[str]] = defaultdict(set)
    for venue_id, person_id, kind, n in counts:
        group = _group_of(venue_id, by, places)
        scans[group] += n
        if kind == "checkin":
            checkins[group] += n
        persons[group].add(person_id)

    begun: dict[str, int] = defaultdict(int)
    stays_ms: dict[str, list[int]] = defaultdict(list)
    spans: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for visit in visits:
        group = _group_of(visit.venue_id, by, places)
        if start_ms <= visit.checkin_at_ms < end_ms:
            begun[group] += 1
            if visit.closed_by in REAL_ENDS:
                stays_ms[group].append(visit.checkout_at_ms - visit.checkin_at_ms)
        lo, hi = max(visit.checkin_at_ms, start_ms), min(visit.checkout_at_ms, end_ms)
        # Empty for a zero-length visit (in progress at no instant) and for one that ended
        # exactly at midnight (yesterday's only).
        if lo < hi:
            spans[group].append((lo, hi))

    label = day.isoformat()
    out: list[ReportRow] = []
    for group in sorted(scans.keys() | begun.keys() | spans.keys()):
        stays = stays_ms.get(group)
        out.append(
            ReportRow(
                day=label,
                group=group,
                scans=scans.get(group, 0),
                checkins=checkins.get(group, 0),
                unique_persons=len(persons.get(group, ())),
                visits=begun.get(group, 0),
                median_stay_minutes=(
                    round(statistics.median(stays) / 60_000, 2) if stays else None
                ),
                peak_occupancy=peak_overlap(spans.get(group, ())),
            )
        )
    return out


def _group_of(venue_id: str, by: ReportBy, places: Mapping[str, tuple[str, str]]) -> str:
    if by == "venue":
        return venue_id
    place = places.get(venue_id)
    if place is None:
        return UNKNOWN_GROUP
    return place[0] if by == "province" else place[1]


def peak_overlap(spans: Iterable[tuple[int, int]]) -> int:
    """The most half-open intervals [start, end) that share an instant (0 for none).

    An interval ending when another starts does not overlap it: at equal times ends are
    counted before starts.
    """
    # (time, 0) for an end sorts before (time, 1) for a start.
    edges = sorted(edge for lo, hi in spans for edge in ((lo, 1), (hi, 0)))
    current = peak = 0
    for _time, is_start in edges:
        current += 1 if is_start else -1
        peak = max(peak, current)
    return peak


def rows_to_json(rows: Sequence[ReportRow]) -> list[dict[str, object]]:
    """Rows as JSON objects keyed by field name; a median with no stay to take is null."""
    return [row._asdict() for row in rows]


def rows_to_csv(rows: Sequence[ReportRow]) -> str:
    """Rows as CSV text: a header of :data:`CSV_COLUMNS`, then one line per row.

    Minutes have two decimals (empty when there is no median), and the text cells go through
    :func:`~storage.tracing.neutralise_cell` (a venue id is the caller's text). Lines end in
    ``\\r\\n``, so write the text to a file opened with ``newline=""``.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        median = row.median_stay_minutes
        writer.writerow(
            [
                neutralise_cell(row.day),
                neutralise_cell(row.group),
                row.scans,
                row.checkins,
                row.unique_persons,
                row.visits,
                "" if median is None else f"{median:.2f}",
                row.peak_occupancy,
            ]
        )
    return buffer.getvalue()
