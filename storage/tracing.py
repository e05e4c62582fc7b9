"""Contact tracing, the pure part (docs/design.md, "Contact tracing"): no I/O, no clock.

A storage backend fetches visits and calls these functions:

1. the case's visits in the window (``checkout_at >= query.window_start_ms`` and
   ``checkin_at <= query.now_ms``);
2. :func:`candidate_windows` says which visits to fetch next: every visit at the venue that
   overlaps the window's interval (``checkin_at < end and checkout_at > start``);
3. :func:`contacts_of` with ``depth=1, via=None, exclude=frozenset({query.person_id})``
   gives the depth-1 rows;
4. for depth 2, for each person P of :func:`depth2_persons` (in that sorted order): fetch P's
   visits, then candidates for P's windows as in 2, and call :func:`contacts_of` with
   ``depth=2, via=P, exclude=frozenset({query.person_id, P})``. The rows of all P are
   concatenated after the depth-1 rows.

:func:`rows_to_json` and :func:`rows_to_csv` format the rows for the HTTP API and the CLI.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from storage.models import ContactRow, Visit
from storage.registry import VenueLabel
from storage.times import format_time_ms

DAY_MS: Final = 86_400_000
CSV_COLUMNS: Final = (
    "person_id",
    "venue_id",
    "overlap_start",
    "overlap_end",
    "overlap_minutes",
    "depth",
    "via",
    "checkout_recorded",
)
# After CSV_COLUMNS when the venues are named (what their posters show).
VENUE_COLUMNS: Final = ("venue_name", "venue_address", "venue_province")
# How visits whose end was scanned are closed: a check-out, or a check-out with no
# check-in before it (an orphan: its start is assumed, its end is not).
RECORDED_ENDS: Final = frozenset({"checkout", "orphan"})
# First characters a spreadsheet may read as a formula or a control (OWASP, "CSV Injection").
_FORMULA_STARTS: Final = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceQuery:
    """What to trace: the case (``person_id``), how far back, and the overlap rule.

    ``now_ms`` is the end of the window and is passed in, so a trace is a pure function of
    its query and the stored visits. Raises ValueError, with a message fit for an API
    ``detail``, for a value out of range.
    """

    person_id: str
    now_ms: int
    days: int = 14
    margin_ms: int = 60 * 60_000
    min_overlap_ms: int = 10 * 60_000
    depth: Literal[1, 2] = 1

    def __post_init__(self) -> None:
        if self.days < 1:
            raise ValueError("days must be at least 1")
        if self.margin_ms < 0:
            raise ValueError("margin must not be negative")
        if self.min_overlap_ms < 0:
            raise ValueError("min_overlap must not be negative")
        if self.depth not in (1, 2):
            raise ValueError("depth must be 1 or 2")

    @property
    def window_start_ms(self) -> int:
        """The earliest time a case visit may end and still be traced."""
        return self.now_ms - self.days * DAY_MS


def widen(visit: Visit, margin_ms: int) -> tuple[int, int]:
    """``(checkin - margin, checkout + margin)``: when the case may have been at the venue."""
    return visit.checkin_at_ms - margin_ms, visit.checkout_at_ms + margin_ms


def _in_window(visit: Visit, query: TraceQuery) -> bool:
    # Both ends inclusive: a visit that ends exactly at the window's start still counts.
    return visit.checkout_at_ms >= query.window_start_ms and visit.checkin_at_ms <= query.now_ms


def _case_visits_in_window(case_visits: Sequence[Visit], query: TraceQuery) -> list[Visit]:
    # De-duplicated and sorted, so neither the backend's row order nor a visit fetched twice
    # changes the answer.
    return sorted({v for v in case_visits if _in_window(v, query)})


def candidate_windows(
    case_visits: Sequence[Visit], query: TraceQuery
) -> list[tuple[str, int, int]]:
    """``(venue_id, widened_start_ms, widened_end_ms)`` for each case visit in the window.

    A backend fetches the visits at ``venue_id`` with ``checkin_at < widened_end`` and
    ``checkout_at > widened_start``: no other visit can overlap the widened case visit.
    Sorted by venue, then start; one entry per distinct case visit.
    """
    return sorted(
        (v.venue_id, *widen(v, query.margin_ms)) for v in _case_visits_in_window(case_visits, query)
    )


def contacts_of(
    case_visits: Sequence[Visit],
    candidates: Sequence[Visit],
    query: TraceQuery,
    depth: int,
    via: str | None,
    exclude: frozenset[str],
) -> list[ContactRow]:
    """One row per pair (case visit in the window, overlapping visit of another person).

    ``case_visits`` are one person's visits (the case at depth 1, the ``via`` person at depth
    2); those outside the query's window are skipped. ``candidates`` may hold visits of anyone
    anywhere, and may repeat a visit: each pair is counted once. A candidate counts when it is
    at the case visit's venue, its person is in neither ``exclude`` nor the case visits'
    persons (nor is ``query.person_id``), and it overlaps the case visit widened by
    ``query.margin_ms`` on both sides for at least ``query.min_overlap_ms`` (inclusive) and
    for more than zero. The overlap reported is of the widened interval with the contact's
    visit. Rows are sorted by (overlap start, venue, person), then overlap end.

    Raises ValueError for a depth other than 1 or 2, or if ``via`` is given at depth 1 or
    missing at depth 2.
    """
    if depth not in (1, 2):
        raise ValueError("depth must be 1 or 2")
    if (depth == 1) != (via is None):
        raise ValueError("via names the depth-1 person of a depth-2 row, and only then")
    cases = _case_visits_in_window(case_visits, query)
    # A person is never their own contact, whether they are the case or the via person.
    skipped = exclude | {query.person_id} | {v.person_id for v in cases}
    by_venue: dict[str, list[Visit]] = {}
    # dict.fromkeys drops a visit fetched twice (once per case window) but keeps the order.
    for visit in dict.fromkeys(candidates):
        if visit.person_id not in skipped:
            by_venue.setdefault(visit.venue_id, []).append(visit)

    rows: list[ContactRow] = []
    for case in cases:
        widened_start, widened_end = widen(case, query.margin_ms)
        case_recorded = case.closed_by in RECORDED_ENDS
        for contact in by_venue.get(case.venue_id, ()):
            start = max(widened_start, contact.checkin_at_ms)
            # Never past the moment traced (now, or a case's confirmation): a visit with
            # no check-out yet has an assumed end hours ahead.
            end = min(widened_end, contact.checkout_at_ms, query.now_ms)
            # "> 0" as well: with min_overlap 0, visits that only touch are still not contacts.
            if end - start >= query.min_overlap_ms and end > start:
                rows.append(
                    ContactRow(
                        person_id=contact.person_id,
                        venue_id=case.venue_id,
                        overlap_start_ms=start,
                        overlap_end_ms=end,
                        overlap_minutes=round((end - start) / 60_000, 2),
                        depth=depth,
                        via=via,
                        checkout_recorded=case_recorded and contact.closed_by in RECORDED_ENDS,
                    )
                )
    rows.sort(key=lambda r: (r.overlap_start_ms, r.venue_id, r.person_id, r.overlap_end_ms))
    return rows


def case_visits_in_order(case_visits: Sequence[Visit], query: TraceQuery) -> list[Visit]:
    """A person's visits in the window, in the order a trace gives their contacts: by
    check-in, then venue (then the rest of the visit, so the order is total)."""
    return sorted(
        _case_visits_in_window(case_visits, query),
        key=lambda v: (v.checkin_at_ms, v.venue_id, v.checkout_at_ms, v.closed_by, v.source_at_ms),
    )


@dataclass(frozen=True, slots=True, order=True)
class TracePosition:
    """Where a trace goes on: a unit is one case visit (at depth 2, one visit of the
    ``via_index``-th depth-2 person) with its contacts, and ``offset`` rows of it have
    been given. Units come in order: depth 1's, then depth 2's person by person."""

    depth: int = 1
    via_index: int = 0
    visit_index: int = 0
    offset: int = 0

    def unit(self) -> tuple[int, int, int]:
        return self.depth, self.via_index, self.visit_index


CURSOR_VERSION: Final = 1
# The widest trace anyone may ask for (the API's and the CLI's checks; a cursor's too).
MAX_TRACE_DAYS: Final = 60
MAX_TRACE_WINDOW_MS: Final = 24 * 3_600_000


def encode_cursor(query: TraceQuery, position: TracePosition) -> str:
    """The text a client sends back for the next page: the query as it ran (its ``now``
    included, so every page traces the same window) and where the page ended."""
    doc = [
        CURSOR_VERSION,
        query.now_ms,
        query.days,
        query.margin_ms,
        query.min_overlap_ms,
        query.depth,
        position.depth,
        position.via_index,
        position.visit_index,
        position.offset,
    ]
    return base64.urlsafe_b64encode(json.dumps(doc, separators=(",", ":")).encode()).decode()


def decode_cursor(text: str, person_id: str) -> tuple[TraceQuery, TracePosition]:
    """The query and position a cursor holds, for ``person_id``; ValueError when the text
    is not a cursor this code made (a client can change one, but only into a trace it
    could have asked for anyway)."""
    try:
        if len(text) > MAX_CURSOR_CHARS:
            raise ValueError
        doc = json.loads(base64.urlsafe_b64decode(text.encode("ascii")))
        if (
            not isinstance(doc, list)
            or len(doc) != 10
            or doc[0] != CURSOR_VERSION
            or not all(type(n) is int and 0 <= n < 2**53 for n in doc)
        ):
            raise ValueError
        _, now_ms, days, margin_ms, min_overlap_ms, depth, p_depth, via, visit, offset = doc
        query = TraceQuery(
            person_id=person_id,
            now_ms=now_ms,
            days=days,
            margin_ms=margin_ms,
            min_overlap_ms=min_overlap_ms,
            depth=1 if depth == 1 else 2,
        )
        if depth not in (1, 2) or p_depth not in (1, 2) or p_depth > depth:
            raise ValueError
        if days > MAX_TRACE_DAYS or max(margin_ms, min_overlap_ms) > MAX_TRACE_WINDOW_MS:
            raise ValueError
        return query, TracePosition(p_depth, via, visit, offset)
    except (ValueError, UnicodeError, binascii.Error, RecursionError):
        raise ValueError("cursor: not one this server gave") from None


MAX_CURSOR_CHARS: Final = 512


def depth2_persons(rows: Sequence[ContactRow]) -> list[str]:
    """The distinct persons of the depth-1 rows, sorted: whose contacts depth 2 adds."""
    return sorted({row.person_id for row in rows if row.depth == 1})


# A contact's details, decrypted for a reveal: (full name, phone), None where unknown.
Revealed = Mapping[str, tuple[str | None, str | None]]


def rows_to_json(
    rows: Sequence[ContactRow],
    revealed: Revealed | None = None,
    venues: Mapping[str, VenueLabel] | None = None,
) -> list[dict[str, object]]:
    """Rows as JSON objects, times in RFC 3339 UTC with milliseconds.

    ``overlap_minutes`` is a number; ``via`` is present only on depth-2 rows. With
    ``revealed`` each row also has ``full_name`` and ``phone`` (null when unknown); with
    ``venues``, ``venue_name``, ``venue_address`` and ``venue_province`` (null for a venue
    not registered here).
    """
    out: list[dict[str, object]] = []
    for row in rows:
        item: dict[str, object] = {
            "person_id": row.person_id,
            "venue_id": row.venue_id,
            **({} if venues is None else venue_members(venues.get(row.venue_id))),
            "overlap_start": format_time_ms(row.overlap_start_ms),
            "overlap_end": format_time_ms(row.overlap_end_ms),
            "overlap_minutes": row.overlap_minutes,
            "depth": row.depth,
        }
        if row.via is not None:
            item["via"] = row.via
        item["checkout_recorded"] = row.checkout_recorded
        if revealed is not None:
            item["full_name"], item["phone"] = revealed.get(row.person_id, (None, None))
        out.append(item)
    return out


def venue_members(label: VenueLabel | None) -> dict[str, str | None]:
    """A venue's public members in an answer: what its poster shows (null when the venue
    is not registered here). Nothing else of another app's venue is ever shown."""
    return {
        "venue_name": label.name if label else None,
        "venue_address": label.address if label else None,
        "venue_province": label.province if label else None,
    }


