"""Reading the audit log: ``GET /v1/audit`` (admin token) and ``scangate audit`` share the
rules here. Every read is itself written to the log (``audit_read``, with its filters)
before it is answered: who watched the officials is on record too.

A page is at most ``limit`` entries written at or after ``since``, by id (the order they
were written in); a full page gives the id to continue ``after``. Retention
(``SCANGATE_AUDIT_RETENTION``, one year by default) deletes older entries in the daily
purge and ``scangate purge``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

from aiohttp import web

from gateway.http.context import authenticate_admin, json_response
from gateway.http.errors import InvalidRequest
from gateway.http.keys import STORAGE
from gateway.settings import parse_duration_s
from storage import AuditQuery, AuditRecord, Storage
from storage.times import format_time_ms, parse_time_ms

DEFAULT_SINCE: Final = "1d"
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000  # per HTTP answer; the CLI may ask for more
MAX_FILTER_CHARS: Final = 200
MAX_ID_DIGITS: Final = 18  # below 2**63
# "+07:00" written unencoded in a query string arrives as " 07:00" ("+" is a space there).
_DECODED_PLUS_OFFSET: Final = re.compile(r" ([0-9]{2}:[0-9]{2})$")


def parse_since(text: str, now_ms: int) -> int:
    """Epoch ms of ``since``: a duration back from now (``7d``, ``12h``), or a time (RFC 3339
    with an offset, or epoch milliseconds). ValueError otherwise."""
    text = _DECODED_PLUS_OFFSET.sub(r"+\1", text.strip())
    try:
        return max(0, now_ms - int(parse_duration_s(text) * 1000))
    except ValueError:
        pass
    if text.isdecimal() and len(text) <= MAX_ID_DIGITS:
        return parse_time_ms(int(text))
    try:
        return parse_time_ms(text)
    except ValueError:
        raise ValueError(
            "since: a duration back from now (7d, 12h) or a time (RFC 3339 with an offset, "
            "or epoch milliseconds)"
        ) from None


def audit_query(params: Mapping[str, str], now_ms: int, max_limit: int = MAX_LIMIT) -> AuditQuery:
    """The query that ``since``, ``actor``, ``action``, ``after`` and ``limit`` ask for;
    ValueError with a reason fit for an answer."""
    since_ms = parse_since(params.get("since", DEFAULT_SINCE), now_ms)
    filters: dict[str, str | None] = {}
    for name in ("actor", "action"):
        value = params.get(name)
        if value is not None and not (1 <= len(value) <= MAX_FILTER_CHARS and value.isprintable()):
            raise ValueError(f"{name}: 1 to {MAX_FILTER_CHARS} printable characters")
        filters[name] = value
    after = params.get("after", "0")
    if not after.isdecimal() or len(after) > MAX_ID_DIGITS:
        raise ValueError("after: an entry id (a whole number)")
    limit = params.get("limit", str(DEFAULT_LIMIT))
    if not limit.isdecimal() or not 1 <= int(limit) <= max_limit:
        raise ValueError(f"limit: 1 to {max_limit}")
    return AuditQuery(
        since_ms=since_ms,
        actor=filters["actor"],
        action=filters["action"],
        after_id=int(after),
        limit=int(limit),
    )


async def read_audit_log(storage: Storage, query: AuditQuery, actor: str) -> list[AuditRecord]:
    """A page of the log, for ``actor``; the read is logged first."""
    await storage.audit(
        actor,
        "audit_read",
        "audit_log",
        f"since={format_time_ms(query.since_ms)} actor={query.actor or '*'} "
        f"action={query.action or '*'} after={query.after_id} limit={query.limit}",
    )
    return await storage.read_audit(query)


def entries_json(records: Sequence[AuditRecord]) -> list[dict[str, Any]]:
    return [
        {
            "id": r.id,
            "at": format_time_ms(r.at_ms),
            "actor": r.actor,
            "action": r.action,
            "subject": r.subject,
            "detail": r.detail,
        }
        for r in records
    ]


def next_after(records: Sequence[AuditRecord], query: AuditQuery) -> int | None:
    """Where the next page starts, or None when this one is the last."""
    return records[-1].id if len(records) == query.limit else None


# -- HTTP ------------------------------------------------------------------------------------


async def get_audit(request: web.Request) -> web.Response:
    """A page of the audit log, for an admin token; ``no-store``, like every official read."""
    storage = request.app[STORAGE]
    admin = await authenticate_admin(request, storage)
    try:
        query = audit_query(request.query, int(time.time() * 1000))
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    records = await read_audit_log(storage, query, f"admin:{admin}")
    return json_response(
        {"entries": entries_json(records), "next_after": next_after(records, query)},
        no_store=True,
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/audit", get_audit, name="audit")
