"""``GET /v1/trace/{person_id}``: contacts of a person, for an admin token, audit-logged;
and the query parameters every trace shares (also ``scangate trace`` and the trace by
national id).

A depth-2 trace over 60 days at a busy venue can be hundreds of thousands of rows: the JSON
answer is a page (``limit``, at most ``MAX_PAGE_ROWS``) with a ``next`` cursor, and the
CSV is written as the trace goes. The trace itself reads a case visit at a time and lets
the event loop run between (``Storage.trace_units``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from typing import Final

import orjson
from aiohttp import web

from gateway.http.context import JSON, authenticate_admin
from gateway.http.declarations import reveal_contacts
from gateway.http.errors import InvalidRequest, UnknownPerson
from gateway.http.keys import PERSONAL, STORAGE, TRACE_STORAGE
from gateway.settings import parse_duration_s
from signing.codes import ID_PATTERN
from signing.personal import PersonalData
from storage import Storage, TraceQuery
from storage.models import ContactRow
from storage.registry import VenueLabel
from storage.tracing import (
    MAX_TRACE_DAYS,
    MAX_TRACE_WINDOW_MS,
    Revealed,
    csv_header,
    csv_lines,
    decode_cursor,
    encode_cursor,
    rows_to_json,
)

DEFAULT_PAGE_ROWS: Final = 1000
MAX_PAGE_ROWS: Final = 5000
STREAM_BATCH_ROWS: Final = 1000


async def get_trace(request: web.Request) -> web.StreamResponse:
    """Contacts of a person, for an admin token; every call is audit-logged. JSON comes a
    page at a time (``limit`` rows, and a ``next`` cursor while more follow); CSV is every
    row, written as the trace goes."""
    storage = request.app[STORAGE]
    admin = await authenticate_admin(request, storage)
    person_id = request.match_info["person_id"]
    if not ID_PATTERN.fullmatch(person_id):
        raise InvalidRequest("person_id: 1 to 16 characters of A-Z0-9")
    params = request.query
    try:
        cursor = params.get("cursor")
        if cursor is not None:
            query, start = decode_cursor(cursor, person_id)
        else:
            query, start = trace_query(person_id, params, now_ms=int(time.time() * 1000)), None
        limit = page_limit(params.get("limit"))
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    reveal = params.get("reveal", "0")
    if reveal not in ("0", "1"):
        raise InvalidRequest("reveal: 0 or 1")
    fmt = params.get("format", "json")
    if fmt not in ("json", "csv"):
        raise InvalidRequest("format: json or csv")
    if fmt == "csv" and cursor is not None:
        raise InvalidRequest("cursor: CSV is every row at once; pages are JSON")
    actor = f"admin:{admin}"
    personal = request.app[PERSONAL] if reveal == "1" else None
    read_from = request.app[TRACE_STORAGE]
    if not await storage.person_known(person_id) and not (
        read_from is not None and await read_from.person_known(person_id)
    ):
        # Logged all the same: who looks for whom is the audit log's business.
        await storage.audit(actor, "trace", person_id, "unknown person")
        raise UnknownPerson(f"nothing is stored of {person_id}")
    if fmt == "csv":
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/csv; charset=utf-8",
                "Content-Disposition": f'attachment; filename="trace-{person_id}.csv"',
                "Cache-Control": "no-store",
            }
        )
        await response.prepare(request)
        await response.write(csv_header(personal is not None, venues=True).encode())
        async for rows, revealed, venues in revealed_batches(
            storage.trace_stream(query, actor, read_from), storage, personal, actor, person_id
        ):
            await response.write(csv_lines(rows, revealed, venues).encode())
        await response.write_eof()
        return response
    rows, after = await storage.trace_page(query, actor, limit, start, read_from)
    revealed = None
    if personal is not None:
        revealed = await reveal_contacts(
            storage, personal, [r.person_id for r in rows], actor, person_id
        )
    # no-store: with reveal=1 it holds names and phones; no cache may keep a copy.
    venues = await storage.venue_labels([r.venue_id for r in rows])
    doc = {
        "rows": rows_to_json(rows, revealed, venues),
        "next": None if after is None else encode_cursor(query, after),
    }
    return web.Response(
        body=orjson.dumps(doc), headers={"Content-Type": JSON, "Cache-Control": "no-store"}
    )


async def revealed_batches(
    units: AsyncIterator[list[ContactRow]],
    storage: Storage,
    personal: PersonalData | None,
    actor: str,
    case_person_id: str,
) -> AsyncIterator[tuple[list[ContactRow], Revealed | None, Mapping[str, VenueLabel]]]:
    """A trace's rows in batches of about ``STREAM_BATCH_ROWS``, each with its venues'
    names and, when ``personal`` is given, its contacts' names and phones (one reveal,
    audit-logged, per batch)."""
    batch: list[ContactRow] = []

    async def flushed() -> tuple[list[ContactRow], Revealed | None, Mapping[str, VenueLabel]]:
        revealed = None
        if personal is not None:
            ids = [r.person_id for r in batch]
            revealed = await reveal_contacts(storage, personal, ids, actor, case_person_id)
        return batch, revealed, await storage.venue_labels([r.venue_id for r in batch])

    async for rows in units:
        batch += rows
        if len(batch) >= STREAM_BATCH_ROWS:
            yield await flushed()
            batch = []
    if batch:
        yield await flushed()


def page_limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_PAGE_ROWS
    if not text.isdecimal() or not 1 <= int(text) <= MAX_PAGE_ROWS:
        raise ValueError(f"limit: 1 to {MAX_PAGE_ROWS} rows")
    return int(text)


def trace_query(person_id: str, params: Mapping[str, str], now_ms: int) -> TraceQuery:
    """A trace query from ``days``, ``margin``, ``min_overlap`` and ``depth`` parameters."""
    days = params.get("days", "14")
    depth = params.get("depth", "1")
    if not days.isdecimal() or not 1 <= int(days) <= MAX_TRACE_DAYS:
        raise ValueError(f"days: a whole number from 1 to {MAX_TRACE_DAYS}")
    if depth not in ("1", "2"):
        raise ValueError("depth: 1 or 2")
    try:
        margin_ms = int(parse_duration_s(params.get("margin", "60m")) * 1000)
        min_overlap_ms = int(parse_duration_s(params.get("min_overlap", "10m")) * 1000)
    except ValueError as exc:
        raise ValueError(f"margin/min_overlap: {exc}") from None
    if not (0 <= margin_ms <= MAX_TRACE_WINDOW_MS and 0 <= min_overlap_ms <= MAX_TRACE_WINDOW_MS):
        raise ValueError("margin/min_overlap: at most 24h each")
    return TraceQuery(
        now_ms=now_ms,
        person_id=person_id,
        days=int(days),
        margin_ms=margin_ms,
        min_overlap_ms=min_overlap_ms,
        depth=1 if depth == "1" else 2,
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/trace/{person_id}", get_trace, name="trace")