def neutralise_cell(text: str) -> str:
    """``text`` with a ``'`` in front if a spreadsheet could take it for a formula.

    That is, if it starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return
    (OWASP CSV injection guidance); any other text is returned unchanged.
    """
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def rows_to_csv(
    rows: Sequence[ContactRow],
    revealed: Revealed | None = None,
    venues: Mapping[str, VenueLabel] | None = None,
) -> str:
    """Rows as CSV text: a header of :data:`CSV_COLUMNS`, then one line per row.

    Times are RFC 3339 UTC with milliseconds, minutes have two decimals, ``via`` is empty at
    depth 1, and every cell goes through :func:`neutralise_cell`. Lines end in ``\\r\\n``
    (RFC 4180, the csv module's default), so write the text to a file opened with
    ``newline=""``.
    """
    return csv_header(revealed is not None, venues is not None) + csv_lines(rows, revealed, venues)


def csv_header(revealed: bool, venues: bool = False) -> str:
    """The CSV's first line (with ``full_name`` and ``phone`` when contacts are revealed,
    and the venues' names, addresses and provinces with ``venues``)."""
    buffer = io.StringIO()
    csv.writer(buffer).writerow(
        CSV_COLUMNS
        + (VENUE_COLUMNS if venues else ())
        + (("full_name", "phone") if revealed else ())
    )
    return buffer.getvalue()


def csv_lines(
    rows: Sequence[ContactRow],
    revealed: Revealed | None = None,
    venues: Mapping[str, VenueLabel] | None = None,
) -> str:
    """The CSV lines of ``rows``, without the header (a stream writes it once)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for row in rows:
        cells: tuple[str, ...] = (
            row.person_id,
            row.venue_id,
            format_time_ms(row.overlap_start_ms),
            format_time_ms(row.overlap_end_ms),
            f"{row.overlap_minutes:.2f}",
            str(row.depth),
            row.via or "",
            "true" if row.checkout_recorded else "false",
        )
        if venues is not None:
            label = venues.get(row.venue_id)
            cells += ("", "", "") if label is None else (label.name, label.address, label.province)
        if revealed is not None:
            name, phone = revealed.get(row.person_id, (None, None))
            cells += (name or "", phone or "")
        writer.writerow([neutralise_cell(cell) for cell in cells])
    return buffer.getvalue()
