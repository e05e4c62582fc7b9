"""``GET /v1/trace/{person_id}``: contacts of a person, for an admin token, audit-logged;
and the query parameters every trace shares (also ``scangate trace`` and the trace by
national id)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Final

import orjson
from aiohttp import web

from gateway.http.context import JSON, authenticate_admin
from gateway.http.declarations import reveal_contacts
from gateway.http.errors import InvalidRequest
from gateway.http.keys import PERSONAL, STORAGE, TRACE_STORAGE
from gateway.settings import parse_duration_s
from signing.codes import ID_PATTERN
from storage import TraceQuery
from storage.tracing import rows_to_csv, rows_to_json

MAX_TRACE_WINDOW_MS: Final = 24 * 3_600_000


async def get_trace(request: web.Request) -> web.Response:
    """Contacts of a person, for an admin token; every call is audit-logged."""
    storage = request.app[STORAGE]
    admin = await authenticate_admin(request, storage)
    person_id = request.match_info["person_id"]
    if not ID_PATTERN.fullmatch(person_id):
        raise InvalidRequest("person_id: 1 to 16 characters of A-Z0-9")
    try:
        query = trace_query(person_id, request.query, now_ms=int(time.time() * 1000))
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    reveal = request.query.get("reveal", "0")
    if reveal not in ("0", "1"):
        raise InvalidRequest("reveal: 0 or 1")
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise InvalidRequest("format: json or csv")
    actor = f"admin:{admin}"
    rows = await storage.trace(query, actor=actor, read_from=request.app[TRACE_STORAGE])
    revealed = None
    if reveal == "1":
        revealed = await reveal_contacts(
            storage, request.app[PERSONAL], [r.person_id for r in rows], actor, person_id
        )
    if fmt == "csv":
        return web.Response(
            text=rows_to_csv(rows, revealed),
            content_type="text/csv",
            charset="utf-8",
            headers={
                "Content-Disposition": f'attachment; filename="trace-{person_id}.csv"',
                "Cache-Control": "no-store",
            },
        )
    # no-store: with reveal=1 it holds names and phones; no cache may keep a copy.
    return web.Response(
        body=orjson.dumps(rows_to_json(rows, revealed)),
        headers={"Content-Type": JSON, "Cache-Control": "no-store"},
    )


def trace_query(person_id: str, params: Mapping[str, str], now_ms: int) -> TraceQuery:
    """A trace query from ``days``, ``margin``, ``min_overlap`` and ``depth`` parameters."""
    days = params.get("days", "14")
    depth = params.get("depth", "1")
    if not days.isdecimal() or not 1 <= int(days) <= 60:
        raise ValueError("days: a whole number from 1 to 60")
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
